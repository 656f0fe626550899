"""Request limits in Redis: GCRA in one Lua script, several limits checked atomically.

GCRA (the generic cell rate algorithm) keeps one number per limit, the
theoretical arrival time, so a limit costs one small string key and no
sorted-set growth. A request passes only if every limit it is checked against
passes, and only then are they all charged, so a request refused by the key's
limit does not use up the church's.

The keys of one call share a hash tag (the church, or the IP / account of a
login), so the script stays inside one Redis Cluster slot (decision 9).
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Sequence

import msgspec

from storage.pg.database import Pool
from storage.redis.scripts import ScriptRunner

# KEYS: one per limit. ARGV: period_ms, then one limit per key.
# Returns {allowed, limit, remaining, reset_ms, retry_after_ms} for the tightest limit.
_GCRA = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000 + math.floor(tonumber(now_parts[2]) / 1000)
local period = tonumber(ARGV[1])
local allowed = 1
local retry_after = 0
local tats = {}
for i, key in ipairs(KEYS) do
  local limit = tonumber(ARGV[i + 1])
  local interval = period / limit
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then tat = now end
  local new_tat = tat + interval
  local allow_at = new_tat - period
  if allow_at > now then
    allowed = 0
    local wait = allow_at - now
    if wait > retry_after then retry_after = wait end
  end
  tats[i] = {tat, new_tat, interval, limit}
end
local best_limit, best_remaining, best_reset = 0, -1, 0
for i, key in ipairs(KEYS) do
  local tat, new_tat, interval, limit = tats[i][1], tats[i][2], tats[i][3], tats[i][4]
  local used_until = tat
  if allowed == 1 then
    redis.call('SET', key, new_tat, 'PX', math.ceil(new_tat - now) + 1000)
    used_until = new_tat
  end
  local remaining = math.floor((now + period - used_until) / interval)
  if remaining < 0 then remaining = 0 end
  if best_remaining < 0 or remaining < best_remaining then
    best_limit, best_remaining, best_reset = limit, remaining, used_until - now
  end
end
return {allowed, best_limit, best_remaining, math.ceil(best_reset), math.ceil(retry_after)}
"""

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
        self._runner = runner
        self._sha = runner.register(_GCRA)

    async def charge(
        self, limits: Sequence[tuple[str, int]], *, period_ms: int = MINUTE_MS
    ) -> Verdict:
        """Charge one request against every (key, limit per period) at once."""
        keys = [k for k, _ in limits]
        args = [period_ms, *(max(1, n) for _, n in limits)]
        allowed, limit, remaining, reset_ms, retry_ms = await self._runner.run_one(
            self._sha, keys, args
        )
        return Verdict(
            allowed=bool(allowed),
            limit=int(limit),
            remaining=int(remaining),
            reset_s=math.ceil(int(reset_ms) / 1000),
            retry_after_s=math.ceil(int(retry_ms) / 1000),
            window_s=period_ms // 1000,
        )


PLAN_CACHE_S = 30.0


class ChurchLimits:
    """Each church's requests per minute: its own override, else its plan's.

    Read on every request, changed almost never, so each process keeps them for
    half a minute; a plan change applies everywhere within that time.
    """

    def __init__(self, pool: Pool, plans: dict[str, int]) -> None:
        self._pool = pool
        self._plans = plans
        self._known: dict[uuid.UUID, tuple[int, float]] = {}

    async def per_minute(self, church_id: uuid.UUID) -> int:
        now = time.monotonic()
        known = self._known.get(church_id)
        if known is not None and known[1] > now:
            return known[0]
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT plan, rate_limit_per_min FROM church WHERE id = %s", (church_id,)
            )
            row = await cur.fetchone()
        value = self._plans["starter"]
        if row is not None:
            value = row[1] or self._plans.get(row[0], value)
        if len(self._known) > 100_000:
            self._known.clear()
        self._known[church_id] = (value, now + PLAN_CACHE_S)
        return value
