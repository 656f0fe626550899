"""Cache-aside in Redis for values that are costly to compute and read often
(analytics summaries, group member counts).

- **One recomputation at a time.** A miss takes a short lock (``SET NX PX``);
  callers that lose the race wait briefly for the winner's value instead of
  all hitting Postgres at once (the stampede).
- **Early refresh.** An entry is refreshed before it expires, with probability
  rising as expiry nears and with the cost of the last computation (XFetch,
  Vattani et al. 2015), while everyone else keeps being served the old value.
- **Invalidation by generation.** Entries belong to a topic of one church
  (``groups``, ``analytics``). A write bumps the topic's generation; an entry
  from an older generation is a miss. A computation that started before the
  write cannot resurrect old data, since it stores the generation it read.

Hit and miss counts are this process's, reported by ``/health/detailed``.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec

from storage.redis import key_names
from storage.redis.connection import Redis, riding_slot_moves

T = TypeVar("T")

LOCK_MS = 5_000
WAIT_S = 2.0
BETA = 1.0


class _Entry(msgspec.Struct, array_like=True):
    generation: int
    expires_at: float
    cost_s: float
    payload: bytes


class CacheStats(msgspec.Struct):
    hits: int = 0
    misses: int = 0
    early_refreshes: int = 0
    waits: int = 0

    def snapshot(self) -> dict[str, Any]:
        total = self.hits + self.misses
        return {
            "hits": self.hits,
            "misses": self.misses,
            "early_refreshes": self.early_refreshes,
            "waits": self.waits,
            "hit_ratio": round(self.hits / total, 4) if total else None,
        }


class Cache:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self.stats = CacheStats()
        self._encoder = msgspec.msgpack.Encoder()

    async def get_or_compute(
        self,
        church_id: uuid.UUID,
        topic: str,
        name: str,
        kind: type[T],
        compute: Callable[[], Awaitable[T]],
        *,
        ttl_s: float,
    ) -> T:
        key = key_names.cached(church_id, f"{topic}:{name}")
        generation_key = key_names.cached(church_id, f"gen:{topic}")
        deadline = time.monotonic() + WAIT_S
        while True:
            # Two keys: TRYAGAIN while the church's slot migrates with them apart.
            raw, raw_generation = await riding_slot_moves(
                lambda: self._redis.mget(key, generation_key)
            )
            generation = int(raw_generation or 0)
            entry = _decode(raw)
            if entry is not None and entry.generation == generation:
                now = time.time()
                early = now - entry.cost_s * BETA * math.log(random.random() or 1e-12)
                if early < entry.expires_at:
                    self.stats.hits += 1
                    return msgspec.msgpack.decode(entry.payload, type=kind)
                # Due for an early refresh: one caller recomputes, the rest get this value.
                if not await self._lock(key):
                    self.stats.hits += 1
                    return msgspec.msgpack.decode(entry.payload, type=kind)
                self.stats.early_refreshes += 1
                return await self._recompute(key, generation, compute, ttl_s)
            if await self._lock(key) or time.monotonic() >= deadline:
                self.stats.misses += 1
                return await self._recompute(key, generation, compute, ttl_s)
            self.stats.waits += 1
            await asyncio.sleep(0.02)

    async def invalidate(self, church_id: uuid.UUID, *topics: str) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for topic in topics:
            pipe.incr(key_names.cached(church_id, f"gen:{topic}"))
        await pipe.execute()

    async def _lock(self, key: str) -> bool:
        return bool(await self._redis.set(key + ":lock", b"1", nx=True, px=LOCK_MS))

    async def _recompute(
        self, key: str, generation: int, compute: Callable[[], Awaitable[T]], ttl_s: float
    ) -> T:
        started = time.perf_counter()
        try:
            value = await compute()
            cost = time.perf_counter() - started
            entry = _Entry(
                generation=generation,
                expires_at=time.time() + ttl_s,
                cost_s=cost,
                payload=self._encoder.encode(value),
            )
            # Kept past expiry so early refresh has an old value to serve meanwhile.
            await self._redis.set(key, self._encoder.encode(entry), px=int(ttl_s * 2000) + 1000)
            return value
        finally:
            await self._redis.delete(key + ":lock")


def _decode(raw: bytes | str | None) -> _Entry | None:
    if raw is None:
        return None
    try:
        return msgspec.msgpack.decode(raw if isinstance(raw, bytes) else raw.encode(), type=_Entry)
    except msgspec.DecodeError:
        return None
