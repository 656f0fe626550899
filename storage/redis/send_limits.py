"""Sending limits and the provider circuit, shared by every worker through Redis.

One provider account (the Telnyx API key) has a token bucket of its own, one for
its MMS (texts with media ask it too: ``KOINONIA_MMS_RATE_PER_ACCOUNT``) and one
per sending number, and one circuit breaker. The account's buckets and circuit
carry the account's hash tag (one provider account is one key by nature); each
number's bucket carries a tag of its own, so the numbers spread over a Redis
Cluster's masters. An admission is therefore two single-slot scripts, in this
order:

1. the number's bucket (``send_take``): as many tokens as it can give, at most
   what was asked, or none and the wait;
2. only when the number gave some: the circuit and the account's bucket, with
   its MMS bucket for a text with media (``send_admit``, one script: same tag),
   asked for what the number gave; whatever the account did
   not grant goes back to the number's bucket (``send_refund``).

Number first because throttling by number is the common wait (a long code sends
about one text a second): a throttled batch then never touches the account's
slot, which sees one call per admitted chunk (a hundred texts), never per text.
The two steps are not atomic together: a crash between them loses at most the
tokens the number gave (they refill within its burst time); it cannot send a
text twice or lose one, since tokens only pace sending. While the number is
throttled, the circuit is not read: the answer says ``closed`` and the caller
learns of an open circuit on its next try.

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

_TAKE_LUA = lua("send_take")

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
        self._take = scripts.register(_TAKE_LUA)
        self._tag = key_names.hash_tag(self.circuit_key)

    def bucket(self, name: str, rate: float, burst_s: float) -> Bucket:
        return Bucket(key_names.send_bucket(self.account, name), rate, max(1.0, rate * burst_s))

    async def admit(self, buckets: list[Bucket], want: int, probe_ms: int) -> Admission:
        """Tokens for up to ``want`` texts from every bucket, through the circuit;
        ``limited_by`` is an index into ``buckets``. Buckets outside the account's
        tag go first, one script per tag (see the module's docstring)."""
        own = [i for i, b in enumerate(buckets) if key_names.hash_tag(b.key) == self._tag]
        taken: list[list[int]] = []
        for group in _by_tag(buckets, exclude=self._tag):
            args: list[Any] = [want]
            for i in group:
                args += [buckets[i].rate, buckets[i].capacity]
            granted, wait_ms, limiter = await self._scripts.run_one(
                self._take, [buckets[i].key for i in group], args
            )
            if not int(granted):
                await self._give_back(buckets, taken, want)
                return Admission(
                    granted=0,
                    wait_s=int(wait_ms) / 1000,
                    circuit=CLOSED,
                    probe=False,
                    limited_by=group[int(limiter) - 1] if int(limiter) else -1,
                )
            # Every earlier group gave ``want`` (the smallest grant so far); give
            # back to them what this one could not match.
            await self._give_back(buckets, taken, want - int(granted))
            want = int(granted)
            taken.append(group)
        args = [want, probe_ms]
        for i in own:
            args += [buckets[i].rate, buckets[i].capacity]
        granted, wait_ms, code, probe, limiter = await self._scripts.run_one(
            self._admit, [self.circuit_key, *(buckets[i].key for i in own)], args
        )
        await self._give_back(buckets, taken, want - int(granted))
        return Admission(
            granted=int(granted),
            wait_s=int(wait_ms) / 1000,
            circuit=_STATE_OF_CODE[int(code)],
            probe=bool(int(probe)),
            limited_by=own[int(limiter) - 1] if int(limiter) else -1,
        )

    async def _give_back(self, buckets: list[Bucket], groups: list[list[int]], tokens: int) -> None:
        if tokens > 0 and groups:
            await self.refund([buckets[i] for group in groups for i in group], tokens)

    async def pause(self, buckets: list[Bucket], seconds: float) -> None:
        ms = max(1, round(seconds * 1000))
        await self._scripts.run(
            [(self._pause, [buckets[i].key for i in group], [ms]) for group in _by_tag(buckets)]
        )

    async def refund(self, buckets: list[Bucket], tokens: int) -> None:
        limited = [b for b in buckets if b.rate > 0]
        if tokens > 0 and limited:
            # One script per hash tag, pipelined (one round trip per master).
            await self._scripts.run(
                [
                    (
                        self._refund,
                        [limited[i].key for i in group],
                        [tokens, *(limited[i].capacity for i in group)],
                    )
                    for group in _by_tag(limited)
                ]
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


def _by_tag(buckets: list[Bucket], exclude: str | None = None) -> list[list[int]]:
    """Indexes of ``buckets`` grouped by hash tag (first seen first): each group is
    one script on one Redis Cluster slot."""
    groups: dict[str, list[int]] = {}
    for i, b in enumerate(buckets):
        tag = key_names.hash_tag(b.key)
        if tag != exclude:
            groups.setdefault(tag, []).append(i)
    return list(groups.values())


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
