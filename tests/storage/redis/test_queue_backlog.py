"""``queue_backlog``: the worker's queue gauges (koinonia_queue_backlog and
_oldest_age_seconds, koinonia_dead_letter_backlog), on a Redis of its own so no
worker takes the entries away: a standalone one and the session's cluster
(tests/storage/redis/conftest.py), same assertions."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from storage.redis import key_names
from storage.redis.connection import Redis
from storage.redis.queue import (
    MaterializeJob,
    SendBatch,
    enqueue_materialize,
    enqueue_sends,
    queue_backlog,
    shard_of,
)

SHARDS = 4


def batch(church_id: uuid.UUID, recipients: int = 3) -> SendBatch:
    return SendBatch(
        church_id=church_id,
        message_id=uuid.uuid4(),
        created_at=datetime.now(UTC),
        recipient_ids=[uuid.uuid4() for _ in range(recipients)],
        from_number="+15550000001",
    )


@pytest.mark.anyio
async def test_an_empty_queue_has_no_backlog(redis: Redis) -> None:
    backlog = await queue_backlog(redis, SHARDS)
    assert backlog.send == [0] * SHARDS
    assert (backlog.materialize, backlog.dead_letters) == (0, 0)
    assert (backlog.send_oldest_age_s, backlog.materialize_oldest_age_s) == (0.0, 0.0)


@pytest.mark.anyio
async def test_entries_are_counted_per_shard_with_the_oldest_age(redis: Redis) -> None:
    first, second = uuid.uuid4(), uuid.uuid4()
    await enqueue_sends(redis, [batch(first), batch(first), batch(second)], SHARDS)
    await redis.xgroup_create(
        key_names.MATERIALIZE_STREAM, key_names.SEND_GROUP, id="0", mkstream=True
    )
    job = MaterializeJob(church_id=first, message_id=uuid.uuid4(), created_at=datetime.now(UTC))
    await enqueue_materialize(redis, job)
    await enqueue_materialize(redis, job)
    # One read, not acknowledged: pending; the other not read yet: lag.
    await redis.xreadgroup(key_names.SEND_GROUP, "w1", {key_names.MATERIALIZE_STREAM: ">"}, count=1)
    await redis.xadd(key_names.DEAD_LETTER_STREAM, {"j": b"x", "reason": "max_attempts"})
    backlog = await queue_backlog(redis, SHARDS)
    expected = [0] * SHARDS
    expected[shard_of(first, SHARDS)] += 2
    expected[shard_of(second, SHARDS)] += 1
    assert backlog.send == expected
    assert backlog.materialize == 2
    assert backlog.dead_letters == 1
    assert 0.0 <= backlog.send_oldest_age_s < 5.0
    assert 0.0 <= backlog.materialize_oldest_age_s < 5.0
