"""Who is here: staff presence and conversation viewers (docs/protocol.md "The inbox").

Two levels, on a standalone Redis and on a Redis Cluster alike:

- the store and a node's ``Presence`` against a real Redis with hubs listening,
  time compressed (heartbeats of a tenth of a second): events, the snapshot, and
  a node that dies without a word;
- the assembled stack: two staff sessions over WebSocket and SSE, an API key,
  another church, ``GET /v1/presence``, history and webhooks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import msgspec
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from deploy.stack import Stack
from realtime.hub import Hub, HubEvent
from realtime.presence import Presence
from storage.domain.events import AnyEvent
from storage.redis import key_names
from storage.redis.connection import Redis
from storage.redis.presence import Connection, PresenceStore, presence_key, timestamp
from storage.redis.publisher import EventPublisher
from tests.api.staff_support import join, sql
from tests.conftest import Church, texted_in, wait_until
from tests.realtime.conftest import REDIS_KINDS

pytestmark = pytest.mark.anyio

PRESENCE_TYPES = ("staff.presence", "conversation.viewers")


@pytest.fixture(params=REDIS_KINDS)
def redis_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class Recorder:
    """A hub sink keeping the events' decoded payloads."""

    def __init__(self) -> None:
        self.events: list[tuple[HubEvent, Any]] = []
        self._changed = asyncio.Event()

    def deliver(self, event: HubEvent) -> None:
        decoded = msgspec.json.decode(event.frame)
        msgspec.json.decode(json.dumps(decoded["event"]), type=AnyEvent)  # a valid event
        self.events.append((event, decoded["event"]))
        self._changed.set()

    async def next(self, within: float = 5.0) -> tuple[HubEvent, Any]:
        with anyio.fail_after(within):
            while not self.events:
                self._changed.clear()
                await self._changed.wait()
        return self.events.pop(0)


@contextlib.asynccontextmanager
async def listening(hub: Hub, church_id: uuid.UUID, channel: str) -> AsyncIterator[Recorder]:
    recorder = Recorder()
    await hub.subscribe(church_id, channel, recorder)
    try:
        yield recorder
    finally:
        hub.unsubscribe(church_id, channel, recorder)


async def test_the_store_publishes_what_changed_and_reads_a_snapshot(
    hub: Hub, publisher: EventPublisher, redis: Redis, church_id: uuid.UUID
) -> None:
    store = PresenceStore(publisher)
    ana, ben = uuid.uuid4(), uuid.uuid4()
    conversation = uuid.uuid4()
    async with (
        listening(hub, church_id, "inbox") as inbox,
        listening(hub, church_id, f"conversation:{conversation}") as thread,
    ):
        since = timestamp()
        viewing = Connection(id="c1", user_id=ana, conversation_id=conversation, since=since)
        await store.run([store.sync_call(church_id, "node-a", [viewing], 10_000)])
        online, _ = await inbox.next()
        assert online.ephemeral
        assert online.type == "staff.presence"
        event, viewers = await inbox.next()
        assert event.type == "conversation.viewers"
        assert event.ephemeral
        assert viewers["data"] == {
            "conversation_id": str(conversation),
            "viewers": [{"user_id": str(ana), "since": since}],
        }
        _, same = await thread.next()
        assert same == viewers  # one event, on both channels
        # Ben on another node, in two tabs; Ana's state restated: only Ben is news.
        tabs = [Connection(id=f"b{i}", user_id=ben) for i in range(2)]
        await store.run([store.sync_call(church_id, "node-b", tabs, 10_000)])
        await store.run([store.sync_call(church_id, "node-a", [viewing], 10_000)])
        _, ben_online = await inbox.next()
        assert ben_online["data"] == {"user_id": str(ben), "status": "online"}
        snapshot = await store.read(church_id)
        assert sorted(snapshot.online) == sorted([ana, ben])
        assert snapshot.viewers == {str(conversation): [ana]}
        # Node A states it has nothing left: Ana goes offline, the viewers empty.
        await store.run([store.sync_call(church_id, "node-a", [], 10_000)])
        _, offline = await inbox.next()
        assert offline["data"] == {"user_id": str(ana), "status": "offline"}
        _, empty = await inbox.next()
        assert empty["data"] == {"conversation_id": str(conversation), "viewers": []}
        assert (await thread.next())[1] == empty
        assert not inbox.events
        history = key_names.channel_history(church_id, "inbox")
        assert await redis.xlen(history) == 0  # realtime only: nothing stored
        assert await redis.pttl(presence_key(church_id)) > 0  # the hash expires by itself


async def test_a_church_with_thousands_of_connections(
    publisher: EventPublisher, redis: Redis, church_id: uuid.UUID
) -> None:
    """More entries than one Lua call can unpack at once, written and removed."""
    store = PresenceStore(publisher)
    users = [uuid.uuid4() for _ in range(3)]
    tabs = [Connection(id=f"c{i}", user_id=users[i % 3]) for i in range(4500)]
    await store.run([store.sync_call(church_id, "node", tabs, 10_000)])
    assert await redis.hlen(presence_key(church_id)) == 4500
    assert (await store.read(church_id)).online == sorted(users)
    await store.run([store.sync_call(church_id, "node", [], 10_000)])
    assert await redis.hlen(presence_key(church_id)) == 0


async def test_a_node_that_dies_takes_its_staff_offline(
    hub: Hub, publisher: EventPublisher, church_id: uuid.UUID
) -> None:
    """Node A stops writing without a word (killed); node B, which only serves an API
    key of the church, sweeps A's entries once they expire."""
    store = PresenceStore(publisher)
    node_a = Presence(store, heartbeat_s=0.1, ttl_s=0.5, node="a")
    node_b = Presence(store, heartbeat_s=0.1, ttl_s=0.5, node="b")
    ana, conversation = uuid.uuid4(), uuid.uuid4()
    try:
        async with listening(hub, church_id, "inbox") as inbox:
            node_a.open(church_id, "a1", ana)
            node_a.view(church_id, "a1", conversation)
            node_b.open(church_id, "b1", None)
            assert (await inbox.next())[1]["data"]["status"] == "online"
            _, viewers = await inbox.next()
            assert [v["user_id"] for v in viewers["data"]["viewers"]] == [str(ana)]
            await asyncio.sleep(0.8)  # heartbeats keep A's entries alive past their ttl
            assert not inbox.events
            assert (await store.read(church_id)).online == [ana]
            await node_a.stop()  # killed: nothing written, nothing removed
            loop = asyncio.get_running_loop()
            killed = loop.time()
            _, offline = await inbox.next(within=3.0)
            assert offline["data"] == {"user_id": str(ana), "status": "offline"}
            assert loop.time() - killed <= 0.5 + 0.1 + 0.3  # ttl + one heartbeat + slack
            _, left = await inbox.next()
            assert left["data"]["viewers"] == []
            snapshot = await store.read(church_id)
            assert snapshot.online == []
            assert snapshot.viewers == {}
    finally:
        node_b.close(church_id, "b1")
        await node_a.stop()
        await node_b.stop()


# -- the assembled stack -------------------------------------------------------------


def _ws(base_url: str) -> str:
    return base_url.replace("http://", "ws://") + "/v1/realtime"


@contextlib.asynccontextmanager
async def _connected(
    base_url: str, *, key: str | None = None, session: httpx.Client | None = None
) -> AsyncIterator[ClientConnection]:
    headers = {}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    if session is not None:
        headers["Cookie"] = f"koinonia_session={session.cookies['koinonia_session']}"
        headers["Origin"] = base_url
    async with websockets.connect(_ws(base_url), additional_headers=headers) as ws:
        assert (await _receive(ws))["type"] == "welcome"
        yield ws


async def _receive(ws: ClientConnection, within: float = 5.0) -> dict[str, Any]:
    with anyio.fail_after(within):
        frame: dict[str, Any] = json.loads(await ws.recv())
    return frame


async def _subscribe(ws: ClientConnection, channel: str) -> dict[str, Any]:
    await ws.send(json.dumps({"type": "subscribe", "id": channel, "channel": channel}))
    frame = await _receive(ws)
    assert frame["type"] == "subscribed", frame
    return frame


async def _next_of(ws: ClientConnection, kind: str, channel: str = "inbox") -> dict[str, Any]:
    """The next event of ``kind`` on ``channel`` (other events pass by: the inbound
    text's own arrive whenever the relay sends them)."""
    while True:
        frame = await _receive(ws)
        if frame.get("channel") == channel and frame["event"]["type"] == kind:
            event: dict[str, Any] = frame["event"]
            return event


async def _error_code(ws: ClientConnection) -> str:
    """The code of the next ``error`` frame (events before it pass by)."""
    while (frame := await _receive(ws))["type"] != "error":
        pass
    return str(frame["code"])


def _viewers(event: dict[str, Any]) -> list[str]:
    return [v["user_id"] for v in event["data"]["viewers"]]


async def _sse_until(client: httpx.AsyncClient, seen: asyncio.Event) -> None:
    async with client.stream("GET", "/v1/events", params={"channel": "dashboard"}) as response:
        assert response.status_code == 200
        seen.set()
        async for _ in response.aiter_lines():
            pass


async def test_viewers_and_presence_across_sessions(
    any_church: Church, any_stack: Stack, any_base_url: str, any_sim_url: str
) -> None:
    church, base_url = any_church, any_base_url
    other_church = await asyncio.to_thread(Church, base_url)
    # Webhooks of every type: presence must never be among what they record.
    hooked = church.api.post(
        "/v1/webhook-endpoints", json={"url": "http://127.0.0.1:9/hook", "events": ["*"]}
    )
    assert hooked.status_code == 201, hooked.text
    _, conversation = await asyncio.to_thread(texted_in, church, any_sim_url)
    _, foreign = await asyncio.to_thread(texted_in, other_church, any_sim_url)
    staff, staff_user = await asyncio.to_thread(join, church, any_stack, base_url, "staff")
    owner, other = church.user_id, staff_user["id"]
    try:
        async with _connected(base_url, key=church.key) as watcher:
            start = await _subscribe(watcher, "inbox")
            async with _connected(base_url, session=church.session) as mine:
                assert (await _next_of(watcher, "staff.presence"))["data"] == {
                    "user_id": owner,
                    "status": "online",
                }
                async with _connected(base_url, session=staff) as theirs_ws:
                    online = await _next_of(watcher, "staff.presence")
                    assert online["data"] == {"user_id": other, "status": "online"}
                    await _subscribe(theirs_ws, f"conversation:{conversation}")
                    await mine.send(
                        json.dumps({"type": "viewing", "conversation_id": conversation})
                    )
                    first = await _next_of(watcher, "conversation.viewers")
                    assert first["data"]["conversation_id"] == conversation
                    assert _viewers(first) == [owner]
                    same = await _next_of(
                        theirs_ws, "conversation.viewers", f"conversation:{conversation}"
                    )
                    assert same["id"] == first["id"]
                    await theirs_ws.send(
                        json.dumps({"type": "viewing", "conversation_id": conversation})
                    )
                    assert _viewers(await _next_of(watcher, "conversation.viewers")) == [
                        owner,
                        other,
                    ]
                    presence = church.api.get("/v1/presence")
                    assert presence.status_code == 200, presence.text
                    assert presence.json()["data"] == {
                        "online": sorted([owner, other]),
                        "viewers": {conversation: [owner, other]},
                    }

                    # Refused, and nothing changes: an API key, another church's
                    # conversation, one that does not exist, a malformed frame.
                    await watcher.send(json.dumps({"type": "viewing", "conversation_id": None}))
                    assert await _error_code(watcher) == "forbidden"
                    for refused in (foreign, str(uuid.uuid4())):
                        frame = {"type": "viewing", "conversation_id": refused}
                        await mine.send(json.dumps(frame))
                        assert await _error_code(mine) == "forbidden"
                    await mine.send('{"type":"viewing"}')
                    assert await _error_code(mine) == "bad_frame"
                    assert church.api.get("/v1/presence").json()["data"]["viewers"] == {
                        conversation: [owner, other]
                    }
                    assert other_church.api.get("/v1/presence").json()["data"] == {
                        "online": [],
                        "viewers": {},
                    }

                    await mine.send(json.dumps({"type": "viewing", "conversation_id": None}))
                    assert _viewers(await _next_of(watcher, "conversation.viewers")) == [other]
                # The staff member's only connection closed: offline, and not viewing.
                events = [await _next_of(watcher, t) for t in PRESENCE_TYPES]
                assert events[0]["data"] == {"user_id": other, "status": "offline"}
                assert _viewers(events[1]) == []

                # SSE counts too: the staff member online while the stream lasts.
                async with httpx.AsyncClient(
                    base_url=base_url, cookies=dict(staff.cookies), timeout=10
                ) as sse:
                    seen = asyncio.Event()
                    stream = asyncio.create_task(_sse_until(sse, seen))
                    try:
                        back = await _next_of(watcher, "staff.presence")
                        assert back["data"] == {"user_id": other, "status": "online"}
                    finally:
                        stream.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await stream
                    gone = await _next_of(watcher, "staff.presence")
                    assert gone["data"] == {"user_id": other, "status": "offline"}
                    assert seen.is_set()
            gone = await _next_of(watcher, "staff.presence")
            assert gone["data"] == {"user_id": owner, "status": "offline"}
            assert church.api.get("/v1/presence").json()["data"] == {"online": [], "viewers": {}}

        # Never in history: a client resuming from before all this is told of none.
        async with _connected(base_url, key=church.key) as later:
            since = {"offset": start["offset"], "epoch": start["epoch"]}
            await later.send(
                json.dumps({"type": "subscribe", "id": "r", "channel": "inbox", "since": since})
            )
            replayed = []
            while (frame := await _receive(later))["type"] == "event":
                replayed.append(frame["event"]["type"])
            assert frame["type"] == "subscribed"
            assert frame["recovered"] is True
            assert not set(replayed) & set(PRESENCE_TYPES)
    finally:
        staff.close()
        other_church.close()

    # Never to webhooks, although the endpoint recorded the inbound text's events.
    def recorded() -> list[str]:
        rows = sql(any_stack, "SELECT type FROM webhook_event WHERE church_id = %s", (church.id,))
        return [row[0] for row in rows]

    await asyncio.to_thread(
        wait_until, lambda: "conversation.message.created" in recorded(), 10, "hooked"
    )
    assert not set(recorded()) & set(PRESENCE_TYPES)
    refused = church.api.post(
        "/v1/webhook-endpoints", json={"url": "http://127.0.0.1:9/x", "events": ["staff.presence"]}
    )
    assert refused.status_code == 422
