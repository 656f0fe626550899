"""The master holding a church's slot is SIGKILLed during a 2,000-recipient broadcast.

On the cluster stack (tests/redis_cluster_support.py ``cluster_stack``), WebSocket
clients follow the broadcast's ``message:<id>`` channel from before the kill to the
end. At about a quarter of the texts sent, the master serving the church's hash tag
``{c:<church_id>}`` (its queue, its history streams, its pub/sub channels) is killed
without warning; a replica takes over within seconds. Then:

- the simulator has texted every phone exactly once (0 is a lost recipient, 2 a
  duplicate: the queue entries the dead master had not replicated are found again
  by the reconciler, and idempotency keys stop repeats);
- every recipient is final in Postgres;
- every client saw each recipient's final status (the status Postgres holds), or was
  told ``recovered: false``. Two clients stay connected across the failover (the web
  node's hub resubscribes on the promoted master and fills the gap from history, or,
  when the relay's backlog outgrew the 2,000 entries history keeps before the hub
  could read it, sends them ``subscribed`` again with ``recovered: false``); two drop
  their connection right after the kill and come back with ``since``.
  A client told ``recovered: true`` that then lacks a final status was lied to: the
  history it was replayed from had silently lost acknowledged events.

What makes that hold is the relay's publish (storage/redis/publisher.py
``run_replicated``): it returns only once a replica holds the events, so the replica
promoted after a kill lacks none that left the event log. The two short tests at the
end pin its two sides: a publish no replica acknowledges fails (the events stay in
the log), and a master with no replica at all is not waited for.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest
import websockets

from deploy.stack import Stack
from storage.redis import key_names
from storage.redis.connection import open_redis
from storage.redis.publisher import EventPublisher, NotReplicated
from tests.conftest import Church, texts_sent
from tests.delivery.test_crash import (
    bulk_audience,
    counts_of,
    final,
    provider_texts,
    recipient_summary,
    wait_counts,
)
from tests.redis_cluster_support import RedisClusterHandle

pytestmark = pytest.mark.anyio

AUDIENCE = 2_000
KILL_AT = 0.25
"""Kill the master once the provider has sent this share of the audience's texts."""
FINISH_S = 150.0
"""How long the broadcast may take to finish after the kill (2 loaded cores)."""
STEADY_CLIENTS = 2
"""Clients whose connection lives through the failover (the hub fills the gap)."""
RESUMING_CLIENTS = 2
"""Clients that reconnect with ``since`` after the kill (history fills the gap)."""
FINAL = {"delivered", "failed", "undelivered", "skipped", "delivery_unconfirmed"}


class Follower:
    """One WebSocket client following ``message:<id>``: the last status it saw per
    recipient, and whether the server ever told it ``recovered: false``."""

    def __init__(self, url: str, key: str, channel: str, name: str) -> None:
        self.url = url
        self.key = key
        self.channel = channel
        self.name = name
        self.status: dict[str, str] = {}
        self.events = 0
        self.completed = False
        self.offset = ""
        self.epoch = ""
        self.subscribed = asyncio.Event()
        self.recovered: list[bool] = []
        """``recovered`` of every resubscription with ``since`` (not the first)."""
        self.reconnects = 0
        self.awaiting = False
        """A subscribe was sent and not answered yet."""
        self.closes: list[tuple[float, int | None]] = []
        """(``time.monotonic()``, close code) of each close by the server."""
        self.timeline: list[tuple[float, str]] = []

    async def follow(self, stop: asyncio.Event, drop: asyncio.Event | None = None) -> None:
        """Read until ``stop``. A connection the server closes (a slow consumer's 4008
        after a burst, say) is opened again and resumed with ``since`` (the offset
        and epoch of the last frame read), as a real client does; with ``drop``, the
        client also closes its first connection itself once ``drop`` is set."""
        since: dict[str, str] | None = None
        while not stop.is_set():
            async with websockets.connect(
                self.url, additional_headers={"Authorization": f"Bearer {self.key}"}
            ) as ws:
                assert json.loads(await ws.recv())["type"] == "welcome"
                frame: dict[str, Any] = {"type": "subscribe", "channel": self.channel}
                if since is not None:
                    frame["since"] = since
                self.awaiting = True
                await ws.send(json.dumps(frame))
                reader = asyncio.create_task(self._consume(ws))
                waiters = [reader, asyncio.create_task(stop.wait())]
                if drop is not None and since is None:
                    waiters.append(asyncio.create_task(drop.wait()))
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                for waiter in waiters:
                    waiter.cancel()
                if stop.is_set():
                    return
                if reader.done() and not reader.cancelled():
                    if (error := reader.exception()) is not None:
                        raise error
                    self.closes.append((time.monotonic(), ws.close_code))
                    self.timeline.append((time.monotonic(), f"{ws.close_code}@{self.events}"))
            self.reconnects += 1
            if self.subscribed.is_set():
                since = {"offset": self.offset, "epoch": self.epoch}
            await asyncio.sleep(0.2)

    async def _consume(self, ws: websockets.ClientConnection) -> None:
        """Frames until the server closes the connection, or refuses the subscription
        for now (``unavailable``: Redis did not confirm it within 10 s, which a loaded
        machine may see during a failover; a client tries again)."""
        with contextlib.suppress(websockets.ConnectionClosed):
            async for raw in ws:
                if not self._take(json.loads(raw)):
                    return

    def _take(self, frame: dict[str, Any]) -> bool:
        """Note one frame; False when the subscription was refused for now."""
        kind = frame["type"]
        if kind == "error" and frame.get("code") == "unavailable":
            self.timeline.append((time.monotonic(), "unavailable"))
            return False
        if kind == "subscribed":
            self.awaiting = False
            if self.subscribed.is_set():
                self.recovered.append(bool(frame["recovered"]))
            self.timeline.append((time.monotonic(), f"subscribed@{self.events}"))
            self.offset, self.epoch = frame["offset"], frame["epoch"]
            self.subscribed.set()
        elif kind == "event":
            self.offset = frame["offset"]
            self.events += 1
            event = frame["event"]
            if event["type"] == "message.recipient.status":
                self.status[event["data"]["recipient_id"]] = event["data"]["status"]
            elif event["type"] == "message.completed":
                self.completed = True
        else:
            raise AssertionError(f"{self.name}: unexpected frame {frame}")
        return True

    def misses(self, truth: dict[str, str]) -> int:
        """Recipients whose final status (Postgres) this client never saw."""
        return sum(1 for rid, status in truth.items() if self.status.get(rid) != status)


def final_statuses(stack: Stack, message_id: str) -> dict[str, str]:
    with psycopg.connect(stack.env["DATABASE_URL"]) as conn:
        rows = conn.execute(
            "SELECT id, status FROM message_recipient WHERE message_id = %s",
            (uuid.UUID(message_id),),
        ).fetchall()
    return {str(rid): str(status) for rid, status in rows}


@pytest.fixture
def cluster_church(cluster_stack: Stack) -> Iterator[Church]:
    created = Church(f"http://127.0.0.1:{cluster_stack.http_port}")
    yield created
    created.close()


@pytest.fixture
def slow_receipts(cluster_stack: Stack) -> Iterator[str]:
    """Receipts take 50-150 ms: no recipient is final before the clients subscribe,
    and the broadcast is still in flight when the master dies."""
    sim = f"http://127.0.0.1:{cluster_stack.sim_port}"
    httpx.post(f"{sim}/_sim/config", json={"latency_ms": [50, 150]}).raise_for_status()
    yield sim
    httpx.post(f"{sim}/_sim/config", json={"latency_ms": [0, 0]}).raise_for_status()


@pytest.mark.slow
@pytest.mark.timeout(420)
async def test_master_killed_mid_broadcast_loses_no_text_and_no_status(
    cluster_church: Church,
    cluster_stack: Stack,
    redis_cluster: RedisClusterHandle,
    slow_receipts: str,
) -> None:
    church, sim = cluster_church, slow_receipts
    started = time.monotonic()
    group, phones = await asyncio.to_thread(bulk_audience, church, AUDIENCE)
    imported = time.monotonic()
    before = await asyncio.to_thread(provider_texts, sim)
    message_id = await asyncio.to_thread(church.broadcast, group, "Failover test")

    url = f"ws://127.0.0.1:{cluster_stack.http_port}/v1/realtime"
    channel = f"message:{message_id}"
    followers = [
        Follower(url, church.key, channel, f"client{i}")
        for i in range(STEADY_CLIENTS + RESUMING_CLIENTS)
    ]
    stop, dropped = asyncio.Event(), asyncio.Event()
    tasks = [
        asyncio.create_task(f.follow(stop, dropped if i >= STEADY_CLIENTS else None))
        for i, f in enumerate(followers)
    ]
    killed = None
    try:
        async with asyncio.timeout(30):
            for f in followers:
                await f.subscribed.wait()
        early = await asyncio.to_thread(counts_of, church, message_id)
        assert final(early) == 0, f"recipients final before the clients subscribed: {early}"

        deadline = time.monotonic() + 120
        while (sent := await asyncio.to_thread(provider_texts, sim) - before) < KILL_AT * AUDIENCE:
            assert time.monotonic() < deadline, (sent, counts_of(church, message_id))
            await asyncio.sleep(0.05)
        tag = key_names.church_tag(uuid.UUID(church.id))
        # Measured at the kill, not after it: the call returns once a replica has been
        # promoted, and sends whose Redis calls land on other shards go on meanwhile.
        at_kill = await asyncio.to_thread(provider_texts, sim) - before
        assert at_kill < AUDIENCE, "every text was sent before the kill: nothing tested"
        killed = await asyncio.to_thread(redis_cluster.kill_master_of, tag)
        promoted = time.monotonic()
        after_kill = await asyncio.to_thread(provider_texts, sim) - before
        dropped.set()

        counts = await asyncio.to_thread(
            wait_counts, church, message_id, lambda c: final(c) == AUDIENCE, FINISH_S
        )
        finished = time.monotonic()
        summary = await asyncio.to_thread(recipient_summary, cluster_stack, message_id)
        assert final(counts) == AUDIENCE, (counts, summary)
        assert counts["delivered"] == AUDIENCE, (counts, summary)
        texts = await asyncio.to_thread(texts_sent, sim, phones)
        lost, doubled = texts.count(0), sum(t > 1 for t in texts)
        assert texts.count(1) == AUDIENCE, f"lost: {lost}, doubled: {doubled}"

        # The last statuses follow the last commits by the relay's latency; give the
        # clients a few seconds to read them before judging.
        truth = await asyncio.to_thread(final_statuses, cluster_stack, message_id)
        assert set(truth.values()) <= FINAL, summary
        for _ in range(100):  # up to 20 s
            if not any(
                f.awaiting or ((f.misses(truth) or not f.completed) and False not in f.recovered)
                for f in followers
            ):
                break
            await asyncio.sleep(0.2)
    finally:
        stop.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        if killed is not None:
            await asyncio.to_thread(redis_cluster.restart, killed)

    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors
    report = [
        (
            f.name,
            f.events,
            f.misses(truth),
            f.recovered,
            [(round(at - promoted, 2), what) for at, what in f.timeline],
            f.completed,
        )
        for f in followers
    ]
    print(
        f"\nfailover: import {imported - started:.1f} s, kill at {sent} texts "
        f"({after_kill} once promoted), promoted to all final {finished - promoted:.1f} s, "
        f"total {time.monotonic() - started:.1f} s; clients (name, events, missed finals, "
        f"recovered on each resume, (s after promotion, subscribed or close code "
        f"@ events read), completed): "
        f"{report}"
    )
    for f in followers:
        assert not f.awaiting, report
    for f in followers[STEADY_CLIENTS:]:
        assert f.reconnects >= 1, report
    for f in followers:
        told = False in f.recovered
        assert told or f.misses(truth) == 0, (
            f"{f.name} missed final statuses without being told recovered: false",
            report,
        )
        assert told or f.completed, (f"{f.name} never saw message.completed", report)


async def _publish(publisher: EventPublisher, church_id: uuid.UUID, n: int) -> None:
    event = json.dumps({"type": "test", "id": str(n)}).encode()
    await publisher.run_replicated(
        [publisher.publish_encoded_call(church_id, "inbox", "test", event)]
    )


async def test_a_publish_no_replica_acknowledged_fails(redis_cluster: RedisClusterHandle) -> None:
    """The relay's publish returns only once a replica holds it: with the replica
    frozen (SIGSTOP: still connected, acknowledging nothing) it fails, so the relay
    keeps the events in Postgres and publishes them again."""
    church_id = uuid.uuid4()
    master = redis_cluster.master_of(key_names.church_tag(church_id))
    (replica,) = redis_cluster.cluster.replicas_of(master)
    assert replica.pid is not None
    redis = open_redis(redis_cluster.settings)
    publisher = EventPublisher(redis)
    try:
        await _publish(publisher, church_id, 1)
        os.kill(replica.pid, signal.SIGSTOP)
        try:
            with pytest.raises(NotReplicated):
                await _publish(publisher, church_id, 2)
        finally:
            os.kill(replica.pid, signal.SIGCONT)
        await _publish(publisher, church_id, 3)
    finally:
        await redis.aclose()
        await asyncio.to_thread(redis_cluster.cluster.wait_healthy)


async def test_a_master_without_replica_still_publishes(redis_cluster: RedisClusterHandle) -> None:
    """A master whose replica is gone is not waited for: nothing could be promoted in
    its place, and refusing would wedge every event of its churches."""
    church_id = uuid.uuid4()
    master = redis_cluster.master_of(key_names.church_tag(church_id))
    (replica,) = redis_cluster.cluster.replicas_of(master)
    redis = open_redis(redis_cluster.settings)
    publisher = EventPublisher(redis)
    try:
        await _publish(publisher, church_id, 1)
        redis_cluster.kill(replica)
        for n in range(2, 6):
            await _publish(publisher, church_id, n)
        history = key_names.channel_history(church_id, "inbox")
        assert await redis.xlen(history) == 5
    finally:
        await redis.aclose()
        await asyncio.to_thread(redis_cluster.restart, replica)
