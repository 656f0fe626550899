"""Every script call our code makes names keys of one Redis Cluster slot.

The calls are recorded as they go through ``ScriptRunner`` (every Lua script we
run passes there) while the queue, the sending limits, the request limits and the
read positions do their work on a real Redis; each call's KEYS must share one
slot (``redis.crc.key_slot``, the function the cluster itself uses). Each test runs on
a standalone Redis and on the session's cluster (tests/storage/redis/conftest.py),
where a script whose keys span slots, or that touches a key it was not given,
fails outright, so what is checked is what the code really sends.

Beside that, the layout: the queue's ready sets spread evenly over the slot range,
and a sending number's bucket sits outside the account's slot.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
from redis.crc import key_slot

from storage.pg.credentials import (
    create_session,
    create_ticket,
    delete_session,
    delete_user_sessions,
    principal_for_session,
    principal_for_ticket,
    set_user_sessions_role,
)
from storage.redis import key_names
from storage.redis.connection import Redis, open_redis
from storage.redis.queue import (
    SendBatch,
    SendQueue,
    encode_entry,
    enqueue_sends,
    migrate_shard_streams,
    queue_backlog,
    queue_depths,
    schedule_retry,
)
from storage.redis.rate_limits import RateLimiter
from storage.redis.read_positions import ReadPositions
from storage.redis.scripts import Call, ScriptRunner
from storage.redis.send_limits import ProviderLimits

SHARDS = 8


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[Call]:
    """Every script call sent through any ScriptRunner during the test."""
    seen: list[Call] = []
    original = ScriptRunner._pipeline

    async def recording(self: ScriptRunner, batch: Sequence[Call]) -> list[Any]:
        seen.extend(batch)
        return await original(self, batch)

    monkeypatch.setattr(ScriptRunner, "_pipeline", recording)
    return seen


def slots(keys: Sequence[str]) -> set[int]:
    return {key_slot(k.encode()) for k in keys}


def assert_single_slot(calls: list[Call]) -> None:
    assert calls, "no script call was recorded"
    crossing = [keys for _, keys, _ in calls if len(slots(keys)) > 1]
    assert crossing == [], "script calls whose KEYS span slots"


def batch(church_id: uuid.UUID, number: str = "+15550000001") -> SendBatch:
    return SendBatch(
        church_id=church_id,
        message_id=uuid.uuid4(),
        created_at=datetime.now(UTC),
        recipient_ids=[uuid.uuid4() for _ in range(3)],
        from_number=number,
    )


@pytest.mark.anyio
async def test_the_queue_s_script_calls_each_stay_in_one_slot(
    redis: Redis, calls: list[Call]
) -> None:
    churches = [uuid.uuid4() for _ in range(12)]
    await enqueue_sends(redis, [batch(c) for c in churches], SHARDS)
    queue = SendQueue(redis, SHARDS, "w1", quantum=4)
    seen: set[uuid.UUID] = set()
    for _ in range(50):
        taken = await queue.claim()
        if taken is None:
            if len(seen) == len(churches):
                break
            await queue.wait(0.1)
            continue
        seen.add(taken.church_id)
        for entry_id, _ in taken.entries:
            await queue.done(taken.stream, entry_id)
    assert seen == set(churches)
    await schedule_retry(redis, batch(churches[0]), 0, SHARDS)
    await queue.pause(churches[1], 1)
    await queue_depths(redis, SHARDS)
    await queue_backlog(redis, SHARDS)
    # A church left in an earlier version's ready set is announced in today's.
    await redis.zadd(key_names.legacy_ready_set(3), {str(churches[2]): 5})
    await migrate_shard_streams(redis, SHARDS)
    assert await redis.exists(key_names.legacy_ready_set(3)) == 0
    depths = await queue_depths(redis, SHARDS)
    assert depths["churches_with_work"] >= 1
    assert_single_slot(calls)
    used = {keys[0] for _, keys, _ in calls}
    assert any(":ready" in k for k in used)
    assert any(":send" in k for k in used)


@pytest.mark.anyio
async def test_limits_and_positions_calls_each_stay_in_one_slot(
    redis: Redis, calls: list[Call]
) -> None:
    runner = ScriptRunner(redis)
    limits = ProviderLimits(runner, "acct0123456789ab")
    buckets = [limits.bucket("account", 100, 1), limits.bucket("n:+15550000001", 10, 1)]
    admission = await limits.admit(buckets, 5, 1000)
    assert admission.granted == 5
    await limits.refund(buckets, 2)
    await limits.pause(buckets, 0.01)
    await limits.record(1, 0, threshold=5, cooldown_ms=1000, probe=False)
    church = uuid.uuid4()
    await RateLimiter(runner).charge(
        [
            (key_names.church_rate(church), 100),
            (key_names.api_key_rate(church, uuid.uuid4()), 10),
        ],
        position_key=key_names.read_position(church),
    )
    await RateLimiter(runner).charge(
        [
            (key_names.login_rate("login-ip", "192.0.2.1"), 10),
        ]
    )
    await ReadPositions(runner).record(church, 42)
    assert_single_slot(calls)


@pytest.mark.anyio
async def test_a_number_s_bucket_is_taken_first_and_refunded_what_the_account_refused(
    redis: Redis,
) -> None:
    limits = ProviderLimits(ScriptRunner(redis), "acct-refund")
    account = limits.bucket("account", 3, 1)  # 3 tokens
    number = limits.bucket("n:+15550000002", 10, 1)  # 10 tokens
    assert len(slots([account.key, number.key])) == 2
    first = await limits.admit([account, number], 8, 1000)
    assert first.granted == 3  # the account's limit
    # The number gave 8 and got back the 5 the account refused: 7 of 10 left.
    level = float(await redis.hget(number.key, "t") or 0)
    assert 7 <= level < 7.5
    # A number out of tokens: its wait, and the account's slot is not touched.
    limits = ProviderLimits(ScriptRunner(redis), "acct-number")
    account = limits.bucket("account", 100, 1)
    number = limits.bucket("n:+15550000004", 4, 1)
    assert (await limits.admit([account, number], 8, 1000)).granted == 4
    before = await redis.hgetall(account.key)
    again = await limits.admit([account, number], 8, 1000)
    assert (again.granted, again.limited_by, again.circuit) == (0, 1, "closed")
    assert again.wait_s > 0
    assert await redis.hgetall(account.key) == before


@pytest.mark.anyio
async def test_an_open_circuit_gives_the_number_its_tokens_back(redis: Redis) -> None:
    limits = ProviderLimits(ScriptRunner(redis), "acct-open")
    account = limits.bucket("account", 100, 1)
    number = limits.bucket("n:+15550000003", 10, 1)
    change = await limits.record(0, 1, threshold=1, cooldown_ms=60_000, probe=False)
    assert change.opened
    admission = await limits.admit([account, number], 4, 1000)
    assert (admission.granted, admission.circuit) == (0, "open")
    level = float(await redis.hget(number.key, "t") or 0)
    assert level >= 9.9


def test_ready_sets_spread_evenly_over_the_slots() -> None:
    for shards in (3, 8, 16):
        for shard in range(shards):
            ready = key_names.ready_set(shard, shards)
            wake = key_names.ready_wake(shard, shards)
            (slot,) = slots([ready, wake])
            assert shard * 16384 // shards <= slot < (shard + 1) * 16384 // shards


def test_every_key_of_a_church_carries_its_tag() -> None:
    church = uuid.uuid4()
    keys = [
        key_names.church_send_stream(church),
        key_names.church_delayed(church),
        key_names.message_counts(church, uuid.uuid4()),
        key_names.progress_gate(church, uuid.uuid4()),
        key_names.church_rate(church),
        key_names.api_key_rate(church, uuid.uuid4()),
        key_names.read_position(church),
        key_names.cached(church, "x"),
        key_names.user_sessions(church, uuid.uuid4()),
        key_names.channel_history(church, "message:1"),
        key_names.channel_epoch(church, "message:1"),
    ]
    assert len(slots(keys)) == 1
    assert {key_names.hash_tag(k) for k in keys} == {f"c:{church}"}


@pytest.mark.anyio
async def test_sessions_tickets_and_revocations_work_on_either(redis: Redis) -> None:
    """Session keys have no tag (each its own slot) and revocations are published:
    the pipelines and publishes of storage/pg/credentials.py on either Redis."""
    church, user = uuid.uuid4(), uuid.uuid4()
    tokens = [
        (await create_session(redis, church_id=church, user_id=user, role="admin", ttl_s=60))[0]
        for _ in range(4)
    ]
    assert await set_user_sessions_role(redis, church, user, "staff") == 4
    principal = await principal_for_session(redis, tokens[0])
    assert principal is not None
    assert principal.role == "staff"
    ticket = await create_ticket(redis, principal)
    assert await principal_for_ticket(redis, ticket) is not None
    assert await principal_for_ticket(redis, ticket) is None
    await delete_session(redis, tokens[0])
    assert await principal_for_session(redis, tokens[0]) is None
    assert await delete_user_sessions(redis, church, user, keep=tokens[1]) == 2
    assert await delete_user_sessions(redis, church, user) == 1
    assert [await principal_for_session(redis, t) for t in tokens] == [None] * 4


@pytest.mark.anyio
async def test_a_church_s_queue_works_while_its_slot_moves(redis_cluster: Any) -> None:
    """The church's stream and delayed set moved to another master mid-work (MIGRATING
    / IMPORTING, then MIGRATE, then the slot given away): the multi-key take script
    follows ASK, then MOVED, and every entry is taken exactly once."""
    client = open_redis(redis_cluster.settings)
    try:
        church = uuid.uuid4()
        stream = key_names.church_send_stream(church)
        sent = [batch(church) for _ in range(6)]
        await enqueue_sends(client, sent[:5], SHARDS)
        # A retry due later: the delayed set still exists while the slot moves.
        await schedule_retry(client, sent[5], int((time.time() + 1) * 1000), SHARDS)
        queue = SendQueue(client, SHARDS, "w1", quantum=1)

        async def take_one() -> list[bytes]:
            for _ in range(50):
                taken = await queue.claim()
                if taken is not None and taken.church_id == church:
                    for entry_id, _ in taken.entries:
                        await queue.done(taken.stream, entry_id)
                    return [p for _, p in taken.entries if p is not None]
                await queue.wait(0.05)
            raise AssertionError("nothing taken")

        payloads = await take_one()
        before = redis_cluster.redirects()
        target = redis_cluster.other_master(stream)
        with redis_cluster.migrate_slot(redis_cluster.slot_of(stream), target) as migration:
            assert migration.move_keys() >= 2  # the stream and the delayed set
            payloads += await take_one()  # the source answers ASK
            migration.finish()
            payloads += await take_one()  # the source answers MOVED
        while len(payloads) < len(sent):
            payloads += await take_one()
        after = redis_cluster.redirects()
        assert after["ASK"] > before["ASK"]
        assert after["MOVED"] > before["MOVED"]
        assert redis_cluster.master_of(stream).node_id == target.node_id
        assert sorted(payloads) == sorted(encode_entry(b) for b in sent)
    finally:
        await client.aclose()
