"""The provider circuit breaker: an outage opens it, probes go one at a time, the
first success closes it, and nobody is dead-lettered or texted twice.

The worker here gives each recipient two attempts and opens the circuit after 5
failures for 1 s: an outage of several seconds spans many probes, and any of
them counted as an attempt would fail recipients.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
import pytest

from delivery.provider import SendRequest
from delivery.telnyx import TelnyxProvider
from deploy.stack import Stack, free_ports
from tests.conftest import MONITORING, Church
from tests.delivery.test_throttle import (
    audience,
    dead_lettered,
    once_each,
    simulator_config,
    texted,
    wait_for,
    worker_with,
)

# Slow lane: a provider outage that opens and closes the circuit.
pytestmark = pytest.mark.slow


OUTAGE_S = 5.0


def _circuit(base_url: str) -> dict[str, Any]:
    detailed = httpx.get(f"{base_url}/health/detailed", headers=MONITORING, timeout=10).json()
    circuit: dict[str, Any] = detailed["data"]["checks"]["queue"]["provider_circuit"]
    return circuit


def _circuit_when(base_url: str, state: str, seconds: float) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    while True:
        circuit = _circuit(base_url)
        if circuit["state"] == state or time.monotonic() > deadline:
            return circuit
        time.sleep(0.1)


@pytest.mark.timeout(180)
def test_outage_opens_the_circuit_and_everyone_is_delivered_once(
    church: Church, stack: Stack, base_url: str, sim_url: str
) -> None:
    count = 150
    group, phones = audience(church, count)
    breaker = {
        "KOINONIA_MAX_ATTEMPTS": "2",
        "KOINONIA_CIRCUIT_FAILURES": "5",
        "KOINONIA_CIRCUIT_COOLDOWN_S": "1",
    }
    with worker_with(stack, **breaker):
        opened_before = _circuit(base_url)["times_opened"]
        with simulator_config(sim_url, outage=True):
            message_id = church.broadcast(group, "Through the outage")
            circuit = _circuit_when(base_url, "open", 20)
            assert circuit["state"] == "open", circuit
            time.sleep(OUTAGE_S)
            during = church.api.get(f"/v1/messages/{message_id}").json()["data"]["counts"]
            assert texted(during) == 0, during
            assert during["failed"] == 0, f"recipients failed during the outage: {during}"
            # Probes went out (one per cool-down) and failed: the circuit opened again.
            assert _circuit(base_url)["times_opened"] >= opened_before + 2
        counts = wait_for(church, message_id, lambda c: c["delivered"] + c["failed"] == count, 60)
        assert counts["delivered"] == count, counts
        assert _circuit_when(base_url, "closed", 10)["state"] == "closed"
    assert counts["failed"] == 0, counts
    assert dead_lettered(stack, message_id) == 0
    once_each(sim_url, phones)


# -- what the Telnyx adapter reports, against a bare HTTP server ------------------------------

_OK = b'{"data":{"id":"msg-1","record_type":"message"}}'


async def _serve(answer: bytes, *, close_after: bool) -> tuple[asyncio.Server, int, list[int]]:
    """A server that reads one request at a time and writes ``answer`` to each;
    ``close_after`` drops the connection after every answer, without saying so."""
    connections: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                )
                await reader.readexactly(length)
                writer.write(answer)
                await writer.drain()
                if close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, port, connections


def _requests(n: int) -> list[SendRequest]:
    return [
        SendRequest(
            from_number="+15550100000",
            to=f"+1201555{i:04d}",
            text="Hello",
            webhook_url=None,
            idempotency_key=f"rcpt-{uuid.uuid4()}",
        )
        for i in range(n)
    ]


@pytest.mark.anyio
async def test_adapter_reads_chunked_answers_and_survives_closed_keep_alives() -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
        + f"{len(_OK):x}\r\n".encode()
        + _OK
        + b"\r\n0\r\n\r\n"
    )
    server, port, connections = await _serve(chunked, close_after=True)
    provider = TelnyxProvider(f"http://127.0.0.1:{port}", "key", timeout_s=5, concurrency=4)
    try:
        for _ in range(3):  # every pooled connection has been dropped by the server
            results = await provider.send(_requests(8))
            assert [r.provider_message_id for r in results] == ["msg-1"] * 8, results
        assert len(connections) == 24
    finally:
        await provider.aclose()
        server.close()


@pytest.mark.anyio
async def test_adapter_sorts_refusals_for_the_breaker_and_the_throttle() -> None:
    limited = (
        b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 2\r\nContent-Length: 30\r\n\r\n"
        b'{"errors":[{"code":"10011"}]}\n'
    )
    server, port, _ = await _serve(limited, close_after=False)
    provider = TelnyxProvider(f"http://127.0.0.1:{port}", "key", timeout_s=5)
    try:
        (result,) = await provider.send(_requests(1))
        assert (result.throttled, result.unavailable, result.retry_after_s) == (True, False, 2.0)
    finally:
        await provider.aclose()
        server.close()

    silent = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    provider = TelnyxProvider(f"http://127.0.0.1:{port}", "key", timeout_s=0.3)
    try:
        (result,) = await provider.send(_requests(1))
        assert (result.unavailable, result.error_code) == (True, "timeout")
    finally:
        await provider.aclose()
        silent.close()

    (free,) = free_ports(1)
    provider = TelnyxProvider(f"http://127.0.0.1:{free}", "key", timeout_s=2)
    (result,) = await provider.send(_requests(1))
    assert (result.unavailable, result.error_code) == (True, "connection_error")
