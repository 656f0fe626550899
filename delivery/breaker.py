"""The provider circuit breaker, as one worker sees and feeds it.

The state is shared by every worker in Redis (storage/redis/send_limits.py), for
three reasons: an outage is the provider's, not one worker's, so the first
worker to see it stops them all; exactly one probe goes out per cool-down
however many workers wait; and operators see the state in ``/health/detailed``.
Sends are admitted through the circuit in the same script that takes tokens, so
checking it costs no extra round trip.

What counts: answers that say the provider is not serving (5xx, 408, timeouts,
connection errors). ``N`` of them in a row (``circuit_failures``, counted across
workers) open the circuit for ``circuit_cooldown_s``; then one probe text goes;
its success closes the circuit, its failure opens it again. While the circuit
is open nothing is sent and the work waits in the churches' delayed sets.

Attempts: a recipient's attempts are for failures of that one send. A failure
that opens the circuit, or arrives while it is open, says the provider is down
and is retried at the same attempt, so an outage of any length dead-letters
nobody; an isolated 5xx with the circuit closed uses an attempt as before.

This object keeps the last state it learnt, to hold off reading new work while
the circuit is open, and skips the Redis call for plain successes when the
circuit was clean.
"""

from __future__ import annotations

import logging
import time

from storage.process.settings import DeliverySettings
from storage.redis.send_limits import CLOSED, Admission, CircuitChange, ProviderLimits

log = logging.getLogger("koinonia.delivery.breaker")


class CircuitBreaker:
    def __init__(self, limits: ProviderLimits, settings: DeliverySettings) -> None:
        self._limits = limits
        self._threshold = settings.circuit_failures
        self._cooldown_ms = max(1, round(settings.circuit_cooldown_s * 1000))
        self._blocked_until = 0.0
        self._clean = False
        """Last known: closed with no failures counted, so a success changes nothing.
        Not known at start: the shared state may hold another worker's failures (one
        that died mid-outage), and only a reported success clears them."""

    def observe(self, admission: Admission) -> None:
        """Learn from an admission: an open circuit holds off this worker's reads."""
        if admission.circuit != CLOSED and not admission.granted:
            self._blocked_until = time.monotonic() + admission.wait_s
            self._clean = False

    def blocked_for(self) -> float:
        """Seconds this worker should not take new work (0: go ahead)."""
        return max(0.0, self._blocked_until - time.monotonic())

    async def record(
        self, successes: int, failures: int, *, probe: bool, why: str | None = None
    ) -> CircuitChange | None:
        """Count one chunk's answers; None when nothing needed telling."""
        if not failures and not probe and self._clean:
            return None
        change = await self._limits.record(
            successes,
            failures,
            threshold=self._threshold,
            cooldown_ms=self._cooldown_ms,
            probe=probe,
        )
        self._clean = change.state == CLOSED and not failures
        if change.state != CLOSED:
            wait_s = max(0.0, change.open_until_ms / 1000 - time.time())
            self._blocked_until = time.monotonic() + wait_s
        else:
            self._blocked_until = 0.0
        if change.opened:
            log.warning(
                "provider circuit opened",
                extra={"failures": failures, "error": why, "cooldown_s": self._cooldown_ms / 1000},
            )
        elif change.closed:
            log.warning("provider circuit closed")
        return change
