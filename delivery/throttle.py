"""Pacing sends: per sending number and per provider account, shared by every worker.

The buckets live in Redis (storage/redis/send_limits.py): a script takes tokens
from the number's bucket (its own hash tag), then one checks the circuit and takes
them from the account's bucket, giving back to the number what the account did not.
A batch asks for tokens for all its recipients and gets as many as both buckets
can give; it sends those, and asks again for the rest. When none are left the
answer carries the wait: a short one (up to ``throttle_hold_s``) the batch sleeps
in place; a longer one hands the rest of the batch back to the church's delayed
set (same attempt: waiting is not failing) and frees the worker.

A text with media (an MMS) also takes a token from the account's MMS bucket
(``KOINONIA_MMS_RATE_PER_ACCOUNT``): carriers and Telnyx allow fewer MMS than SMS a
second. That bucket carries the account's hash tag, so it is taken in the same
script and the same call as the account's own bucket.

A ``429`` from the provider pauses the account's bucket for the answer's
``Retry-After``: Telnyx limits requests per account, and every worker stops
sending through it until then.
"""

from __future__ import annotations

from storage.process.settings import DeliverySettings
from storage.redis.send_limits import Admission, Bucket, ProviderLimits

ACCOUNT = 0
"""Index of the account's bucket in ``Throttle.buckets``; the number's is 1."""
MMS = 2
"""Index of the account's MMS bucket, in the buckets of a text with media."""


class Throttle:
    def __init__(self, limits: ProviderLimits, settings: DeliverySettings, probe_ms: int) -> None:
        self._limits = limits
        self._settings = settings
        self._probe_ms = probe_ms
        self._account = limits.bucket("account", settings.rate_per_account, settings.rate_burst_s)
        self._mms = limits.bucket("mms", settings.mms_rate_per_account, settings.rate_burst_s)
        self._numbers: dict[str, list[Bucket]] = {}

    def buckets(self, number: str, mms: bool = False) -> list[Bucket]:
        """The account's and the number's buckets, and the MMS one for a text with media."""
        found = self._numbers.get(number)
        if found is None:
            s = self._settings
            found = [
                self._account,
                self._limits.bucket(f"n:{number}", s.rate_per_number, s.rate_burst_s),
            ]
            if len(self._numbers) > 10_000:
                self._numbers.clear()
            self._numbers[number] = found
        return [*found, self._mms] if mms else found

    async def admit(self, number: str, want: int, mms: bool = False) -> Admission:
        """Tokens for up to ``want`` texts from ``number`` (through the circuit); ``mms``:
        the texts carry media."""
        return await self._limits.admit(self.buckets(number, mms), want, self._probe_ms)

    async def refund(self, number: str, tokens: int, mms: bool = False) -> None:
        """Give back tokens taken for texts that were not sent after all."""
        s = self._settings
        if tokens > 0 and (
            s.rate_per_account > 0 or s.rate_per_number > 0 or (mms and s.mms_rate_per_account > 0)
        ):
            await self._limits.refund(self.buckets(number, mms), tokens)

    async def provider_said_wait(self, seconds: float) -> None:
        """The provider answered 429: nobody sends through the account for ``seconds``."""
        await self._limits.pause([self._account], seconds)
