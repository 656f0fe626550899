"""The scheduler: periodic jobs that keep accepted work moving.

- scheduled sends: messages whose ``send_at`` has come are claimed with
  ``FOR UPDATE SKIP LOCKED``, turned ``queued`` in the same transaction, then
  enqueued for materialization;
- recurring messages: each due occurrence is made exactly once (a row lock and
  a unique occurrence key, storage/pg/recurring_schedules.py) into an ordinary message;
- partitions: keep the current month and the next three in place;
- materialization sweep: accepted broadcasts whose materialize entry was lost
  (Redis flushed, or down at acceptance) are enqueued again;
- reconciler: recipients left ``queued`` or ``sending`` without a provider id
  past ``reconcile_after_s`` are enqueued again, a broadcast's or the one
  recipient of a staff reply or an automatic answer alike;
- quiet hours: recipients held for their local sending window (``not_before``,
  storage/pg/recipients.py) are enqueued when it opens, once across any number of
  schedulers (``FOR UPDATE SKIP LOCKED`` in the statement that clears the hold);
- receipts: a text the provider accepted whose final receipt has not come after
  ``receipt_timeout_s`` is looked up at the provider (``GET /v2/messages/{id}``)
  and what it says applied like a receipt; past ``receipt_window_s`` it ends
  ``sent``, unconfirmed and final;
- completion: every ``sending`` message whose recipients are all final completes,
  with one ``message.completed``, decided from Postgres (the progress counters in
  Redis are a fast path that may have been lost);
- archive: once a day at ``KOINONIA_ARCHIVE_HOUR_UTC``, never at start-up, months
  older than ``KOINONIA_ARCHIVE_AFTER_MONTHS`` move to the object store
  (storage/archive/archiver.py), in a task of its own so the other jobs keep their
  pace; off when that setting is 0;
- provider-event pruning: the dedupe record of a provider webhook is kept a
  week (providers stop retrying within a day or two), then deleted in small
  batches. It is not message data. Postgres is the truth, so an
  empty Redis only delays delivery; the provider idempotency key keeps a repeat
  from texting anyone twice.

Every job runs with ``job`` (its name) in the log context (storage/process/logs.py).
Batches a sweep enqueues carry their message's stored trace context, and receipt
lookups are one span per message and round in that trace (storage/process/tracing.py).

Any number of schedulers may run: the three sending jobs claim rows with ``SKIP
LOCKED`` (two schedulers take different rows, never the same one); each other
job takes a transaction-scoped advisory lock with ``pg_try_advisory_xact_lock``
and skips its turn when another holds it (the archive's lock is a session's, held
for the run). Only the archive drops message data, after its files are verified.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import msgspec

from delivery.progress import ProgressTracker
from delivery.provider import Provider
from delivery.receipts import ReceiptSpans
from delivery.telnyx import TelnyxProvider
from storage.archive.archiver import Archiver, ArchiveReport, months_kept_before
from storage.domain.ids import created_at_of
from storage.domain.statuses import (
    UNCONFIRMED,
    RecipientStatus,
    can_transition,
    from_telnyx,
    is_final,
)
from storage.pg.advisory_locks import try_xact_lock
from storage.pg.churches import sending_number
from storage.pg.database import Conn
from storage.pg.held_recipients import release_held
from storage.pg.messages import (
    SendTexts,
    announce_started,
    claim_due_scheduled,
    unstarted_scheduled,
)
from storage.pg.partitions import ensure_partitions
from storage.pg.provider_events import delete_old_provider_events
from storage.pg.recipients import (
    AwaitingReceipt,
    ProviderStatus,
    apply_provider_statuses,
    claim_awaiting_receipts,
    finished_messages,
    pending_materialization,
    stale_open_recipients,
    touch,
)
from storage.pg.recurring_schedules import Ran, run_next_due
from storage.process.logs import log_context
from storage.process.services import Services
from storage.redis.queue import MaterializeJob, SendBatch, enqueue_materialize, enqueue_sends

log = logging.getLogger("koinonia.delivery.scheduler")

_LOCK_PARTITIONS = 7_311_020_201
_LOCK_RECONCILE = 7_311_020_202
_LOCK_PRUNE = 7_311_020_203
PROVIDER_EVENT_RETENTION = timedelta(days=7)
_PRUNE_BATCH = 5000
_PARTITION_EVERY_S = 3600.0
_RECURRING_PER_TICK = 200
_RELEASE_BATCH = 5000


def next_archive_at(after: datetime, hour_utc: int) -> datetime:
    """The first ``hour_utc``:00 UTC strictly after ``after``."""
    at = after.astimezone(UTC).replace(hour=hour_utc, minute=0, second=0, microsecond=0)
    return at if at > after else at + timedelta(days=1)


def archive_due(now: datetime, since: datetime, hour_utc: int) -> bool:
    """Whether the daily archive is due at ``now``, the last run (or the scheduler's
    start) having been at ``since``: a scheduler started at 03:20 waits for the next
    day's 03:00, never runs at start-up."""
    return now >= next_archive_at(since, hour_utc)


def _utc_now() -> datetime:
    return datetime.now(UTC)


class Scheduler:
    def __init__(
        self,
        services: Services,
        provider: Provider | None = None,
        *,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self.services = services
        self.clock = clock
        """What the archive's daily run reads the time from (a test's own clock)."""
        self._archive_since = clock()
        self._archive_task: asyncio.Task[ArchiveReport | None] | None = None
        self.settings = services.settings.delivery
        settings = services.settings.provider
        self.provider = provider or TelnyxProvider(
            settings.base_url,
            settings.api_key,
            timeout_s=settings.timeout_s,
            concurrency=16,
            metrics=services.metrics,
        )
        self.progress = ProgressTracker(
            services.redis, services.scripts, services.pool, services.relay
        )
        self._stopping = asyncio.Event()
        self._last_partitions = 0.0
        self._next_completion = 0.0
        self._next_receipts = 0.0
        self._texts = SendTexts(services.pool)
        # One span per message and lookup round (window 0: closed after each round).
        self._lookup_spans = ReceiptSpans("receipt lookups", self._texts, window_s=0.0)

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        log.info("scheduler started")
        while not self._stopping.is_set():
            try:
                await self.tick()
            except Exception:
                log.exception("scheduler tick failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.settings.scheduler_interval_s)
        if self._archive_task is not None:
            # Stopped mid-run, the archive resumes on the next day's run (or a
            # `koinonia archive`): nothing is lost.
            self._archive_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._archive_task
        await self.progress.aclose()
        await self.provider.aclose()
        log.info("scheduler stopped")

    async def tick(self) -> None:
        loop = asyncio.get_running_loop()
        if loop.time() - self._last_partitions > _PARTITION_EVERY_S or not self._last_partitions:
            with log_context(job="premake_partitions"):
                await self.premake_partitions()
            self._last_partitions = loop.time()
        # One failing job does not hold back the others. The two safety nets scan the
        # recipients of every sending message, so they run far less often than a tick:
        # completion a fifth of the reconcile delay, receipt lookups a quarter of the
        # receipt timeout (what they catch is that old anyway).
        now = loop.time()
        jobs: list[Callable[[], Awaitable[object]]] = [
            self.start_scheduled,
            self.run_recurring,
            self.release_quiet,
            self.reconcile,
        ]
        if now >= self._next_completion:
            self._next_completion = now + self.settings.reconcile_after_s / 5
            jobs.append(self.complete_finished)
        if now >= self._next_receipts:
            self._next_receipts = now + self.settings.receipt_timeout_s / 4
            jobs.append(self.reconcile_receipts)
        for job in jobs:
            with log_context(job=job.__name__):
                try:
                    await job()
                except Exception:
                    log.exception("scheduler job failed")
        with log_context(job="prune_provider_events"):
            await self.prune_provider_events()
        with log_context(job="archive"):
            self.maybe_archive()

    def maybe_archive(self) -> bool:
        """Start the daily archive in a task of its own when it is due (and not
        running); returns whether it started."""
        settings = self.services.settings.archive
        if settings.after_months == 0:
            return False
        if self._archive_task is not None and not self._archive_task.done():
            return False
        now = self.clock()
        if not archive_due(now, self._archive_since, settings.hour_utc):
            return False
        self._archive_since = now
        self._archive_task = asyncio.create_task(self.archive(now))
        return True

    async def archive(self, now: datetime) -> ArchiveReport | None:
        """One archive run of the months before ``after_months`` ago; None when another
        run (another scheduler, a `koinonia archive`) holds the lock: it does the work."""
        settings = self.services.settings
        before = months_kept_before(now.date(), settings.archive.after_months)
        archiver = Archiver.for_url(
            settings.database.session_url or settings.database.url, self.services.objects
        )
        with log_context(job="archive"):
            try:
                report = await archiver.run(before, wait=False)
            except Exception:
                log.exception("archive failed")
                return None
            if report is None:
                log.info("archive skipped: another run holds the lock")
            else:
                log.info("archive done", extra=msgspec.structs.asdict(report))
            return report

    async def start_scheduled(self, now: datetime | None = None) -> int:
        """Start every scheduled message whose ``send_at`` has come; returns how many."""
        started = 0
        while True:
            async with self.services.pool.connection() as conn:
                claimed = await claim_due_scheduled(conn, now or datetime.now(UTC))
            for church_id, message in claimed:
                await announce_started(self.services.redis, church_id, message)
            started += len(claimed)
            if not claimed:
                break
        if started:
            log.info("scheduled messages started", extra={"messages": started})
        return started

    async def run_recurring(self, now: datetime | None = None) -> list[Ran]:
        """Make every due recurring occurrence (at most a bounded number per tick)."""
        ran: list[Ran] = []
        for _ in range(_RECURRING_PER_TICK):
            async with self.services.pool.connection() as conn:
                done = await run_next_due(conn, now or datetime.now(UTC))
            if done is None:
                break
            ran.append(done)
            if done.message is not None:
                await announce_started(self.services.redis, done.church_id, done.message)
            log.info(
                "recurring occurrence",
                extra={
                    "recurring_id": str(done.recurring_id),
                    "occurrence_at": done.occurrence_at.isoformat(),
                    "status": done.status,
                },
            )
        return ran

    async def release_quiet(self, now: datetime | None = None) -> int:
        """Enqueue every held recipient whose quiet-hours window has opened; returns
        how many. The hold is cleared when the rows are taken, so a lost enqueue
        leaves ordinary ``queued`` rows that the reconciler finds."""
        released = 0
        while True:
            async with self.services.pool.connection() as conn:
                due = await release_held(conn, now or datetime.now(UTC), _RELEASE_BATCH)
                batches = await self._batches(conn, due)
            await enqueue_sends(self.services.redis, batches, self.settings.shards)
            released += len(due)
            if len(due) < _RELEASE_BATCH:
                break
        if released:
            log.info("quiet hours over", extra={"recipients": released})
        return released

    async def _batches(
        self, conn: Conn, rows: list[tuple[uuid.UUID, uuid.UUID, uuid.UUID]]
    ) -> list[SendBatch]:
        """Send batches of (church, message, recipient) rows, per message, from the
        church's sending number."""
        by_message: dict[tuple[uuid.UUID, uuid.UUID], list[uuid.UUID]] = defaultdict(list)
        for church_id, message_id, recipient_id in rows:
            by_message[(church_id, message_id)].append(recipient_id)
        numbers: dict[uuid.UUID, str] = {}
        batches: list[SendBatch] = []
        # A reply's or answer's one recipient travels with its conversation, for the
        # dead-letter list.
        size = self.settings.batch_size
        for (church_id, message_id), ids in by_message.items():
            if church_id not in numbers:
                numbers[church_id] = await sending_number(conn, church_id) or ""
            ids.sort()
            text = await self._texts.get(church_id, message_id, conn)
            batches += [
                SendBatch(
                    church_id=church_id,
                    message_id=message_id,
                    created_at=created_at_of(message_id),
                    recipient_ids=ids[i : i + size],
                    from_number=numbers[church_id],
                    max_attempts=self.settings.max_attempts,
                    conversation_id=text.conversation_id if text is not None else None,
                    traceparent=text.traceparent if text is not None else "",
                )
                for i in range(0, len(ids), size)
            ]
        return batches

    async def complete_finished(self) -> int:
        """Complete every sending message whose recipients are all final, from Postgres:
        whatever the progress counters in Redis say (or lost). Returns how many."""
        async with self.services.pool.connection() as conn:
            finished = await finished_messages(conn)
        completed = 0
        for church_id, message_id in finished:
            completed += await self.progress.complete(church_id, message_id)
        if completed:
            log.info("messages completed by the sweep", extra={"messages": completed})
        return completed

    async def reconcile_receipts(self, now: datetime | None = None) -> int:
        """Ask the provider about texts whose final receipt never came (lost callbacks,
        a provider that restarted) and apply what it says; past the provider's window a
        recipient ends ``sent``, unconfirmed and final. Returns the statuses applied."""
        at = now or datetime.now(UTC)
        quiet_since = at - timedelta(seconds=self.settings.receipt_timeout_s)
        async with self.services.pool.connection() as conn:
            waiting = await claim_awaiting_receipts(conn, quiet_since)
        if not waiting:
            return 0
        gate = asyncio.Semaphore(16)

        window = timedelta(seconds=self.settings.receipt_window_s)

        async def look(row: AwaitingReceipt) -> ProviderStatus | None:
            async with gate:
                found = await self.provider.lookup(row.provider_message_id)
            status = from_telnyx(found.status) if found is not None else None
            unconfirmed = found is not None and found.status == UNCONFIRMED
            if (
                found is not None
                and status is not None
                and (unconfirmed or is_final(status, found.error_code))
            ):
                event_id = f"lookup:{row.id}:{found.status}"
                if unconfirmed:
                    return self._receipt(row, event_id, RecipientStatus.SENT, UNCONFIRMED)
                if can_transition(row.status, status):
                    return self._receipt(row, event_id, status, found.error_code)
                # A final word the row cannot take (failed after sent): no other will
                # come, so the text ends sent, unconfirmed, rather than wait forever.
                return self._receipt(row, event_id, RecipientStatus.SENT, UNCONFIRMED)
            if at - row.started_at > window:
                return self._receipt(row, f"window:{row.id}", RecipientStatus.SENT, UNCONFIRMED)
            return None

        found = [u for u in await asyncio.gather(*(look(r) for r in waiting)) if u is not None]
        if not found:
            return 0
        try:
            async with self.services.pool.connection() as conn:
                traced = await self._lookup_spans.add(conn, [(u, None) for u in found])
                try:
                    async with conn.transaction():
                        applied = await apply_provider_statuses(conn, found)
                        await self.progress.log(conn, applied.changes)
                except Exception as exc:
                    self._lookup_spans.failed(traced, exc)
                    raise
        finally:
            self._lookup_spans.close()
        await self.progress.record_many(applied.changes)
        log.info(
            "receipts reconciled",
            extra={"looked_up": len(waiting), "applied": len(applied.changes)},
        )
        return len(applied.changes)

    @staticmethod
    def _receipt(
        row: AwaitingReceipt,
        event_id: str,
        status: RecipientStatus,
        error_code: str | None,
    ) -> ProviderStatus:
        return ProviderStatus(
            event_id=event_id,
            event_type="message.lookup",
            church_id=row.church_id,
            message_id=row.message_id,
            recipient_id=row.id,
            target=status,
            provider_message_id=row.provider_message_id,
            error_code=error_code,
        )

    async def premake_partitions(self) -> list[str]:
        async with self.services.pool.connection() as conn, conn.transaction():
            if not await try_xact_lock(conn, _LOCK_PARTITIONS):
                return []
            created = await ensure_partitions(conn)
        if created:
            log.info("partitions created", extra={"partitions": created})
        return created

    async def prune_provider_events(self, now: datetime | None = None) -> int:
        """Delete one batch of dedupe records past retention; returns how many."""
        cutoff = (now or datetime.now(UTC)) - PROVIDER_EVENT_RETENTION
        async with self.services.pool.connection() as conn, conn.transaction():
            if not await try_xact_lock(conn, _LOCK_PRUNE):
                return 0
            return await delete_old_provider_events(conn, cutoff, _PRUNE_BATCH)

    async def reconcile(self) -> tuple[int, int]:
        """Re-enqueue lost work; returns (messages, recipients) re-enqueued."""
        cutoff = datetime.now(UTC) - timedelta(seconds=self.settings.reconcile_after_s)
        async with self.services.pool.connection() as conn, conn.transaction():
            if not await try_xact_lock(conn, _LOCK_RECONCILE):
                return 0, 0
            messages = await pending_materialization(conn, cutoff)
            messages += await unstarted_scheduled(conn, cutoff)
            stale = await stale_open_recipients(conn, cutoff)
            by_message: dict[tuple[uuid.UUID, uuid.UUID], list[uuid.UUID]] = defaultdict(list)
            for church_id, message_id, recipient_id in stale:
                by_message[(church_id, message_id)].append(recipient_id)
            for (church_id, message_id), ids in by_message.items():
                await touch(conn, church_id, message_id, ids)
            batches = await self._batches(conn, stale)
        redis = self.services.redis
        for church_id, message_id in messages:
            await enqueue_materialize(
                redis,
                MaterializeJob(
                    church_id=church_id,
                    message_id=message_id,
                    created_at=created_at_of(message_id),
                ),
            )
        await enqueue_sends(redis, batches, self.settings.shards)
        if messages or stale:
            log.info(
                "reconciled",
                extra={"messages": len(messages), "recipients": len(stale)},
            )
        return len(messages), len(stale)
