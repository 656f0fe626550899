"""Fairness: a small church's message goes out within seconds while another
church's large broadcast is in flight.

The worker here has a single batch slot (``KOINONIA_WORKER_CONCURRENCY=8``: 8
provider calls in flight, one batch at a time) and one ready set
(``KOINONIA_QUEUE_SHARDS=1``), so the small churches share everything with the
large one, as a church that hashed to the large church's shard did before; the
large church's number is paced at 200 texts/s so its broadcast lasts seconds
whatever the machine. Churches take turns: a small message waits for about one
batch of the large one, never for its backlog.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
import redis.asyncio as aredis

from deploy.stack import Stack
from storage.redis.queue import SendBatch, SendQueue, enqueue_sends, schedule_retry, send_decoder
from tests.conftest import Church, unique_phone
from tests.delivery.test_throttle import audience, once_each, texted, wait_for, worker_with

# Slow lane: a large broadcast beside a small one, in real time.
pytestmark = pytest.mark.slow


BIG = 3000
SMALL = 5
SENT_WITHIN_S = 3.0


def _small_church(base_url: str) -> tuple[Church, str, list[str]]:
    church = Church(base_url)
    group = church.group("Elders")
    phones = [unique_phone() for _ in range(SMALL)]
    for phone in phones:
        church.member(phone, [group])
    return church, group, phones


def _accept_to_sent(church: Church, group: str) -> float:
    """Seconds from posting a message until every recipient has a provider id."""
    started = time.monotonic()
    message_id = church.broadcast(group, "Elders meet tonight")
    deadline = started + 60
    while time.monotonic() < deadline:
        rows = church.api.get(f"/v1/messages/{message_id}/recipients").json()["data"]
        if len(rows) == SMALL and all(r["provider_message_id"] for r in rows):
            return time.monotonic() - started
        time.sleep(0.05)
    return float("inf")


@pytest.mark.timeout(240)
def test_small_church_is_not_held_back_by_a_large_broadcast(
    church: Church, stack: Stack, base_url: str, sim_url: str
) -> None:
    group, phones = audience(church, BIG)
    smalls = [_small_church(base_url) for _ in range(3)]
    try:
        with worker_with(
            stack,
            KOINONIA_WORKER_CONCURRENCY="8",
            KOINONIA_QUEUE_SHARDS="1",
            KOINONIA_SEND_RATE_PER_NUMBER="200",
        ):
            message_id = church.broadcast(group, "Everyone: picnic on Sunday")
            wait_for(church, message_id, lambda c: texted(c) >= BIG // 10, 60)
            waits = []
            for small, small_group, _ in smalls:
                waits.append(_accept_to_sent(small, small_group))
            during = church.api.get(f"/v1/messages/{message_id}").json()["data"]["counts"]
            # The yardstick only means something if the large broadcast was still going.
            assert texted(during) < BIG, f"the large broadcast ended first: {during}"
            assert max(waits) < SENT_WITHIN_S, (
                f"small churches' accept→sent: {[round(w, 2) for w in waits]} s "
                f"(large broadcast at {texted(during)} of {BIG})"
            )
            counts = wait_for(church, message_id, lambda c: c["delivered"] == BIG, 90)
        assert counts["delivered"] == BIG, counts
        once_each(sim_url, phones)
        for _small, _group, small_phones in smalls:
            once_each(sim_url, small_phones)
    finally:
        for small, _, _ in smalls:
            small.close()


# -- the queue alone, on a Redis database of its own (the suite's worker stays out) ----------


@pytest.fixture
async def queue_redis(stack: Stack) -> AsyncIterator[aredis.Redis]:
    client = aredis.Redis.from_url(stack.env["REDIS_URL"].rsplit("/", 1)[0] + "/7")
    await client.flushdb()
    yield client
    await client.flushdb()
    await client.aclose()


def _batches(church_id: uuid.UUID, n: int) -> list[SendBatch]:
    return [
        SendBatch(
            church_id=church_id,
            message_id=uuid.uuid4(),
            created_at=datetime.now(UTC),
            recipient_ids=[uuid.uuid4()],
            from_number=f"+1555010{i:04d}",
        )
        for i in range(n)
    ]


async def _take(queue: SendQueue) -> uuid.UUID | None:
    taken = await queue.claim()
    if taken is None:
        return None
    for entry_id, _ in taken.entries:
        await queue.done(taken.stream, entry_id)
    return taken.church_id


@pytest.mark.anyio
@pytest.mark.parametrize("shards", [1, 8])
async def test_churches_take_turns_in_the_order_they_waited(
    queue_redis: aredis.Redis, shards: int
) -> None:
    """A church announced behind 50 queued batches of another is served next but one,
    in the large church's ready set (1) or in another (8: within one look at all)."""
    big, small = uuid.uuid4(), uuid.uuid4()
    await enqueue_sends(queue_redis, _batches(big, 50), shards)
    queue = SendQueue(queue_redis, shards, "w1")
    assert [await _take(queue) for _ in range(3)] == [big] * 3
    await enqueue_sends(queue_redis, _batches(small, 1), shards)
    await asyncio.sleep(0.25)  # a busy worker looks at every ready set every 200 ms
    order = [await _take(queue) for _ in range(3)]
    assert small in order[:2], order
    served = 4 + order.count(big)
    while (church := await _take(queue)) is not None:
        assert church == big
        served += 1
    assert served == 51


@pytest.mark.anyio
async def test_a_dead_workers_entry_is_taken_over_and_a_retry_waits(
    queue_redis: aredis.Redis,
) -> None:
    church = uuid.uuid4()
    (batch,) = _batches(church, 1)
    await enqueue_sends(queue_redis, [batch], 8)
    dead = SendQueue(queue_redis, 8, "dead", claim_idle_ms=300)
    taken = await dead.claim()
    assert taken is not None  # ... and never acknowledged
    alive = SendQueue(queue_redis, 8, "alive", claim_idle_ms=300)
    assert await alive.claim() is None
    started = time.monotonic()
    while (again := await alive.claim()) is None:
        assert time.monotonic() - started < 5, "the stalled entry was never taken over"
        await alive.wait(alive.next_due_in_s())
    assert again.entries[0][0] == taken.entries[0][0]
    await alive.done(again.stream, again.entries[0][0])

    due_ms = int((time.time() + 0.5) * 1000)
    await schedule_retry(queue_redis, batch, due_ms, 8)
    assert await alive.claim() is None
    while (retried := await alive.claim()) is None:
        assert time.time() < due_ms / 1000 + 3, "the retry never came due"
        await alive.wait(alive.next_due_in_s())
    assert time.time() * 1000 >= due_ms - 5
    payload = retried.entries[0][1]
    assert payload is not None
    assert send_decoder.decode(payload) == batch
    await alive.done(retried.stream, retried.entries[0][0])
    # The church is looked at once more after claim-idle (entries were in flight),
    # found empty, and leaves nothing behind.
    await asyncio.sleep(0.35)
    assert await alive.claim() is None
    assert await queue_redis.keys("kn:q:{c:*") == []
    assert await queue_redis.keys("kn:q:{r*}:ready") == []
