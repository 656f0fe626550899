"""Sending limits and the provider circuit, shared by every worker through Redis.

One provider account (the Telnyx API key) has a token bucket of its own and one
per sending number, and one circuit breaker. All of them carry the account's
hash tag, so a single Lua script checks the circuit and takes tokens from the
account's and the number's bucket atomically (all or nothing). That puts every
send decision of one account on one Redis Cluster slot: one call per batch (a
hundred texts), never per text, and the account's limit is one counter by nature.

Buckets hold ``rate * burst_s`` tokens and refill continuously; the script grants
as many tokens as every bucket can give (at most what was asked), or none and
the wait until it could grant a useful share. A ``429`` from the provider pauses
a bucket for its ``Retry-After``. Times are the Redis server's clock, so workers
on several hosts agree.

Circuit states: ``closed`` (sends go), ``open`` (none until ``until``), and
``half_open`` (exactly one caller, the probe, may send one text; the others wait
for its answer). Enough consecutive failures (5xx, timeouts, connection errors)
open a closed circuit; a failed probe opens it again; any success closes it.
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec

from storage.process.settings import ProviderSettings
from storage.redis import key_names
from storage.redis.connection import Redis
from storage.redis.scripts import ScriptRunner

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
CIRCUIT_STATES = (CLOSED, OPEN, HALF_OPEN)


def account_id(provider: ProviderSettings) -> str:
    """A stable name for the provider account: a digest of its URL and key (the key
    itself never appears in a Redis key)."""
    digest = hashlib.sha256(f"{provider.base_url}|{provider.api_key}".encode()).hexdigest()
    return digest[:16]


# KEYS: circuit, then buckets. ARGV: want, probe ms, then rate and capacity per
# bucket (rate <= 0: no limit, but a pause still holds). Returns {granted, wait ms,
# circuit state (0 closed, 1 open, 2 half-open), probe (0/1), the bucket that made
# the longest wait (1-based; 0: the circuit or none)}.
_ADMIT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local want = tonumber(ARGV[1])
local circuit = redis.call('HMGET', KEYS[1], 's', 'u', 'pu')
local state, probe = circuit[1] or 'closed', 0
if state == 'open' then
  local u = tonumber(circuit[2] or 0)
  if now < u then return {0, u - now, 1, 0, 0} end
  state = 'half_open'
  redis.call('HSET', KEYS[1], 's', 'half_open', 't', now)
end
if state == 'half_open' then
  local pu = tonumber(circuit[3] or 0)
  if now < pu then return {0, math.min(pu - now, 1000), 2, 0, 0} end
  redis.call('HSET', KEYS[1], 'pu', now + tonumber(ARGV[2]))
  probe, want = 1, 1
end
local grant, wait, limiter = want, 0, 0
local levels = {}
for i = 2, #KEYS do
  local rate, cap = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
  local b = redis.call('HMGET', KEYS[i], 't', 'ts', 'p')
  local paused = tonumber(b[3] or 0)
  if now < paused then
    if paused - now > wait then wait, limiter = paused - now, i - 1 end
    grant = 0
  end
  if rate > 0 then
    local level = tonumber(b[1] or cap)
    local ts = tonumber(b[2] or now)
    level = math.min(cap, level + math.max(0, now - ts) * rate / 1000)
    levels[i] = level
    local need = math.min(want, math.max(1, math.floor(cap / 4)))
    if level < need then
      grant = 0
      local w = math.ceil((need - level) * 1000 / rate)
      if w > wait then wait, limiter = w, i - 1 end
    else
      grant = math.min(grant, math.floor(level))
    end
  end
end
if grant <= 0 then
  if probe == 1 then redis.call('HSET', KEYS[1], 'pu', 0) end
  local code = 0
  if state == 'half_open' then code = 2 end
  return {0, math.max(wait, 1), code, 0, limiter}
end
for i = 2, #KEYS do
  local rate, cap = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
  if rate > 0 then
    redis.call('HSET', KEYS[i], 't', levels[i] - grant, 'ts', now)
    redis.call('PEXPIRE', KEYS[i], math.max(60000, math.ceil(cap * 2000 / rate)))
  end
end
local code = 0
if state == 'half_open' then code = 2 end
return {grant, 0, code, probe, 0}
"""

# KEYS: buckets. ARGV: pause ms. Nothing is granted from them until then.
_PAUSE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local untl = now + tonumber(ARGV[1])
for i = 1, #KEYS do
  local p = tonumber(redis.call('HGET', KEYS[i], 'p') or 0)
  if untl > p then
    redis.call('HSET', KEYS[i], 'p', untl)
    redis.call('PEXPIRE', KEYS[i], math.max(60000, tonumber(ARGV[1]) * 2))
  end
end
return untl
"""

# KEYS: buckets. ARGV: tokens, then capacity per bucket. Gives back what was taken
# but not used (recipients already sent or opted out), never past capacity.
_REFUND_LUA = """
for i = 1, #KEYS do
  local level = redis.call('HGET', KEYS[i], 't')
  if level then
    local cap = tonumber(ARGV[i + 1])
    redis.call('HSET', KEYS[i], 't', math.min(cap, tonumber(level) + tonumber(ARGV[1])))
  end
end
return 1
"""

# KEYS: circuit. ARGV: successes, failures, threshold, cool-down ms, probe (0/1).
# Returns {state code, open until ms, 1 when this call opened it, 1 when it closed it}.
_RECORD_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ok, bad = tonumber(ARGV[1]), tonumber(ARGV[2])
local c = redis.call('HMGET', KEYS[1], 's', 'f', 'u')
local state, failures, u = c[1] or 'closed', tonumber(c[2] or 0), tonumber(c[3] or 0)
if ok > 0 then
  if state ~= 'closed' or failures > 0 then
    redis.call('HSET', KEYS[1], 's', 'closed', 'f', 0, 'pu', 0, 't', now)
    if state ~= 'closed' then return {0, 0, 0, 1} end
  end
  return {0, 0, 0, 0}
end
if bad == 0 then
  if tonumber(ARGV[5]) == 1 then redis.call('HSET', KEYS[1], 'pu', 0) end
  local code = 0
  if state == 'open' then code = 1 elseif state == 'half_open' then code = 2 end
  return {code, u, 0, 0}
end
if state == 'open' then return {1, u, 0, 0} end
failures = failures + bad
if state == 'half_open' or failures >= tonumber(ARGV[3]) then
  u = now + tonumber(ARGV[4])
  redis.call('HSET', KEYS[1], 's', 'open', 'f', 0, 'u', u, 'pu', 0, 't', now)
  redis.call('HINCRBY', KEYS[1], 'o', 1)
  return {1, u, 1, 0}
end
redis.call('HSET', KEYS[1], 'f', failures)
return {0, 0, 0, 0}
"""

_STATE_OF_CODE = {0: CLOSED, 1: OPEN, 2: HALF_OPEN}


class Admission(msgspec.Struct, frozen=True):
    granted: int
    """Texts that may go now (0: none)."""
    wait_s: float
    """When none may: how long until some could."""
    circuit: str
    probe: bool
    """This caller is the half-open circuit's one probe: its result decides."""
    limited_by: int = -1
    """Index of the bucket behind ``wait_s`` (-1: the circuit, or no wait)."""


class CircuitChange(msgspec.Struct, frozen=True):
    state: str
    open_until_ms: int
    opened: bool
    """This record opened the circuit."""
    closed: bool
    """This record closed it after it had been open."""


class Bucket(msgspec.Struct, frozen=True):
    key: str
    rate: float
    capacity: float


class ProviderLimits:
    """The Redis side of one provider account's buckets and circuit."""

    def __init__(self, scripts: ScriptRunner, account: str) -> None:
        self._scripts = scripts
        self.account = account
        self.circuit_key = key_names.provider_circuit(account)
        self._admit = scripts.register(_ADMIT_LUA)
        self._pause = scripts.register(_PAUSE_LUA)
        self._refund = scripts.register(_REFUND_LUA)
        self._record = scripts.register(_RECORD_LUA)

    def bucket(self, name: str, rate: float, burst_s: float) -> Bucket:
        return Bucket(key_names.send_bucket(self.account, name), rate, max(1.0, rate * burst_s))

    async def admit(self, buckets: list[Bucket], want: int, probe_ms: int) -> Admission:
        args: list[Any] = [want, probe_ms]
        for b in buckets:
            args += [b.rate, b.capacity]
        granted, wait_ms, code, probe, limiter = await self._scripts.run_one(
            self._admit, [self.circuit_key, *(b.key for b in buckets)], args
        )
        return Admission(
            granted=int(granted),
            wait_s=int(wait_ms) / 1000,
            circuit=_STATE_OF_CODE[int(code)],
            probe=bool(int(probe)),
            limited_by=int(limiter) - 1,
        )

    async def pause(self, buckets: list[Bucket], seconds: float) -> None:
        await self._scripts.run_one(
            self._pause, [b.key for b in buckets], [max(1, round(seconds * 1000))]
        )

    async def refund(self, buckets: list[Bucket], tokens: int) -> None:
        limited = [b for b in buckets if b.rate > 0]
        if tokens > 0 and limited:
            await self._scripts.run_one(
                self._refund, [b.key for b in limited], [tokens, *(b.capacity for b in limited)]
            )

    async def record(
        self, successes: int, failures: int, *, threshold: int, cooldown_ms: int, probe: bool
    ) -> CircuitChange:
        code, until, opened, closed = await self._scripts.run_one(
            self._record,
            [self.circuit_key],
            [successes, failures, max(1, threshold), cooldown_ms, int(probe)],
        )
        return CircuitChange(
            state=_STATE_OF_CODE[int(code)],
            open_until_ms=int(until),
            opened=bool(int(opened)),
            closed=bool(int(closed)),
        )


async def circuit_snapshot(redis: Redis, account: str) -> dict[str, Any]:
    """The circuit as /health/detailed shows it."""
    raw: Any = await redis.hgetall(key_names.provider_circuit(account))
    fields = {_text(k): _text(v) for k, v in raw.items()}
    state = fields.get("s", CLOSED)
    snapshot: dict[str, Any] = {
        "state": state,
        "consecutive_failures": int(fields.get("f", 0)),
        "times_opened": int(fields.get("o", 0)),
    }
    if state == OPEN:
        snapshot["open_until_ms"] = int(fields.get("u", 0))
    return snapshot


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
