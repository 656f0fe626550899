"""Outgoing integrator webhooks: the dispatcher loop that runs inside each worker.

Loop shape: claim due deliveries (``FOR UPDATE SKIP LOCKED`` with a lease, so
any number of workers share the work) → one task per delivery POSTs it
(``delivery/webhook_sender.py``) → ``record_outcome`` logs the attempt and
decides: done, retry after the next delay of the schedule, failed, or the
endpoint disabled. At most ``concurrency`` requests are in flight per worker
and ``per_endpoint_concurrency`` to one endpoint, so one slow receiver cannot
hold every slot. An idle worker looks again every ``poll_s``. SIGTERM stops
claiming and lets requests in flight finish (their leases cover a crash).

A delivery's log lines carry its ``church_id``, ``endpoint_id`` and ``event_id``;
with tracing on, each claimed batch is one span that ends with its last delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter
from typing import TYPE_CHECKING, Protocol

import aiohttp

from delivery.webhook_sender import attempt, open_session
from storage.pg.webhook_outbox import DueDelivery, claim_due, forget_old, record_outcome, release
from storage.process import tracing
from storage.process.logs import log_context
from storage.process.services import Services

if TYPE_CHECKING:
    from opentelemetry.trace import Span
    from prometheus_client import Counter as PromCounter

log = logging.getLogger("koinonia.delivery.webhooks")

LEASE_EXTRA_S = 60.0
"""A claimed delivery is retried by another worker this long after its timeout."""
CLEANUP_EVERY_S = 300.0


class BatchSpan:
    """The span of one claimed batch of deliveries, ended with its last delivery."""

    def __init__(self, span: Span, deliveries: int) -> None:
        self.span = span
        self.left = deliveries
        self.failed = 0

    def finish(self, ok: bool) -> None:
        self.left -= 1
        self.failed += 0 if ok else 1
        if self.left == 0:
            self.span.set_attribute("koinonia.webhook.failed", self.failed)
            tracing.end(self.span)


_OUTCOME = {"succeeded": "delivered", "failed": "gave_up"}
"""koinonia_webhook_deliveries_total's outcome for a delivery's status after an
attempt; ``pending`` and ``paused`` (a retry is due) count as ``failed``."""


class WebhookDispatcher:
    def __init__(self, services: Services) -> None:
        self.services = services
        self.settings = services.settings.webhooks
        self._stopping = asyncio.Event()
        self._room = asyncio.Event()
        self._inflight: set[asyncio.Task[None]] = set()
        self._per_endpoint: Counter[uuid.UUID] = Counter()
        # koinonia_webhook_deliveries_total by outcome, bound once; None: not measured.
        self._outcomes: dict[str, PromCounter] | None = None
        self._disabled: PromCounter | None = None
        if (m := services.metrics) is not None:
            self._outcomes = {
                o: m.webhook_deliveries.labels(o) for o in ("delivered", "failed", "gave_up")
            }
            self._disabled = m.webhook_endpoints_disabled

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        session = open_session(self.settings)
        cleanup = asyncio.create_task(self._cleanup_loop(), name="webhook-cleanup")
        log.info("webhook dispatcher started")
        try:
            while not self._stopping.is_set():
                started, wanted = 0, 0
                try:
                    started, wanted = await self._claim_and_start(session)
                except Exception:
                    log.exception("webhook claim failed")
                if wanted and started == wanted:
                    continue  # more may be due at once
                await self._pause()
            if self._inflight:
                await asyncio.wait(self._inflight, timeout=self.settings.timeout_s + 5)
        finally:
            cleanup.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await cleanup
            await session.close()
            log.info("webhook dispatcher stopped")

    async def _pause(self) -> None:
        """Until the poll interval passes, a slot frees up while all are taken, or stop."""
        self._room.clear()
        waits = [asyncio.ensure_future(self._stopping.wait())]
        if len(self._inflight) >= self.settings.concurrency:
            waits.append(asyncio.ensure_future(self._room.wait()))
        try:
            await asyncio.wait(
                waits, timeout=self.settings.poll_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for w in waits:
                w.cancel()

    async def _claim_and_start(self, session: aiohttp.ClientSession) -> tuple[int, int]:
        free = self.settings.concurrency - len(self._inflight)
        if free <= 0:
            return 0, 0
        cap = self.settings.per_endpoint_concurrency
        busy = [e for e, n in self._per_endpoint.items() if n >= cap]
        claim_ns = time.time_ns() if tracing.enabled() else None
        async with self.services.pool.connection() as conn:
            claimed = await claim_due(
                conn,
                limit=free,
                lease_s=self.settings.timeout_s + LEASE_EXTRA_S,
                skip_endpoints=busy,
            )
            extra: list[DueDelivery] = []
            starting: list[DueDelivery] = []
            for due in claimed:
                if self._per_endpoint[due.endpoint_id] >= cap:
                    extra.append(due)
                else:
                    self._per_endpoint[due.endpoint_id] += 1
                    starting.append(due)
            batch = self._batch_span(starting, claim_ns)
            # The deliveries' tasks inherit the batch's span as their current one.
            with tracing.use(batch.span if batch is not None else None):
                for due in starting:
                    self._start(session, due, batch)
            if extra:
                await release(conn, extra)
        return len(claimed) - len(extra), free

    def _batch_span(self, starting: list[DueDelivery], claim_ns: int | None) -> BatchSpan | None:
        if not starting or claim_ns is None:
            return None
        span = tracing.start_span(
            "webhook batch",
            kind="client",
            attributes={
                "koinonia.webhook.deliveries": len(starting),
                "koinonia.webhook.endpoints": len({d.endpoint_id for d in starting}),
            },
            start_ns=claim_ns,
        )
        return BatchSpan(span, len(starting)) if span is not None else None

    def _start(
        self, session: aiohttp.ClientSession, due: DueDelivery, batch: BatchSpan | None
    ) -> None:
        """Deliver in a task of its own (its endpoint's slot is counted already)."""
        task = asyncio.create_task(self._deliver(session, due, batch))
        self._inflight.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._inflight.discard(t)
            self._per_endpoint[due.endpoint_id] -= 1
            if self._per_endpoint[due.endpoint_id] <= 0:
                del self._per_endpoint[due.endpoint_id]
            self._room.set()

        task.add_done_callback(done)

    async def _deliver(
        self, session: aiohttp.ClientSession, due: DueDelivery, batch: BatchSpan | None = None
    ) -> None:
        ok = False
        with log_context(
            church_id=str(due.church_id),
            endpoint_id=str(due.endpoint_id),
            event_id=str(due.event_id),
        ):
            try:
                outcome = await attempt(session, due, self.settings)
                ok = outcome.succeeded
                async with self.services.pool.connection() as conn:
                    recorded = await record_outcome(conn, due, outcome, self.settings)
            except Exception:
                # The lease runs out and another claim retries it.
                log.exception("webhook delivery failed")
                return
            finally:
                if batch is not None:
                    batch.finish(ok)
            if recorded is not None and self._outcomes is not None:
                self._outcomes[_OUTCOME.get(recorded.status, "failed")].inc()
                if recorded.disabled and self._disabled is not None:
                    self._disabled.inc()
            if recorded is not None and recorded.disabled:
                log.warning("webhook endpoint disabled", extra={"reason": recorded.disabled})

    async def _cleanup_loop(self) -> None:
        """Forget events, deliveries and attempts past retention, a batch at a time."""
        while True:
            await asyncio.sleep(CLEANUP_EVERY_S)
            try:
                async with self.services.pool.connection() as conn:
                    deleted = await forget_old(conn, self.settings.retention_days)
                    while deleted:
                        deleted = await forget_old(conn, self.settings.retention_days)
            except Exception:
                log.exception("webhook cleanup failed")


class Runner(Protocol):
    def stop(self) -> None: ...

    async def run(self) -> None: ...


class Alongside:
    """Runs several runners in one process as one: stop stops all, run ends when all
    have ended, and one that fails stops the others and re-raises."""

    def __init__(self, *runners: Runner) -> None:
        self._runners = runners

    def stop(self) -> None:
        for runner in self._runners:
            runner.stop()

    async def run(self) -> None:
        tasks = [asyncio.create_task(r.run()) for r in self._runners]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            self.stop()
            results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
