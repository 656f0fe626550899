"""The hub against a real Redis: fan-out across nodes, refcounts, reconnection.

Every test runs on a standalone Redis (classic pub/sub) and on the session's Redis
Cluster (sharded pub/sub, one connection per master), with the same assertions:
``redis_kind`` below parametrizes the conftest's ``redis`` and ``hub``."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any, cast

import anyio
import msgspec
import pytest
from redis.asyncio.cluster import RedisCluster

from realtime.hub import Hub, HubEvent
from realtime.typing_indicator import publish_typing
from storage.domain.events import ConversationTyping, ConversationTypingEvent, frame_bytes
from storage.process.settings import RedisSettings
from storage.redis import key_names
from storage.redis.connection import Redis, is_cluster
from storage.redis.publisher import EventPublisher
from tests.realtime.conftest import CLIENT_NAME, REDIS_KINDS

pytestmark = pytest.mark.anyio


@pytest.fixture(params=REDIS_KINDS)
def redis_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class Recorder:
    """A hub sink that records what it is given."""

    def __init__(self) -> None:
        self.events: list[HubEvent] = []
        self._changed = asyncio.Event()

    def deliver(self, event: HubEvent) -> None:
        self.events.append(event)
        self._changed.set()

    async def wait_for(self, count: int, within: float = 10.0) -> list[HubEvent]:
        with anyio.fail_after(within):
            while len(self.events) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.events

    @property
    def offsets(self) -> list[str]:
        return [event.offset for event in self.events]


async def publish(publisher: EventPublisher, church_id: uuid.UUID, channel: str) -> str:
    data = ConversationTyping(conversation_id=uuid.uuid4(), user_id=uuid.uuid4())
    published = await publisher.publish(church_id, channel, ConversationTypingEvent.new(data))
    return published.offset


async def numsub(redis: Redis, church_id: uuid.UUID, channel: str) -> int:
    """Subscribers of the channel: PUBSUB NUMSUB, or on a cluster SHARDNUMSUB asked of
    the master owning its slot (sharded subscriptions live there alone)."""
    name = key_names.channel_pubsub(church_id, channel)
    if isinstance(redis, RedisCluster):
        node = redis.get_node_from_key(name)
        reply = await redis.pubsub_shardnumsub(name, target_nodes=node)
    else:
        reply = await redis.pubsub_numsub(name)
    return int(reply[0][1])


async def kill_pubsub(redis: Redis) -> int:
    """Cut the hubs' pub/sub connections (on a cluster, on every master); how many.

    Only this module's (named ``CLIENT_NAME`` by the conftest's settings): on the
    cluster, the session's cluster stack has pub/sub connections too, which would
    inflate the count."""
    cluster = cast(RedisCluster, redis) if is_cluster(redis) else None
    killed = 0
    for node in [None] if cluster is None else cluster.get_primaries():
        where: dict[str, Any] = {} if node is None else {"target_nodes": node}
        clients = await redis.client_list(_type="pubsub", **where)
        for client in clients:
            if client.get("name") == CLIENT_NAME:
                killed += int(await redis.client_kill_filter(_id=client["id"], **where))
    return killed


async def test_two_nodes_deliver_the_same_bytes_in_order(
    redis_settings: RedisSettings, redis: Redis, publisher: EventPublisher, church_id: uuid.UUID
) -> None:
    nodes = [Hub(redis_settings, publisher, redis) for _ in range(2)]
    for node in nodes:
        await node.start()
    try:
        first, second, other = Recorder(), Recorder(), Recorder()
        await nodes[0].subscribe(church_id, "inbox", first)
        await nodes[0].subscribe(church_id, "inbox", second)
        await nodes[1].subscribe(church_id, "inbox", other)
        # subscribe() returned after Redis confirmed: publishing now cannot be missed.
        offsets = [await publish(publisher, church_id, "inbox") for _ in range(20)]
        for recorder in (first, second, other):
            await recorder.wait_for(20)
            assert recorder.offsets == offsets
        # One object per event per node, so every connection gets the same bytes.
        assert all(a is b for a, b in zip(first.events, second.events, strict=True))
        assert [e.frame for e in first.events] == [e.frame for e in other.events]
        history = cast(list[Any], await redis.xrange(key_names.channel_history(church_id, "inbox")))
        expected = [frame_bytes("inbox", i.decode(), f[b"e"]) for i, f in history]
        assert [e.frame for e in other.events] == expected
        assert first.events[0].text == expected[0].decode()
        assert first.events[0].type == "conversation.typing"
    finally:
        for node in nodes:
            await node.stop()


async def test_subscriptions_are_reference_counted(
    hub: Hub, redis: Redis, church_id: uuid.UUID
) -> None:
    a, b = Recorder(), Recorder()
    await hub.subscribe(church_id, "dashboard", a)
    await hub.subscribe(church_id, "dashboard", b)
    assert await numsub(redis, church_id, "dashboard") == 1
    assert hub.subscriber_count(church_id, "dashboard") == 2
    hub.unsubscribe(church_id, "dashboard", a)
    await asyncio.sleep(0.05)
    assert await numsub(redis, church_id, "dashboard") == 1
    hub.unsubscribe(church_id, "dashboard", b)
    with anyio.fail_after(5):
        while await numsub(redis, church_id, "dashboard"):  # noqa: ASYNC110 (Redis state)
            await asyncio.sleep(0.01)
    # And back again: a fresh subscription is confirmed before subscribe() returns.
    await hub.subscribe(church_id, "dashboard", a)
    assert await numsub(redis, church_id, "dashboard") == 1


async def test_nothing_is_lost_or_repeated_across_reconnections(
    hub: Hub, redis: Redis, publisher: EventPublisher, church_id: uuid.UUID
) -> None:
    recorders = {channel: Recorder() for channel in ("inbox", "dashboard")}
    for channel, recorder in recorders.items():
        await hub.subscribe(church_id, channel, recorder)
    published: dict[str, list[str]] = {channel: [] for channel in recorders}
    kills = 0

    async def keep_publishing() -> None:
        for i in range(300):
            channel = "inbox" if i % 3 else "dashboard"
            published[channel].append(await publish(publisher, church_id, channel))
            await asyncio.sleep(0.001)

    async def keep_killing() -> None:
        nonlocal kills
        # A kill while the hub is still reconnecting finds no pub/sub client (a busy
        # machine reconnects slower): keep going until four connections were cut.
        for _ in range(40):
            if kills >= 4:
                return
            await asyncio.sleep(0.06)
            kills += await kill_pubsub(redis)

    async with anyio.create_task_group() as tg:
        tg.start_soon(keep_publishing)
        tg.start_soon(keep_killing)
    assert kills >= 4
    for channel, recorder in recorders.items():
        await recorder.wait_for(len(published[channel]))
        await asyncio.sleep(0.05)  # anything extra (a duplicate) would arrive now
        assert recorder.offsets == published[channel]


async def test_an_unconfirmed_subscription_waits_for_the_connection(
    hub: Hub, redis: Redis, publisher: EventPublisher, church_id: uuid.UUID
) -> None:
    assert await kill_pubsub(redis) >= 1
    recorder = Recorder()
    await hub.subscribe(church_id, "inbox", recorder)  # returns once resubscribed
    offset = await publish(publisher, church_id, "inbox")
    await recorder.wait_for(1)
    assert recorder.offsets == [offset]


async def test_typing_is_delivered_live_at_the_latest_offset_and_never_stored(
    hub: Hub, redis: Redis, publisher: EventPublisher, church_id: uuid.UUID
) -> None:
    conversation = uuid.uuid4()
    channel = f"conversation:{conversation}"
    recorders = {name: Recorder() for name in (channel, "inbox")}
    for name, recorder in recorders.items():
        await hub.subscribe(church_id, name, recorder)
    offset = await publish(publisher, church_id, "inbox")
    await recorders["inbox"].wait_for(1)
    lengths = [await redis.xlen(key_names.channel_history(church_id, n)) for n in recorders]
    user = uuid.uuid4()
    await publish_typing(publisher, church_id, conversation, user)
    typed = (await recorders["inbox"].wait_for(2))[1]
    assert typed.ephemeral
    assert typed.type == "conversation.typing"
    assert typed.offset == offset  # the channel's latest offset, repeated
    event = json.loads(typed.frame)
    assert (event["channel"], event["offset"]) == ("inbox", offset)
    assert event["event"]["data"] == {"conversation_id": str(conversation), "user_id": str(user)}
    # A channel with no event yet: its head offset (as `subscribed` reports it).
    [on_conversation] = await recorders[channel].wait_for(1)
    head = await publisher.head(church_id, channel)
    assert (on_conversation.offset, on_conversation.epoch) == (head.offset, head.epoch)
    assert [await redis.xlen(key_names.channel_history(church_id, n)) for n in recorders] == lengths
    # The hub does not count it: the next stored event is delivered as usual.
    after = await publish(publisher, church_id, "inbox")
    assert (await recorders["inbox"].wait_for(3))[2].offset == after


@pytest.mark.parametrize("trimmed", [False, True])
async def test_a_gap_history_no_longer_holds_is_announced_not_skipped(
    hub: Hub, redis: Redis, publisher: EventPublisher, church_id: uuid.UUID, trimmed: bool
) -> None:
    """Events the hub missed while cut off come from history; when the history was
    trimmed past its last offset meanwhile (a failover while the relay publishes a
    busy broadcast), its sinks are told ``recovered: false`` instead, at the newest
    offset, and live delivery goes on after it."""
    recorder = Recorder()
    await hub.subscribe(church_id, "inbox", recorder)
    live = [await publish(publisher, church_id, "inbox") for _ in range(3)]
    await recorder.wait_for(3)
    # Entries the hub never hears live: written to history only, as a publish made
    # while its connection is down would leave them.
    history = key_names.channel_history(church_id, "inbox")
    missed = []
    for _ in range(5):
        entry = ConversationTypingEvent.new(
            ConversationTyping(conversation_id=uuid.uuid4(), user_id=uuid.uuid4())
        )
        added = await redis.xadd(history, {"t": entry.type, "e": msgspec.json.encode(entry)})
        missed.append(added.decode() if isinstance(added, bytes) else str(added))
    if trimmed:
        await redis.xtrim(history, maxlen=2, approximate=False)
    assert await kill_pubsub(redis) >= 1
    if not trimmed:
        events = await recorder.wait_for(3 + len(missed))
        assert [e.offset for e in events] == live + missed
        assert not any(e.lost for e in events)
    else:
        notice = (await recorder.wait_for(4))[3]
        assert notice.lost
        assert notice.offset == missed[-1]
        epoch = (await publisher.head(church_id, "inbox")).epoch
        assert json.loads(notice.text) == {
            "type": "subscribed",
            "channel": "inbox",
            "offset": missed[-1],
            "epoch": epoch,
            "recovered": False,
        }
        assert (notice.type, json.loads(notice.frame)) == (
            "recovery_failed",
            {"channels": ["inbox"]},
        )
        assert hub.lost_gaps == 1
    count = len(recorder.events)
    after = await publish(publisher, church_id, "inbox")
    events = await recorder.wait_for(count + 1)
    assert events[-1].offset == after
    assert not any(e.lost for e in events[:3])
