"""Request limits in Redis: GCRA in one Lua script, several limits checked atomically.

GCRA (the generic cell rate algorithm) keeps one number per limit, the
theoretical arrival time, so a limit costs one small string key and no
sorted-set growth. A request passes only if every limit it is checked against
passes, and only then are they all charged, so a request refused by the key's
limit does not use up the church's.

The keys of one call share a hash tag (the church, or the IP / account of a
login), so the script stays inside one Redis Cluster slot (decision 9). The same
call returns the church's read position when asked (storage/redis/read_positions.py):
every request learns it without another round trip.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence

import msgspec

from storage.redis.scripts import ScriptRunner, TurnBatch, lua

_GCRA = lua("rate_gcra")

MINUTE_MS = 60_000


class Verdict(msgspec.Struct, frozen=True):
    allowed: bool
    limit: int
    remaining: int
    reset_s: int
    """Seconds until the tightest limit is wholly available again."""
    retry_after_s: int
    """Seconds to wait before a retry can pass (0 when allowed)."""
    window_s: int
    position: int | None = None
    """The church's read position (storage/redis/read_positions.py) when the charge
    asked for it: 0 when none is recorded, None when not asked."""

    def headers(self) -> dict[str, str]:
        """IETF ``RateLimit-*`` fields (draft-ietf-httpapi-ratelimit-headers), plus
        ``Retry-After`` on a refusal."""
        out = {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset_s),
            "RateLimit-Policy": f"{self.limit};w={self.window_s}",
        }
        if not self.allowed:
            out["Retry-After"] = str(max(1, self.retry_after_s))
        return out


class RateLimiter:
    def __init__(self, runner: ScriptRunner) -> None:
        # The charges of the requests served in one event-loop turn go together.
        self._batch = TurnBatch(runner)
        self._sha = runner.register(_GCRA)

    async def charge(
        self,
        limits: Sequence[tuple[str, int]],
        *,
        period_ms: int = MINUTE_MS,
        position_key: str | None = None,
    ) -> Verdict:
        """Charge one request against every (key, limit per period) at once; with
        ``position_key`` (same hash tag as the limits) also read that position."""
        keys = [k for k, _ in limits]
        if position_key is not None:
            keys.append(position_key)
        args = [period_ms, *(max(1, n) for _, n in limits)]
        allowed, limit, remaining, reset_ms, retry_ms, *asked = await self._batch.run_one(
            self._sha, keys, args
        )
        return Verdict(
            allowed=bool(allowed),
            limit=int(limit),
            remaining=int(remaining),
            reset_s=math.ceil(int(reset_ms) / 1000),
            retry_after_s=math.ceil(int(retry_ms) / 1000),
            window_s=period_ms // 1000,
            position=int(asked[0]) if asked else None,
        )


PLAN_CACHE_S = 30.0

PlanLoader = Callable[[uuid.UUID], Awaitable[tuple[str, int | None] | None]]
"""A church's (plan, own requests-per-minute override or None), None for an unknown
church: storage/pg/churches.py ``plan_loader``."""


class ChurchLimits:
    """Each church's requests per minute: its own override, else its plan's.

    Read on every request, changed almost never, so each process keeps them for
    half a minute; a plan change applies everywhere within that time.
    """

    def __init__(self, load: PlanLoader, plans: dict[str, int]) -> None:
        self._load = load
        self._plans = plans
        self._known: dict[uuid.UUID, tuple[int, float]] = {}

    async def per_minute(self, church_id: uuid.UUID) -> int:
        now = time.monotonic()
        known = self._known.get(church_id)
        if known is not None and known[1] > now:
            return known[0]
        row = await self._load(church_id)
        value = self._plans["starter"]
        if row is not None:
            value = row[1] or self._plans.get(row[0], value)
        if len(self._known) > 100_000:
            self._known.clear()
        self._known[church_id] = (value, now + PLAN_CACHE_S)
        return value
