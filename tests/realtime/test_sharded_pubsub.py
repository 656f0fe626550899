"""The hub on a standalone Redis and on a Redis Cluster (sharded pub/sub).

The same assertions run against both where the behaviour is shared: events and
typing reach a node's sinks, and a node subscribes to the channels of the
churches it serves and nothing else. On the cluster only: one pub/sub connection
per master, a failover of the master owning a church's slot in the middle of a
stream, and a slot migrated to another master under traffic. WebSocket and SSE
clients are served by the endpoints' test server (``tests.realtime.test_endpoints``).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any, cast

import anyio
import httpx
import pytest
from redis.exceptions import RedisError

from realtime.hub import Hub
from realtime.typing_indicator import publish_typing
from storage.domain.events import ConversationTyping, ConversationTypingEvent
from storage.process.settings import RedisSettings
from storage.redis import key_names
from storage.redis.connection import Redis, is_cluster, open_redis
from storage.redis.publisher import EventPublisher
from tests.realtime.test_endpoints import (
    AUTH,
    CHANNELS,
    next_event,
    receive,
    serving,
    sse_events,
)
from tests.realtime.test_endpoints import client as ws_client
from tests.realtime.test_hub import Recorder
from tests.redis_cluster_support import RedisClusterHandle, slot_of

pytestmark = pytest.mark.anyio


class OffsetRecorder(Recorder):
    """A ``Recorder`` that also waits for the offsets of stored events."""

    async def wait_for_offsets(self, offsets: set[str], within: float) -> None:
        with anyio.fail_after(within):
            while not offsets <= set(self.offsets):
                self._changed.clear()
                await self._changed.wait()

    @property
    def offsets(self) -> list[str]:
        return [event.offset for event in self.events if not event.ephemeral]


class Backend:
    def __init__(self, settings: RedisSettings, cluster: RedisClusterHandle | None) -> None:
        self.settings = settings
        self.cluster = cluster


@pytest.fixture(params=["standalone", "cluster"])
def backend(request: pytest.FixtureRequest) -> Backend:
    # The cluster starts only when a cluster case runs (its fixture is lazy).
    if request.param == "standalone":
        return Backend(RedisSettings(url=request.getfixturevalue("redis_url")), None)
    handle: RedisClusterHandle = request.getfixturevalue("redis_cluster")
    return Backend(handle.settings, handle)


@pytest.fixture
async def client(backend: Backend) -> AsyncIterator[Redis]:
    redis = open_redis(backend.settings)
    yield redis
    await redis.aclose()


@pytest.fixture
async def node(backend: Backend, client: Redis) -> AsyncIterator[Hub]:
    hub = Hub(backend.settings, EventPublisher(client), client)
    await hub.start()
    yield hub
    await hub.stop()


async def publish(publisher: EventPublisher, church_id: uuid.UUID, channel: str) -> str:
    data = ConversationTyping(conversation_id=uuid.uuid4(), user_id=uuid.uuid4())
    published = await publisher.publish(church_id, channel, ConversationTypingEvent.new(data))
    return published.offset


async def test_events_and_typing_reach_the_sinks(
    backend: Backend, client: Redis, node: Hub, church_id: uuid.UUID
) -> None:
    publisher = node.publisher
    assert publisher.publish_command == ("SPUBLISH" if backend.cluster else "PUBLISH")
    conversation = uuid.uuid4()
    channel = f"conversation:{conversation}"
    recorders = {name: OffsetRecorder() for name in ("inbox", "dashboard", channel)}
    for name, recorder in recorders.items():
        await node.subscribe(church_id, name, recorder)
    published: dict[str, list[str]] = {name: [] for name in recorders}
    for i in range(30):
        name = list(recorders)[i % 3]
        published[name].append(await publish(publisher, church_id, name))
    for name, recorder in recorders.items():
        await recorder.wait_for(len(published[name]))
        assert recorder.offsets == published[name]
    # Typing: pub/sub only, at the channel's latest offset.
    await publish_typing(publisher, church_id, conversation, uuid.uuid4())
    typed = await recorders[channel].wait_for(len(published[channel]) + 1)
    assert typed[-1].ephemeral
    assert typed[-1].offset == published[channel][-1]


async def test_a_node_subscribes_only_the_channels_of_its_churches(
    backend: Backend, client: Redis, node: Hub
) -> None:
    ours, other = uuid.uuid4(), uuid.uuid4()
    names = ["inbox", "dashboard", *(f"message:{uuid.uuid4()}" for _ in range(20))]
    recorder = OffsetRecorder()
    for name in names:
        await node.subscribe(ours, name, recorder)
    await publish(node.publisher, other, "inbox")
    theirs = await publish(node.publisher, ours, "inbox")
    await recorder.wait_for(1)
    await asyncio.sleep(0.05)  # the other church's event would have arrived by now
    assert [e.offset for e in recorder.events] == [theirs]

    subscribed = node.subscribed_channels()
    channels = {n for per_link in subscribed.values() for n in per_link}
    assert channels == {key_names.channel_pubsub(ours, n).encode() for n in names}
    if backend.cluster is None:
        counts = await client.pubsub_numsub(
            key_names.channel_pubsub(ours, "inbox"), key_names.channel_pubsub(other, "inbox")
        )
        assert [int(c) for _, c in counts] == [1, 0]
        return
    cluster = backend.cluster
    # One pub/sub connection per master, each holding the channels of its slots.
    masters = {m.address: m for m in cluster.masters()}
    assert set(subscribed) == set(masters)
    for address, per_link in subscribed.items():
        for channel_name in per_link:
            assert cluster.master_of(channel_name).address == address
    for church, expected in ((ours, 1), (other, 0)):
        name = key_names.channel_pubsub(church, "inbox")
        with cluster.master_of(name).client() as admin:
            reply: Any = admin.execute_command("PUBSUB", "SHARDNUMSUB", name)
        assert int(reply[1]) == expected
    # Not one connection per channel: each master sees one sharded subscriber.
    for master in masters.values():
        with master.client() as admin:
            listed: Any = admin.execute_command("CLIENT", "LIST", "TYPE", "pubsub")
        text = listed.decode() if isinstance(listed, bytes) else str(listed)
        sharded = [line for line in text.splitlines() if "ssub=0" not in line]
        assert len(sharded) <= 1, text


async def _publish_until(
    publisher: EventPublisher,
    church_id: uuid.UUID,
    acked: list[str],
    errors: list[BaseException],
    stop: asyncio.Event,
) -> None:
    """Publish to ``inbox`` until told to stop, recording what Redis acknowledged;
    a failed publish is retried, as the event log's relay does."""
    while not stop.is_set():
        try:
            acked.append(await publish(publisher, church_id, "inbox"))
        except (RedisError, OSError) as exc:
            errors.append(exc)
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.002)


async def _until(predicate: Any, within: float) -> None:
    with anyio.fail_after(within):
        while not predicate():  # noqa: ASYNC110 (state changed by another task)
            await asyncio.sleep(0.02)


@pytest.mark.slow
async def test_failover_of_the_churchs_master_mid_stream_loses_nothing_kept(
    redis_cluster: RedisClusterHandle, church_id: uuid.UUID
) -> None:
    settings = redis_cluster.settings
    redis = open_redis(settings)
    assert is_cluster(redis)
    hub = Hub(settings, EventPublisher(redis), redis)
    await hub.start()
    name = key_names.channel_pubsub(church_id, "inbox")
    killed = None
    try:
        recorder = OffsetRecorder()
        await hub.subscribe(church_id, "inbox", recorder)
        acked: list[str] = []
        errors: list[BaseException] = []
        stop = asyncio.Event()
        task = asyncio.create_task(_publish_until(hub.publisher, church_id, acked, errors, stop))
        await _until(lambda: len(acked) >= 50, 10)
        killed = await asyncio.to_thread(redis_cluster.kill_master_of, name)
        after = len(acked)
        await _until(lambda: len(acked) >= after + 50, 30)
        stop.set()
        await task
        # Replication is asynchronous: the promoted replica may lack the last
        # entries the dead master acknowledged. What it kept must all arrive.
        history = cast(
            list[tuple[bytes, dict[bytes, bytes]]],
            await redis.xrange(key_names.channel_history(church_id, "inbox")),
        )
        kept = {entry_id.decode() for entry_id, _ in history}
        await recorder.wait_for_offsets(kept & set(acked), within=20)
        await asyncio.sleep(0.2)  # a duplicate would arrive now
        offsets = recorder.offsets
        assert len(offsets) == len(set(offsets)), "an event was delivered twice"
        assert offsets == sorted(offsets, key=lambda o: tuple(int(p) for p in o.split("-")))
        assert set(offsets) <= kept | set(acked)
        assert hub.moved_channels >= 1
        assert name.encode() in hub.subscribed_channels()[redis_cluster.master_of(name).address]
    finally:
        await hub.stop()
        await redis.aclose()
        if killed is not None:
            await asyncio.to_thread(redis_cluster.restart, killed)


@pytest.mark.slow
async def test_a_slot_moved_under_traffic_is_followed_to_its_new_master(
    redis_cluster: RedisClusterHandle, church_id: uuid.UUID
) -> None:
    settings = redis_cluster.settings
    redis = open_redis(settings)
    hub = Hub(settings, EventPublisher(redis), redis)
    await hub.start()
    name = key_names.channel_pubsub(church_id, "inbox")
    try:
        recorder = OffsetRecorder()
        await hub.subscribe(church_id, "inbox", recorder)
        acked: list[str] = []
        errors: list[BaseException] = []
        stop = asyncio.Event()
        task = asyncio.create_task(_publish_until(hub.publisher, church_id, acked, errors, stop))
        await _until(lambda: len(acked) >= 30, 10)
        target = redis_cluster.other_master(name)
        await asyncio.to_thread(redis_cluster.move_slot, slot_of(name), target)
        after = len(acked)
        await _until(lambda: len(acked) >= after + 30, 20)
        stop.set()
        await task
        await recorder.wait_for_offsets(set(acked), within=20)
        await asyncio.sleep(0.2)
        # Every event, once, in order; the node met the move (the old master ended
        # the subscription) and now listens on the new owner.
        assert recorder.offsets == acked
        assert hub.moved_channels >= 1
        assert name.encode() in hub.subscribed_channels()[target.address]
    finally:
        await hub.stop()
        await redis.aclose()


async def test_websocket_and_sse_clients_get_live_and_missed_events(
    backend: Backend, client: Redis, church_id: uuid.UUID
) -> None:
    # The endpoints' own test server; on a cluster its hub routes by the client's
    # slot map (the URL it is given is not used then).
    url = backend.settings.url
    async with serving(url, client, church_id) as server:
        publisher = server.services.publisher
        missed = [await server.publish("inbox") for _ in range(3)]
        epoch = (await publisher.head(church_id, "inbox")).epoch
        async with ws_client(server) as ws:
            since = {"offset": missed[0], "epoch": epoch}
            await ws.send(
                json.dumps({"type": "subscribe", "id": "r1", "channel": "inbox", "since": since})
            )
            replayed = [await receive(ws) for _ in range(2)]
            assert [f["offset"] for f in replayed] == missed[1:]
            subscribed = await receive(ws)
            assert subscribed["recovered"] is True
            live = [await server.publish("inbox") for _ in range(5)]
            assert [(await receive(ws))["offset"] for _ in live] == live

        async with (
            httpx.AsyncClient(base_url=server.http, timeout=10) as http,
            http.stream("GET", "/v1/events", params=CHANNELS, headers=AUTH) as response,
        ):
            events = sse_events(response)
            assert (await next_event(events))["event"] == "ready"
            offsets = [await server.publish("dashboard") for _ in range(3)]
            received = [json.loads((await next_event(events))["data"]) for _ in offsets]
            assert [f["offset"] for f in received] == offsets
        await server.drained("inbox")
        await server.drained("dashboard")
