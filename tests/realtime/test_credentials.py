"""Credentials ending during a connection, and typing indicators, across two web nodes.

The session's stack (tests/conftest.py) is node A; this module starts node B on
the same Postgres and Redis, with sessions that live 3 s when they are made
through it. WebSocket and SSE connections authenticated by a session, an API
key or a ticket close with 4001 (SSE: the stream ends) when their credentials
are revoked on any node, or when their session expires.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from deploy.stack import Stack, free_ports
from tests.conftest import Church, unique_phone

pytestmark = pytest.mark.anyio

PASSWORD = "correct horse battery"
SHORT_SESSION_S = 3


@pytest.fixture(scope="module")
def node_b(stack: Stack) -> Iterator[str]:
    (port,) = free_ports(1)
    env = dict(stack.env)
    env["KOINONIA_HTTP_PORT"] = str(port)
    env["KOINONIA_SESSION_TTL_S"] = str(SHORT_SESSION_S)
    stack.spawn("web_credentials", "web", env=env)
    stack.wait_ready(f"http://127.0.0.1:{port}/health/ready")
    yield f"http://127.0.0.1:{port}"
    stack.stop_process("web_credentials")


def login(base: str, church: Church) -> httpx.Client:
    """Another session of the church's owner (a second browser)."""
    client = httpx.Client(base_url=base, timeout=10.0)
    answer = client.post("/v1/auth/login", json={"email": church.email, "password": PASSWORD})
    assert answer.status_code == 200, answer.text
    client.headers["X-CSRF-Token"] = client.cookies["koinonia_csrf"]
    return client


def ws_url(base: str, ticket: str | None = None) -> str:
    url = base.replace("http://", "ws://") + "/v1/realtime"
    return f"{url}?ticket={ticket}" if ticket else url


def ticket(client: httpx.Client) -> str:
    answer = client.post("/v1/realtime/tickets")
    assert answer.status_code == 201, answer.text
    return str(answer.json()["data"]["ticket"])


@asynccontextmanager
async def connected(
    url: str, *, key: str | None = None, session: httpx.Client | str | None = None, origin: str = ""
) -> AsyncIterator[ClientConnection]:
    """A welcomed connection, by API key, session (a client or its cookie) or ticket (in url)."""
    headers = {}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    if session is not None:
        token = session if isinstance(session, str) else session.cookies["koinonia_session"]
        headers["Cookie"] = f"koinonia_session={token}"
        headers["Origin"] = origin
    async with websockets.connect(url, additional_headers=headers) as ws:
        assert (await receive(ws))["type"] == "welcome"
        yield ws


async def receive(ws: ClientConnection, within: float = 5.0) -> dict[str, Any]:
    with anyio.fail_after(within):
        frame: dict[str, Any] = json.loads(await ws.recv())
    return frame


async def subscribe(ws: ClientConnection, channel: str) -> dict[str, Any]:
    await ws.send(json.dumps({"type": "subscribe", "id": channel, "channel": channel}))
    frame = await receive(ws)
    assert frame["type"] == "subscribed", frame
    return frame


async def closed_with(ws: ClientConnection, within: float) -> int | None:
    """Read until the server closes; the close code (None if it never did)."""
    try:
        with anyio.fail_after(within):
            while True:
                await ws.recv()
    except websockets.ConnectionClosed:
        return ws.close_code
    except TimeoutError:
        return None


async def still_open(ws: ClientConnection) -> bool:
    await ws.send('{"type":"ping","id":"alive"}')
    try:
        while True:
            frame = await receive(ws, 2.0)
            if frame == {"type": "pong", "id": "alive"}:
                return True
    except (websockets.ConnectionClosed, TimeoutError):
        return False


async def test_logout_elsewhere_closes_its_connections_with_4001_on_every_node(
    church: Church, base_url: str, node_b: str
) -> None:
    other = login(base_url, church)  # a second browser of the same person
    token = other.cookies["koinonia_session"]
    try:
        async with (
            connected(ws_url(base_url), session=other, origin=base_url) as on_a,
            connected(ws_url(node_b, ticket(other))) as ticket_on_b,
            connected(ws_url(node_b), session=church.session, origin=base_url) as mine,
        ):
            for ws in (on_a, ticket_on_b, mine):
                await subscribe(ws, "inbox")
            started = time.monotonic()
            assert other.post("/v1/auth/logout").status_code == 200
            codes = await asyncio.gather(closed_with(on_a, 3), closed_with(ticket_on_b, 3))
            assert codes == [4001, 4001]
            assert time.monotonic() - started < 1.5
            assert await still_open(mine)  # the other session is not touched
        # The ended session no longer opens connections.
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with connected(ws_url(base_url), session=token, origin=base_url):
                pass
        assert refused.value.response.status_code == 401
    finally:
        other.close()


async def test_a_password_change_ends_the_other_sessions_connections(
    church: Church, base_url: str, node_b: str
) -> None:
    other = login(base_url, church)
    try:
        async with (
            connected(ws_url(node_b), session=other, origin=base_url) as theirs,
            connected(ws_url(base_url), session=church.session, origin=base_url) as mine,
        ):
            answer = church.session.post(
                "/v1/me/password",
                json={"current_password": PASSWORD, "new_password": PASSWORD + " again"},
            )
            assert answer.status_code == 200, answer.text
            assert await closed_with(theirs, 3) == 4001
            assert await still_open(mine)
    finally:
        other.close()


async def test_revoked_and_rotated_api_keys_close_with_4001(
    church: Church, base_url: str, node_b: str
) -> None:
    keys = []
    for name in ("revoked", "rotated"):
        answer = church.session.post("/v1/api-keys", json={"name": name})
        assert answer.status_code == 201, answer.text
        keys.append(answer.json()["data"])
    revoked, rotated = keys
    with httpx.Client(
        base_url=base_url, headers={"Authorization": f"Bearer {revoked['key']}"}
    ) as holder:
        revoked_ticket = ticket(holder)
    async with (
        connected(ws_url(node_b), key=revoked["key"]) as by_key,
        connected(ws_url(base_url, revoked_ticket)) as by_ticket,
        connected(ws_url(base_url), key=rotated["key"]) as by_rotated,
        connected(ws_url(node_b), key=church.key) as untouched,
    ):
        await subscribe(by_key, "dashboard")
        assert church.session.delete(f"/v1/api-keys/{revoked['id']}").status_code == 200
        codes = await asyncio.gather(closed_with(by_key, 3), closed_with(by_ticket, 3))
        assert codes == [4001, 4001]
        assert church.session.post(f"/v1/api-keys/{rotated['id']}/rotate").status_code == 200
        assert await closed_with(by_rotated, 3) == 4001
        assert await still_open(untouched)


async def test_an_sse_stream_ends_when_its_key_is_revoked(
    church: Church, base_url: str, node_b: str
) -> None:
    answer = church.session.post("/v1/api-keys", json={"name": "sse"})
    assert answer.status_code == 201, answer.text
    key = answer.json()["data"]
    async with (
        httpx.AsyncClient(timeout=10) as http,
        http.stream(
            "GET",
            f"{node_b}/v1/events",
            params={"channel": "inbox"},
            headers={"Authorization": f"Bearer {key['key']}"},
        ) as stream,
    ):
        assert stream.status_code == 200
        lines = stream.aiter_lines()
        with anyio.fail_after(5):
            while await anext(lines) != "event: ready":
                pass
        assert church.session.delete(f"/v1/api-keys/{key['id']}").status_code == 200
        with anyio.fail_after(3):
            rest = [line async for line in lines]  # the stream ends
        assert not any(line.startswith("event:") for line in rest)


async def test_a_session_connection_closes_when_the_session_expires(
    church: Church, base_url: str, node_b: str
) -> None:
    short = login(node_b, church)  # node B makes sessions of 3 s
    try:
        started = time.monotonic()
        async with connected(ws_url(node_b), session=short, origin=base_url) as ws:
            code = await closed_with(ws, SHORT_SESSION_S + 3)
        assert code == 4001
        assert time.monotonic() - started < SHORT_SESSION_S + 1.5
    finally:
        short.close()


# -- typing --------------------------------------------------------------------


def conversation(church: Church, sim_url: str) -> str:
    phone = unique_phone()
    church.member(phone)
    httpx.post(
        f"{sim_url}/_sim/inbound", json={"from": phone, "to": church.phone_number, "text": "Hi"}
    ).raise_for_status()
    found = church.conversations_when(1)
    assert found, "the reply never reached the inbox"
    return str(found[0]["id"])


async def test_typing_reaches_both_channels_on_another_node_and_is_never_stored(
    church: Church, other_church: Church, base_url: str, node_b: str, sim_url: str
) -> None:
    conversation_id = conversation(church, sim_url)
    channel = f"conversation:{conversation_id}"
    typing = json.dumps({"type": "typing", "conversation_id": conversation_id})
    async with (
        connected(ws_url(base_url), key=church.key) as watcher,
        connected(ws_url(node_b, ticket(church.session))) as typist,
    ):
        heads = {name: await subscribe(watcher, name) for name in (channel, "inbox")}
        for _ in range(3):  # one per second per conversation: the rest are dropped
            await typist.send(typing)
        # The inbound text's own events may still be on their way (the inbox listing
        # above reads Postgres; the relay publishes a moment later): they move the
        # offset a subscription stands at, and typing must carry that offset.
        stands_at = {name: head["offset"] for name, head in heads.items()}
        seen: list[dict[str, Any]] = []
        while len(seen) < 2:
            frame = await receive(watcher)
            assert frame["type"] == "event", frame
            if frame["event"]["type"] == "conversation.typing":
                seen.append(frame)
            else:
                stands_at[frame["channel"]] = frame["offset"]
        assert sorted(f["channel"] for f in seen) == sorted([channel, "inbox"])
        for frame in seen:
            assert frame["offset"] == stands_at[frame["channel"]]  # no new offset
            event = frame["event"]
            assert event["type"] == "conversation.typing"
            assert event["data"] == {"conversation_id": conversation_id, "user_id": church.user_id}
        await watcher.send('{"type":"ping","id":"after"}')
        assert await receive(watcher) == {"type": "pong", "id": "after"}  # nothing more came

        # Another church's conversation, or none at all: forbidden, nothing leaks.
        for foreign in (conversation(other_church, sim_url), str(uuid.uuid4())):
            await typist.send(json.dumps({"type": "typing", "conversation_id": foreign}))
            refused = await receive(typist)
            assert (refused["type"], refused["code"]) == ("error", "forbidden")
        # An API key has no user to show as typing.
        await watcher.send(typing)
        refused = await receive(watcher)
        assert (refused["type"], refused["code"]) == ("error", "forbidden")

    # Never stored: resuming from the offset the typing frames carried replays no typing.
    async with connected(ws_url(node_b), key=church.key) as again:
        for name in (channel, "inbox"):
            since = {"offset": heads[name]["offset"], "epoch": heads[name]["epoch"]}
            await again.send(json.dumps({"type": "subscribe", "channel": name, "since": since}))
            replayed = []
            while (frame := await receive(again))["type"] == "event":
                replayed.append(frame["event"]["type"])
            assert frame["type"] == "subscribed", frame
            assert frame["recovered"] is True
            assert "conversation.typing" not in replayed
