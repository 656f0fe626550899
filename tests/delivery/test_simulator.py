"""The Telnyx simulator, over real sockets: the simulator and a webhook receiver both run
under uvicorn on loopback ports inside each test; the pure rules are tested directly."""

from __future__ import annotations

import base64
import contextlib
import json
import random
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgspec
import pytest
import uvicorn
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from delivery.simulator import create_simulator_app, new_signing_seed, public_key_b64
from delivery.simulator_state import (
    ConfigPatch,
    IdempotencyStore,
    SimConfig,
    StoredSend,
    TokenBucket,
    apply_patch,
    keyword,
)
from delivery.simulator_wire import SimulatorError, plan_events, segment
from storage.domain.segments import GSM7_BASIC
from storage.process.settings import SimulatorSettings

CHURCH = "+15550100001"
MEMBER = "+15557654321"
AUTH = {"Authorization": "Bearer test-key"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# -- pure rules ---------------------------------------------------------------------------------


def test_simulator_counts_parts_with_the_shared_counter() -> None:
    """The simulator reports what the app computed: one counter, the shared vectors."""
    cases = json.loads((Path(__file__).parent.parent / "vectors" / "segments.json").read_text())[
        "cases"
    ]
    for case in cases:
        assert segment(case["text"]) == (case["encoding"], case["segments"]), case


def test_gsm7_basic_table_is_the_whole_default_alphabet_minus_escape() -> None:
    assert len(GSM7_BASIC) == 127


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("STOP", "stop"),
        ("stop", "stop"),
        ("  Stop  All ", "stop"),
        ("Stop.", "stop"),
        ("unsubscribe", "stop"),
        ("OptOut", "stop"),
        ("stop texting me please", None),
        ("START", "start"),
        ("unstop", "start"),
        ("yes", "start"),
        ("hello", None),
    ],
)
def test_keywords_match_whole_message(text: str, expected: str | None) -> None:
    assert keyword(text) == expected


def test_token_bucket_refills_at_rate() -> None:
    bucket = TokenBucket(2.0, now=0.0)
    assert bucket.take(0.0).allowed
    assert bucket.take(0.0).allowed
    denied = bucket.take(0.0)
    assert not denied.allowed
    assert denied.retry_after_s == 1
    assert denied.headers()["Retry-After"] == "1"
    assert bucket.take(0.5).allowed


def test_idempotency_store_expires_and_bounds() -> None:
    store = IdempotencyStore(ttl_s=10, max_entries=2)

    def stored(at: float) -> StoredSend:
        return StoredSend(b"fingerprint", uuid.uuid4().bytes, 0, at)

    store.remember("a", stored(0))
    assert store.lookup("a", now=5) is not None
    assert store.lookup("a", now=10) is None
    store.remember("b", stored(20))
    store.remember("c", stored(21))
    store.remember("d", stored(22))
    assert store.lookup("b", now=22) is None
    assert len(store) == 2


def test_config_patch_validation() -> None:
    decoder = msgspec.json.Decoder(ConfigPatch)
    config = apply_patch(SimConfig(), decoder.decode(b'{"outcomes": {"delivery_failed": 1}}'))
    assert config.outcomes.delivered == 0
    assert config.latency_ms == (0, 0)
    with pytest.raises(msgspec.ValidationError):
        decoder.decode(b'{"latency": [1, 2]}')
    with pytest.raises(msgspec.ValidationError):
        decoder.decode(b'{"duplicate_webhooks": 2}')
    with pytest.raises(SimulatorError):
        apply_patch(SimConfig(), decoder.decode(b'{"latency_ms": [5, 1]}'))
    with pytest.raises(SimulatorError):
        apply_patch(SimConfig(), decoder.decode(b'{"outcomes": {}}'))


def test_public_key_b64_derives_the_raw_ed25519_key() -> None:
    seed = new_signing_seed()
    key = base64.b64decode(public_key_b64(seed))
    assert len(key) == 32
    Ed25519PublicKey.from_public_bytes(key)
    with pytest.raises(ValueError, match="32 bytes"):
        public_key_b64(base64.b64encode(b"short").decode())


# -- harness: simulator and receiver on real sockets ------------------------------------------


class _Server(uvicorn.Server):
    """uvicorn without signal handling (the test runner owns signals), and with events a
    test can await instead of polling ``started``."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = anyio.Event()
        self.stopped = anyio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.ready.set()


def _listening_socket() -> socket.socket:
    # IPPROTO_TCP explicitly: asyncio only sets TCP_NODELAY on sockets whose proto says TCP,
    # and without it every request waits out a delayed ACK (~40 ms).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


class Receiver:
    """The app's side: collects webhooks; ``fail_next`` answers 500 that many times first."""

    def __init__(self) -> None:
        self.hooks: list[tuple[dict[str, str], bytes]] = []
        self.fail_next = 0
        self._arrived = anyio.Event()
        self.app = Starlette(
            routes=[
                Route("/hook", self.hook, methods=["POST"]),
                Route("/fail", self.fail, methods=["POST"]),
            ]
        )

    async def hook(self, request: Request) -> Response:
        body = await request.body()
        if self.fail_next:
            self.fail_next -= 1
            return Response(status_code=500)
        self.hooks.append((dict(request.headers), body))
        self._arrived.set()
        self._arrived = anyio.Event()
        return Response(status_code=200)

    async def fail(self, request: Request) -> Response:
        await request.body()
        return Response(status_code=503)

    async def wait_for(self, count: int, timeout_s: float = 5.0) -> list[dict[str, Any]]:
        with anyio.fail_after(timeout_s):
            while len(self.hooks) < count:
                await self._arrived.wait()
        return self.bodies()

    def bodies(self) -> list[dict[str, Any]]:
        return [msgspec.json.decode(body) for _, body in self.hooks]


class Harness(msgspec.Struct, frozen=True):
    client: httpx.AsyncClient
    receiver: Receiver
    hook_url: str
    sim_url: str

    async def send(
        self, to: str = MEMBER, text: str = "Hello from church", **extra: Any
    ) -> httpx.Response:
        headers = {**AUTH, **extra.pop("headers", {})}
        body = {"from": CHURCH, "to": to, "text": text, **extra}
        return await self.client.post("/v2/messages", json=body, headers=headers)

    async def configure(self, **config: Any) -> httpx.Response:
        return await self.client.post("/_sim/config", json=config)

    async def stats(self) -> dict[str, Any]:
        response = await self.client.get("/_sim/stats")
        result: dict[str, Any] = response.json()
        return result

    async def stats_when(
        self, predicate: Callable[[dict[str, Any]], bool], timeout_s: float = 5.0
    ) -> dict[str, Any]:
        """Stats once ``predicate`` holds; the simulator is another server, so poll it."""
        for _ in range(int(timeout_s / 0.05)):
            if predicate(stats := await self.stats()):
                return stats
            await anyio.sleep(0.05)
        raise AssertionError(f"stats never matched: {await self.stats()}")

    async def public_key(self) -> Ed25519PublicKey:
        response = await self.client.get("/_sim/public-key")
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(response.json()["public_key"]))


async def _serve(tg: anyio.abc.TaskGroup, app: Starlette) -> tuple[_Server, str]:
    sock = _listening_socket()
    server = _Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="on"))

    async def run() -> None:
        try:
            await server.serve([sock])
        finally:
            sock.close()
            server.stopped.set()
            server.ready.set()

    tg.start_soon(run)
    await server.ready.wait()
    assert server.started, "uvicorn failed to start"
    host, port = sock.getsockname()
    return server, f"http://{host}:{port}"


@contextlib.asynccontextmanager
async def running(**settings: Any) -> AsyncIterator[Harness]:
    receiver = Receiver()
    async with anyio.create_task_group() as tg:
        receiver_server, receiver_url = await _serve(tg, receiver.app)
        hook_url = f"{receiver_url}/hook"
        sim_settings = SimulatorSettings(default_webhook_url=hook_url, **settings)
        sim_server, sim_url = await _serve(tg, create_simulator_app(sim_settings))
        try:
            async with httpx.AsyncClient(base_url=sim_url, timeout=5) as client:
                yield Harness(client, receiver, hook_url, sim_url)
        finally:
            # The simulator first, so its queued webhooks can still reach the receiver.
            sim_server.should_exit = True
            await sim_server.stopped.wait()
            receiver_server.should_exit = True


def _verify(key: Ed25519PublicKey, headers: dict[str, str], body: bytes) -> None:
    signature = base64.b64decode(headers["telnyx-signature-ed25519"])
    key.verify(signature, headers["telnyx-timestamp"].encode() + b"|" + body)


def _parse_time(value: str) -> datetime:
    parsed = datetime.fromisoformat(value)
    assert parsed.utcoffset() is not None
    return parsed


# -- sends ------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_send_answers_with_telnyx_message_body() -> None:
    async with running() as sim:
        response = await sim.send(text="Grace and peace {to you}")
        assert response.status_code == 200
        data = response.json()["data"]
        assert data["record_type"] == "message"
        assert data["direction"] == "outbound"
        assert uuid.UUID(data["id"])
        assert data["type"] == "SMS"
        assert data["from"] == {
            "phone_number": CHURCH,
            "carrier": "TELNYX LLC",
            "line_type": "VoIP",
        }
        [recipient] = data["to"]
        assert recipient["phone_number"] == MEMBER
        assert recipient["status"] == "queued"
        assert {"carrier", "line_type"} <= recipient.keys()
        assert data["text"] == "Grace and peace {to you}"
        assert data["media"] == []
        assert data["webhook_url"] == sim.hook_url
        assert data["webhook_failover_url"] is None
        assert (data["encoding"], data["parts"]) == ("GSM-7", 1)
        assert data["tags"] == []
        assert data["cost"] is None
        assert data["sent_at"] is None
        assert data["completed_at"] is None
        assert _parse_time(data["valid_until"]) > _parse_time(data["received_at"])
        assert data["errors"] == []
        assert {"messaging_profile_id", "organization_id"} <= data.keys()

        unicode = (await sim.send(text="Dios te bendiga 🙏" * 5)).json()["data"]
        assert (unicode["encoding"], unicode["parts"]) == ("UCS-2", 2)


@pytest.mark.anyio
async def test_webhooks_are_signed_telnyx_events_sent_then_finalized() -> None:
    async with running() as sim:
        message = (await sim.send()).json()["data"]
        events = await sim.receiver.wait_for(2)
        key = await sim.public_key()
        for headers, body in sim.receiver.hooks:
            assert headers["content-type"] == "application/json"
            assert abs(int(headers["telnyx-timestamp"]) - time.time()) < 30
            _verify(key, headers, body)
        headers, body = sim.receiver.hooks[0]
        with pytest.raises(InvalidSignature):
            _verify(key, headers, body.replace(b"sent", b"SENT"))

        sent, finalized = events
        assert [e["data"]["event_type"] for e in events] == ["message.sent", "message.finalized"]
        for event in events:
            assert event["data"]["record_type"] == "event"
            assert uuid.UUID(event["data"]["id"])
            assert event["meta"] == {"attempt": 1, "delivered_to": sim.hook_url}
            assert event["data"]["payload"]["id"] == message["id"]
            # Telnyx stamps events to the millisecond with an explicit offset.
            assert len(event["data"]["occurred_at"].split(".")[1]) == len("000+00:00")
            _parse_time(event["data"]["occurred_at"])
        assert sent["data"]["id"] != finalized["data"]["id"]
        sent_payload = sent["data"]["payload"]
        assert sent_payload["to"][0]["status"] == "sent"
        assert sent_payload["sent_at"] is not None
        assert sent_payload["completed_at"] is None
        final_payload = finalized["data"]["payload"]
        assert final_payload["to"][0]["status"] == "delivered"
        assert final_payload["completed_at"] is not None
        assert final_payload["errors"] == []
        assert (await sim.stats())["webhooks_sent"] == 2


@pytest.mark.anyio
async def test_bearer_key_is_required() -> None:
    async with running() as sim:
        response = await sim.client.post(
            "/v2/messages", json={"from": CHURCH, "to": MEMBER, "text": "hi"}
        )
        assert response.status_code == 401
        [err] = response.json()["errors"]
        assert (err["code"], err["title"]) == ("10009", "Authentication failed")
        assert (await sim.send(headers={"Authorization": "Bearer"})).status_code == 401
        assert (await sim.send(headers={"Authorization": "Basic dXNlcjpwdw=="})).status_code == 401

    async with running(api_key="the-only-key") as sim:
        assert (await sim.send()).status_code == 401
        ok = await sim.send(headers={"Authorization": "Bearer the-only-key"})
        assert ok.status_code == 200


@pytest.mark.anyio
async def test_invalid_sends_get_telnyx_errors() -> None:
    async with running() as sim:
        bad_to = await sim.send(to="5551234")
        assert bad_to.status_code == 400
        assert bad_to.json()["errors"][0]["code"] == "40310"
        assert bad_to.json()["errors"][0]["source"] == {"pointer": "/to"}

        missing = await sim.client.post("/v2/messages", json={"from": CHURCH}, headers=AUTH)
        assert missing.status_code == 400
        assert missing.json()["errors"][0]["code"] == "10004"

        unknown = await sim.send(body="typo for text")
        assert unknown.status_code == 422
        assert unknown.json()["errors"][0]["code"] == "10015"

        wrong_type = await sim.send(webhook_url=5)
        assert wrong_type.status_code == 422
        assert wrong_type.json()["errors"][0]["source"] == {"pointer": "/webhook_url"}

        garbage = await sim.client.post("/v2/messages", content=b"{nope", headers=AUTH)
        assert garbage.status_code == 400
        assert garbage.json()["errors"][0]["code"] == "10015"

        assert (await sim.stats())["total"] == 0


# -- idempotency ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_idempotency_key_replays_and_sends_once() -> None:
    async with running() as sim:
        key = {"Idempotency-Key": str(uuid.uuid4())}
        first = await sim.send(headers=key)
        again = await sim.send(headers=key)
        assert first.status_code == again.status_code == 200
        assert first.content == again.content

        changed = await sim.send(text="A different text", headers=key)
        assert changed.status_code == 422
        assert changed.json()["errors"][0]["code"] == "10015"

        other = await sim.send(headers={"Idempotency-Key": str(uuid.uuid4())})
        assert other.json()["data"]["id"] != first.json()["data"]["id"]

        await sim.receiver.wait_for(4)
        await anyio.sleep(0.1)
        assert len(sim.receiver.hooks) == 4
        stats = await sim.stats()
        assert stats["total"] == 2
        assert stats["by_destination"] == {MEMBER: 2}

        bad_key = await sim.send(headers={"Idempotency-Key": "spaces are not allowed"})
        assert bad_key.status_code == 400


@pytest.mark.anyio
async def test_failed_sends_do_not_store_idempotency_keys() -> None:
    async with running() as sim:
        key = {"Idempotency-Key": "retry-1"}
        await sim.configure(outage=True)
        assert (await sim.send(headers=key)).status_code == 503
        await sim.configure(outage=False)
        assert (await sim.send(headers=key)).status_code == 200
        assert (await sim.stats())["total"] == 1


# -- failure modes ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_outage_answers_5xx_and_sends_nothing() -> None:
    async with running() as sim:
        await sim.configure(outage=True)
        response = await sim.send()
        assert response.status_code == 503
        [err] = response.json()["errors"]
        assert {"code", "title", "detail"} <= err.keys()
        assert (await sim.stats())["total"] == 0


@pytest.mark.anyio
async def test_rate_limit_answers_429_with_retry_after() -> None:
    async with running() as sim:
        await sim.configure(rate_limit_per_s=2)
        statuses = [(await sim.send(to=f"+1555000000{i}")) for i in range(3)]
        assert [r.status_code for r in statuses] == [200, 200, 429]
        limited = statuses[-1]
        assert int(limited.headers["Retry-After"]) >= 1
        assert limited.headers["x-ratelimit-limit"] == "2"
        assert limited.headers["x-ratelimit-remaining"] == "0"
        assert "x-ratelimit-reset" in limited.headers
        assert limited.json()["errors"][0]["code"] == "10011"
        assert (await sim.stats())["total"] == 2

        await sim.configure(rate_limit_per_s=None)
        assert (await sim.send()).status_code == 200


@pytest.mark.anyio
async def test_outcomes_carry_telnyx_statuses_and_errors() -> None:
    async with running() as sim:
        await sim.configure(outcomes={"sending_failed": 1})
        await sim.send()
        [finalized] = await sim.receiver.wait_for(1)
        assert finalized["data"]["event_type"] == "message.finalized"
        payload = finalized["data"]["payload"]
        assert payload["to"][0]["status"] == "sending_failed"
        assert payload["sent_at"] is None
        assert payload["errors"][0]["code"] == "40001"

        await sim.configure(outcomes={"delivery_failed": 1})
        await sim.send()
        events = await sim.receiver.wait_for(3)
        assert [e["data"]["event_type"] for e in events[1:]] == [
            "message.sent",
            "message.finalized",
        ]
        assert events[2]["data"]["payload"]["to"][0]["status"] == "delivery_failed"
        assert events[2]["data"]["payload"]["errors"][0]["code"] == "40008"

        await sim.configure(outcomes={"delivery_unconfirmed": 1})
        await sim.send()
        events = await sim.receiver.wait_for(5)
        assert events[4]["data"]["payload"]["to"][0]["status"] == "delivery_unconfirmed"


@pytest.mark.anyio
async def test_webhook_delivery_retries_then_fails_over() -> None:
    async with running() as sim:
        sim.receiver.fail_next = 2
        await sim.send()
        sent, _ = await sim.receiver.wait_for(2)
        assert sent["meta"]["attempt"] == 3

        # Primary always failing: three attempts there, then the failover URL. And one with
        # nowhere to deliver at all: given up and counted.
        failing = sim.hook_url.replace("/hook", "/fail")
        await sim.send(webhook_url=failing, webhook_failover_url=sim.hook_url)
        await sim.send(webhook_url="http://127.0.0.1:9/dead")
        events = await sim.receiver.wait_for(4)
        assert events[2]["meta"] == {"attempt": 4, "delivered_to": sim.hook_url}
        stats = await sim.stats_when(lambda stats: stats["webhooks_failed"] == 2)
        assert stats["webhooks_sent"] == 4
        assert stats["webhooks_pending"] == 0


@pytest.mark.anyio
async def test_duplicate_and_reordered_webhooks() -> None:
    async with running() as sim:
        await sim.configure(duplicate_webhooks=1)
        await sim.send()
        events = await sim.receiver.wait_for(4)
        ids = [e["data"]["id"] for e in events]
        assert ids[0] == ids[1] != ids[2] == ids[3]

        await sim.client.post("/_sim/reset")
        sim.receiver.hooks.clear()
        await sim.configure(reorder_webhooks=True)
        for _ in range(20):
            await sim.send()
        events = await sim.receiver.wait_for(40)
        first_seen: dict[str, str] = {}
        for event in events:
            first_seen.setdefault(event["data"]["payload"]["id"], event["data"]["event_type"])
        assert "message.finalized" in first_seen.values()


@pytest.mark.anyio
async def test_latency_delays_webhooks() -> None:
    async with running() as sim:
        await sim.configure(latency_ms=[200, 200])
        started = time.monotonic()
        await sim.send()
        await sim.receiver.wait_for(2)
        assert time.monotonic() - started >= 0.19


@pytest.mark.anyio
async def test_dropped_receipts_can_be_looked_up_as_telnyx_answers() -> None:
    """``drop_webhooks``: the callbacks are lost, the carrier's outcome is not:
    ``GET /v2/messages/{id}`` reports it, as Telnyx does."""
    async with running() as sim:
        await sim.configure(drop_webhooks=1.0, outcomes={"delivery_failed": 1})
        sent = (await sim.send()).json()["data"]
        await anyio.sleep(0.3)
        assert sim.receiver.hooks == []
        found = await sim.client.get(f"/v2/messages/{sent['id']}", headers=AUTH)
        assert found.status_code == 200, found.text
        data = found.json()["data"]
        assert data["id"] == sent["id"]
        assert data["to"][0]["status"] == "delivery_failed"
        assert (await sim.client.get(f"/v2/messages/{sent['id']}")).status_code == 401
        missing = await sim.client.get(f"/v2/messages/{uuid.uuid4()}", headers=AUTH)
        assert missing.status_code == 404
        assert missing.json()["errors"][0]["code"] == "10005"


@pytest.mark.anyio
async def test_lookup_says_queued_until_the_outcome_is_known() -> None:
    async with running() as sim:
        await sim.configure(latency_ms=[1500, 1500], drop_webhooks=1.0)
        sent = (await sim.send()).json()["data"]
        found = await sim.client.get(f"/v2/messages/{sent['id']}", headers=AUTH)
        assert found.json()["data"]["to"][0]["status"] == "queued"


@pytest.mark.anyio
async def test_shutdown_sends_pending_receipts_at_once() -> None:
    """Receipts still waiting out their latency go when the simulator stops, not never."""
    async with running() as sim:
        await sim.configure(latency_ms=[60_000, 60_000])
        await sim.send()
        receiver = sim.receiver
    assert [b["data"]["event_type"] for b in receiver.bodies()] == [
        "message.sent",
        "message.finalized",
    ]


@pytest.mark.slow
@pytest.mark.anyio
async def test_shutdown_keeps_receipts_that_cannot_go_and_the_next_start_resends(
    tmp_path: Path,
) -> None:
    """A receiver that never answers: what is still pending after the shutdown's grace is
    kept in the state file; the next simulator restores it and sends it again, and
    still answers lookups for the messages it had sent."""
    state = tmp_path / "sim-state.msgpack"
    silent = _listening_socket()  # accepts connections, never answers
    silent_url = "http://{}:{}/hook".format(*silent.getsockname())
    try:
        async with running(state_file=str(state)) as sim:
            sent = (await sim.send(webhook_url=silent_url)).json()["data"]
        assert state.exists(), "pending receipts were kept"
        async with running(state_file=str(state)) as again:
            stats = await again.stats()
            assert stats["webhooks_pending"] == 1
            found = await again.client.get(f"/v2/messages/{sent['id']}", headers=AUTH)
            assert found.json()["data"]["to"][0]["status"] == "delivered"
            assert not state.exists()
    finally:
        silent.close()


@pytest.mark.anyio
async def test_burst_keeps_sent_before_finalized_per_message() -> None:
    async with running() as sim:
        count = 100
        # Bounded like a real worker; the test process also hosts both servers.
        limiter = anyio.Semaphore(10)

        async def send(i: int) -> None:
            async with limiter:
                response = await sim.send(to=f"+1555{i:07d}")
            assert response.status_code == 200

        async with anyio.create_task_group() as tg:
            for i in range(count):
                tg.start_soon(send, i)
        events = await sim.receiver.wait_for(2 * count, timeout_s=15)
        seen: dict[str, list[str]] = {}
        for event in events:
            seen.setdefault(event["data"]["payload"]["id"], []).append(event["data"]["event_type"])
        assert len(seen) == count
        assert all(types == ["message.sent", "message.finalized"] for types in seen.values())
        assert (await sim.stats())["total"] == count


# -- inbound and STOP -------------------------------------------------------------------------


@pytest.mark.anyio
async def test_inbound_reply_arrives_as_signed_message_received() -> None:
    async with running() as sim:
        response = await sim.client.post(
            "/_sim/inbound", json={"from": MEMBER, "to": CHURCH, "text": "Amen!"}
        )
        assert response.status_code == 202
        ids = response.json()["data"]
        [event] = await sim.receiver.wait_for(1)
        _verify(await sim.public_key(), *sim.receiver.hooks[0])
        assert event["data"]["event_type"] == "message.received"
        assert event["data"]["id"] == ids["event_id"]
        payload = event["data"]["payload"]
        assert payload["id"] == ids["id"]
        assert payload["direction"] == "inbound"
        assert payload["type"] == "SMS"
        assert payload["from"]["phone_number"] == MEMBER
        assert payload["to"][0] == {
            "phone_number": CHURCH,
            "status": "webhook_delivered",
            "carrier": "TELNYX LLC",
            "line_type": "VoIP",
        }
        assert payload["text"] == "Amen!"
        assert (payload["encoding"], payload["parts"]) == ("GSM-7", 1)
        _parse_time(payload["received_at"])

        bad = await sim.client.post("/_sim/inbound", json={"from": MEMBER, "to": CHURCH})
        assert bad.status_code == 422


@pytest.mark.anyio
async def test_stop_blocks_sends_until_start() -> None:
    async with running() as sim:

        async def reply(text: str) -> None:
            body = {"from": MEMBER, "to": CHURCH, "text": text}
            assert (await sim.client.post("/_sim/inbound", json=body)).status_code == 202

        await reply("Stop")
        blocked = await sim.send()
        assert blocked.status_code == 400
        [err] = blocked.json()["errors"]
        assert (err["code"], err["title"]) == ("40300", "Blocked due to STOP message")
        # Another member, or another church number, is unaffected.
        assert (await sim.send(to="+15550009999")).status_code == 200
        other_church = {"from": "+15550100002", "to": MEMBER, "text": "hi"}
        other = await sim.client.post("/v2/messages", json=other_church, headers=AUTH)
        assert other.status_code == 200

        await reply("START")
        assert (await sim.send()).status_code == 200
        assert (await sim.stats())["by_destination"] == {"+15550009999": 1, MEMBER: 2}


# -- control API ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_stats_config_and_reset() -> None:
    async with running() as sim:
        defaults = (await sim.client.get("/_sim/config")).json()
        assert defaults == {
            "latency_ms": [0, 0],
            "outcomes": {
                "delivered": 1.0,
                "sending_failed": 0.0,
                "delivery_failed": 0.0,
                "delivery_unconfirmed": 0.0,
            },
            "rate_limit_per_s": None,
            "outage": False,
            "duplicate_webhooks": 0.0,
            "reorder_webhooks": False,
            "drop_webhooks": 0.0,
        }
        updated = (await sim.configure(latency_ms=[1, 3], reorder_webhooks=True)).json()
        assert updated == {**defaults, "latency_ms": [1, 3], "reorder_webhooks": True}
        assert (await sim.configure(nonsense=True)).status_code == 422
        assert (await sim.configure(latency_ms=[3, 1])).status_code == 422
        assert (await sim.configure(duplicate_webhooks=1.5)).status_code == 422

        await sim.send(to="+15550000001")
        await sim.send(to="+15550000001")
        await sim.send(to="+15550000002")
        await sim.receiver.wait_for(6)
        stats = await sim.stats()
        assert stats["total"] == 3
        assert stats["by_destination"] == {"+15550000001": 2, "+15550000002": 1}
        assert stats["webhooks_sent"] == 6
        assert stats["webhooks_failed"] == 0

        assert (await sim.client.post("/_sim/reset")).status_code == 200
        stats = await sim.stats()
        assert (stats["total"], stats["by_destination"], stats["webhooks_sent"]) == (0, {}, 0)
        assert (await sim.client.get("/_sim/config")).json() == defaults


@pytest.mark.anyio
async def test_configured_seed_signs_with_its_public_key() -> None:
    seed = new_signing_seed()
    async with running(signing_seed=seed) as sim:
        served = (await sim.client.get("/_sim/public-key")).json()["public_key"]
        assert served == public_key_b64(seed)
        unknown = await sim.client.get("/v2/nothing-here")
        assert unknown.status_code == 404
        assert unknown.json()["errors"][0]["code"] == "10005"


def test_reordering_is_random_per_message() -> None:
    rng = random.Random(7)
    orders = {plan_events("delivered", rng, 0.0, True)[0].event_type for _ in range(50)}
    assert orders == {"message.sent", "message.finalized"}
    assert plan_events("delivered", rng, 0.0, False)[0].event_type == "message.sent"
