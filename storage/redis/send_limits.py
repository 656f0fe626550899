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
from storage.redis.scripts import ScriptRunner, lua

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
CIRCUIT_STATES = (CLOSED, OPEN, HALF_OPEN)


def account_id(provider: ProviderSettings) -> str:
    """A stable name for the provider account: a digest of its URL and key (the key
    itself never appears in a Redis key)."""
    digest = hashlib.sha256(f"{provider.base_url}|{provider.api_key}".encode()).hexdigest()
    return digest[:16]


_ADMIT_LUA = lua("send_admit")

_PAUSE_LUA = lua("send_pause")

_REFUND_LUA = lua("send_refund")

_RECORD_LUA = lua("send_record")

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
