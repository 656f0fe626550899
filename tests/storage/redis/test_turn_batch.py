"""Script calls batched per event-loop turn (storage/redis/scripts.py ``TurnBatch``),
against a real Redis: on a standalone Redis the calls of one turn go in one
pipeline and each caller gets its own result or error; on a cluster each goes
alone. The rate limiter charges through it (storage/redis/rate_limits.py)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from typing import Any

import pytest
from redis.exceptions import ResponseError

from storage.process.settings import RedisSettings
from storage.redis.connection import Redis, is_cluster, open_redis
from storage.redis.rate_limits import RateLimiter
from storage.redis.scripts import Call, ScriptRunner, TurnBatch

pytestmark = pytest.mark.anyio

_ECHO_OR_FAIL = """
if ARGV[1] == 'fail' then return redis.error_reply('refused ' .. KEYS[1]) end
return redis.call('INCR', KEYS[1])
"""


class CountedRunner(ScriptRunner):
    """The real runner, counting the pipelines it sends (nothing else changed)."""

    def __init__(self, redis: Redis) -> None:
        super().__init__(redis)
        self.pipelines: list[int] = []

    async def _pipeline(self, calls: Sequence[Call]) -> list[Any]:
        self.pipelines.append(len(calls))
        return await super()._pipeline(calls)


async def test_the_calls_of_one_turn_share_a_pipeline_and_keep_their_own_results(
    redis: Redis,
) -> None:
    runner = CountedRunner(redis)
    batch = TurnBatch(runner)
    sha = runner.register(_ECHO_OR_FAIL)
    keys = [f"kn:test:{{b:{uuid.uuid4().hex}}}" for _ in range(6)]
    await redis.set(keys[0], 41)
    # Six calls made in one turn, one of them failing: the others are unaffected.
    results = await asyncio.gather(
        *(batch.run_one(sha, [key], ["fail" if i == 3 else "ok"]) for i, key in enumerate(keys)),
        return_exceptions=True,
    )
    assert results[0] == 42
    assert results[1:3] + results[4:] == [1, 1, 1, 1]
    assert isinstance(results[3], ResponseError)
    assert f"refused {keys[3]}" in str(results[3])
    assert await redis.get(keys[3]) is None
    if is_cluster(redis):
        # Alone each (a master failing over must not fail other churches' calls);
        # the first met NOSCRIPT, loaded the script and ran again.
        assert len(runner.pipelines) >= 6
        assert set(runner.pipelines) == {1}
    else:
        # One pipeline of six, then the six again once the script was loaded (NOSCRIPT:
        # none had run), and nothing more.
        assert runner.pipelines == [6, 6]
        # A call alone in its turn goes as a plain EVALSHA, no pipeline.
        runner.pipelines.clear()
        assert await batch.run_one(sha, [keys[1]], ["ok"]) == 2
        assert await batch.run_one(sha, [keys[1]], ["ok"]) == 3
        assert runner.pipelines == []


class HeldRunner(ScriptRunner):
    """The real runner; its pipelines wait for ``go`` once they are under way."""

    def __init__(self, redis: Redis) -> None:
        super().__init__(redis)
        self.under_way = asyncio.Event()
        self.go = asyncio.Event()

    async def _pipeline(self, calls: Sequence[Call]) -> list[Any]:
        self.under_way.set()
        await self.go.wait()
        return await super()._pipeline(calls)


async def test_a_caller_that_went_away_does_not_stop_the_others(redis_url: str) -> None:
    """Standalone only: on a cluster nothing is batched (the first test)."""
    redis = open_redis(RedisSettings(url=redis_url))
    try:
        await _went_away(redis)
    finally:
        await redis.aclose()


async def _went_away(redis: Redis) -> None:
    runner = HeldRunner(redis)
    batch = TurnBatch(runner)
    sha = runner.register(_ECHO_OR_FAIL)
    runner.go.set()
    await runner.run_one(sha, ["kn:test:{b:warm}"], ["ok"])  # loaded
    runner.go.clear()
    runner.under_way.clear()
    keys = [f"kn:test:{{b:{uuid.uuid4().hex}}}" for _ in range(4)]
    calls = [asyncio.ensure_future(batch.run_one(sha, [key], ["ok"])) for key in keys]
    # Gone before its batch leaves: never sent, so never charged.
    calls[0].cancel()
    await runner.under_way.wait()
    # Gone while its batch is on the wire: it ran, and the others get their results.
    calls[2].cancel()
    runner.go.set()
    done = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(done[0], asyncio.CancelledError)
    assert isinstance(done[2], asyncio.CancelledError)
    assert done[1] == done[3] == 1
    assert await redis.get(keys[0]) is None
    assert await redis.get(keys[2]) == b"1"


async def test_concurrent_charges_respect_the_limit_exactly(redis: Redis) -> None:
    limiter = RateLimiter(ScriptRunner(redis))
    key = f"kn:rl:{{test:{uuid.uuid4().hex}}}"
    verdicts = await asyncio.gather(*(limiter.charge([(key, 20)]) for _ in range(25)))
    assert sum(v.allowed for v in verdicts) == 20
    assert sorted(v.remaining for v in verdicts if v.allowed) == list(range(20))
    refused = [v for v in verdicts if not v.allowed]
    assert len(refused) == 5
    assert all(v.retry_after_s >= 1 for v in refused)
