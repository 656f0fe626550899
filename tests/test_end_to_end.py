"""One broadcast through every layer, across two web nodes.

Two web processes share one Postgres and one Redis with one worker and the
simulator. A WebSocket client on node B follows ``message:<id>`` while the
broadcast is posted to node A; every recipient reaches ``delivered`` and the
client sees a ``message.recipient.status`` event for each; an SSE client on
node A sees ``message.progress``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import httpx
import pytest
import websockets

from deploy.stack import Stack, free_ports
from tests.conftest import Church, unique_phone

# Slow lane: several web nodes and a draining node.
pytestmark = pytest.mark.slow


MEMBERS = 100


def _spawn_node(stack: Stack, name: str, **env: str) -> int:
    """Another web process on the session's stores; returns its port once ready."""
    (port,) = free_ports(1)
    node_env = dict(stack.env)
    node_env.update(env)
    node_env["KOINONIA_HTTP_PORT"] = str(port)
    stack.spawn(name, "web", env=node_env)
    stack.wait_ready(f"http://127.0.0.1:{port}/health/ready")
    return port


@pytest.fixture(scope="module")
def node_b(stack: Stack) -> Iterator[str]:
    port = _spawn_node(stack, "web_b")
    yield f"127.0.0.1:{port}"
    stack.stop_process("web_b")


def _members(church: Church, count: int) -> str:
    group = church.group("Everyone")
    for _ in range(count):
        church.member(unique_phone(), [group])
    return group


async def _follow_ws(
    node: str,
    key: str,
    channel: str,
    ready: asyncio.Event,
    statuses: dict[str, list[str]],
    done: asyncio.Event,
) -> None:
    async with websockets.connect(
        f"ws://{node}/v1/realtime", additional_headers={"Authorization": f"Bearer {key}"}
    ) as ws:
        welcome = json.loads(await ws.recv())
        assert welcome["type"] == "welcome"
        await ws.send(json.dumps({"type": "subscribe", "id": "s1", "channel": channel}))
        while True:
            frame = json.loads(await ws.recv())
            if frame["type"] == "subscribed":
                assert frame["id"] == "s1"
                assert frame["channel"] == channel
                ready.set()
                continue
            assert frame["type"] == "event", frame
            event = frame["event"]
            if event["type"] == "message.recipient.status":
                data = event["data"]
                statuses.setdefault(data["recipient_id"], []).append(data["status"])
                if sum(1 for s in statuses.values() if "delivered" in s) == MEMBERS:
                    done.set()
                    return


async def _follow_sse(
    base: str,
    key: str,
    ready: asyncio.Event,
    progress: list[dict[str, object]],
    message_id: list[str],
    done: asyncio.Event,
) -> None:
    async with (
        httpx.AsyncClient(timeout=None) as client,
        client.stream(
            "GET",
            f"{base}/v1/events",
            params={"channel": "dashboard"},
            headers={"Authorization": f"Bearer {key}"},
        ) as stream,
    ):
        assert stream.status_code == 200
        event_name = ""
        async for line in stream.aiter_lines():
            if line.startswith("event:"):
                event_name = line.split(":", 1)[1].strip()
                if event_name == "ready":
                    ready.set()
            elif line.startswith("data:") and event_name == "message.progress":
                frame = json.loads(line.split(":", 1)[1])
                data = frame["event"]["data"]
                if message_id and data["message_id"] == message_id[0]:
                    progress.append(data)
                    if data["counts"]["delivered"] == MEMBERS:
                        done.set()
                        return


@pytest.fixture
def slow_provider(sim_url: str) -> Iterator[None]:
    """Receipts take 300-600 ms, so the WebSocket is subscribed before any arrives."""
    httpx.post(f"{sim_url}/_sim/config", json={"latency_ms": [300, 600]}).raise_for_status()
    yield
    httpx.post(f"{sim_url}/_sim/config", json={"latency_ms": [0, 0]}).raise_for_status()


@pytest.mark.anyio
@pytest.mark.usefixtures("slow_provider")
async def test_broadcast_across_two_nodes(church: Church, base_url: str, node_b: str) -> None:
    group = _members(church, MEMBERS)
    # A message id is only known after the POST, so the WebSocket subscribes to
    # the broadcast's channel right after the 202: recipients are materialized
    # and sent after it, and the channel's history covers any head start.
    sse_ready, sse_done = asyncio.Event(), asyncio.Event()
    progress: list[dict[str, object]] = []
    message_ref: list[str] = []
    sse = asyncio.create_task(
        _follow_sse(base_url, church.key, sse_ready, progress, message_ref, sse_done)
    )
    await asyncio.wait_for(sse_ready.wait(), 10)

    async with httpx.AsyncClient(
        base_url=base_url, headers={"Authorization": f"Bearer {church.key}"}
    ) as api:
        started = time.monotonic()
        answer = await api.post(
            "/v1/messages", json={"body": "Potluck on Sunday", "target": {"group_ids": [group]}}
        )
        assert answer.status_code == 202, answer.text
        message_id = answer.json()["data"]["id"]
        message_ref.append(message_id)
        assert answer.json()["data"]["recipient_count"] == MEMBERS

        statuses: dict[str, list[str]] = {}
        ws_ready, ws_done = asyncio.Event(), asyncio.Event()
        ws = asyncio.create_task(
            _follow_ws(node_b, church.key, f"message:{message_id}", ws_ready, statuses, ws_done)
        )
        await asyncio.wait_for(ws_ready.wait(), 10)

        deadline = started + 60
        while time.monotonic() < deadline:
            counts = (await api.get(f"/v1/messages/{message_id}")).json()["data"]["counts"]
            if counts["delivered"] == MEMBERS:
                break
            await asyncio.sleep(0.2)
        assert counts["delivered"] == MEMBERS, counts

    # Events published before the WebSocket subscribed are not replayed without
    # `since`; with receipts 300 ms away, every `delivered` comes after it.
    await asyncio.wait_for(ws_done.wait(), 30)
    await asyncio.wait_for(sse_done.wait(), 30)
    await ws
    await sse
    delivered = [rid for rid, seen in statuses.items() if "delivered" in seen]
    assert len(delivered) == MEMBERS
    for seen in statuses.values():
        assert seen == sorted(seen, key=["sending", "sent", "delivered"].index)
    assert progress[-1]["counts"]["delivered"] == MEMBERS  # type: ignore[index]


@pytest.mark.anyio
async def test_one_time_ticket_opens_one_connection(church: Church, base_url: str) -> None:
    async with httpx.AsyncClient() as client:
        answer = await client.post(
            f"{base_url}/v1/realtime/tickets", headers={"Authorization": f"Bearer {church.key}"}
        )
    assert answer.status_code == 201, answer.text
    data = answer.json()["data"]
    assert data["expires_in"] == 30
    ws_url = base_url.replace("http://", "ws://") + "/v1/realtime"
    async with websockets.connect(f"{ws_url}?ticket={data['ticket']}") as ws:
        assert json.loads(await ws.recv())["type"] == "welcome"
        await ws.send(json.dumps({"type": "subscribe", "id": "a", "channel": "dashboard"}))
        assert json.loads(await ws.recv())["type"] == "subscribed"
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with websockets.connect(f"{ws_url}?ticket={data['ticket']}"):
            pass
    assert refused.value.response.status_code == 401

    # A cookie session needs the CSRF token to mint one.
    cookies = dict(church.session.cookies)
    async with httpx.AsyncClient(base_url=base_url, cookies=cookies) as session:
        assert (await session.post("/v1/realtime/tickets")).status_code == 403
        minted = await session.post("/v1/realtime/tickets", headers={"X-CSRF-Token": church.csrf})
        assert minted.status_code == 201


async def _welcomed_within(url: str, headers: dict[str, str], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        async with websockets.connect(url, additional_headers=headers) as ws:
            try:
                if json.loads(await ws.recv())["type"] == "welcome":
                    return True
            except websockets.ConnectionClosed:
                pass
        await asyncio.sleep(0.05)
    return False


async def _read_until_closed(ws: websockets.ClientConnection) -> None:
    while True:
        await asyncio.wait_for(ws.recv(), 10)


@pytest.mark.anyio
async def test_draining_node_closes_websockets_with_1001(church: Church, stack: Stack) -> None:
    port = await asyncio.to_thread(_spawn_node, stack, "web_c")
    try:
        async with websockets.connect(
            f"ws://127.0.0.1:{port}/v1/realtime",
            additional_headers={"Authorization": f"Bearer {church.key}"},
        ) as ws:
            assert json.loads(await ws.recv())["type"] == "welcome"
            await ws.send(json.dumps({"type": "subscribe", "id": "d", "channel": "dashboard"}))
            assert json.loads(await ws.recv())["type"] == "subscribed"
            stack.processes["web_c"].terminate()
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await _read_until_closed(ws)
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 1001
    finally:
        await asyncio.to_thread(stack.stop_process, "web_c")


@pytest.mark.anyio
async def test_connections_beyond_the_church_limit_close_with_4029(
    church: Church, other_church: Church, stack: Stack
) -> None:
    port = await asyncio.to_thread(_spawn_node, stack, "web_d", KOINONIA_WS_MAX_PER_CHURCH="2")
    url = f"ws://127.0.0.1:{port}/v1/realtime"

    def auth(c: Church) -> dict[str, str]:
        return {"Authorization": f"Bearer {c.key}"}

    try:
        async with (
            websockets.connect(url, additional_headers=auth(church)) as first,
            websockets.connect(url, additional_headers=auth(church)) as second,
        ):
            for ws in (first, second):
                assert json.loads(await ws.recv())["type"] == "welcome"
            async with websockets.connect(url, additional_headers=auth(church)) as third:
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await _read_until_closed(third)
                assert closed.value.rcvd is not None
                assert closed.value.rcvd.code == 4029
            # Another church is counted on its own.
            async with websockets.connect(url, additional_headers=auth(other_church)) as theirs:
                assert json.loads(await theirs.recv())["type"] == "welcome"
        # Closed connections free their places (once the server has seen them go).
        assert await _welcomed_within(url, auth(church), 5.0)
    finally:
        await asyncio.to_thread(stack.stop_process, "web_d")
