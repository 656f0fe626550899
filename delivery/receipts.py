"""Provider receipts applied in batches across concurrent webhook requests.

Every recipient costs two signed webhooks (``message.sent`` and
``message.finalized``). Applied one by one, each paid a statement, a commit and
a Redis round trip. Here concurrent requests hand their receipt to a batcher
and wait: a few runners each take what has queued up (at most ``max_batch``),
apply it in one statement and one commit, and answer every waiting request at
once. Each batch's events are logged in that same transaction (storage/pg/event_log.py),
so a webhook is answered 200 only once its receipt and its events are committed;
the relay takes them from there.

Traces (storage/process/tracing.py, when on): each webhook request has its own
server span; the receipts applied for a message are counted in one span per
message and second (``ReceiptSpans``), parented to the trace context stored on
that message at acceptance (receipts come back from the provider without one), so
they join their broadcast's trace, linked to the requests they answer. Never a
span per recipient.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING

from delivery.progress import ProgressTracker
from storage.domain.statuses import RecipientStatus
from storage.pg.database import Conn, Pool
from storage.pg.messages import SendTexts
from storage.pg.recipients import ProviderStatus, Transition, apply_provider_statuses
from storage.process import tracing
from storage.process.metrics import Metrics

if TYPE_CHECKING:
    from opentelemetry.trace import Span

log = logging.getLogger("koinonia.delivery.receipts")


def rounds(updates: list[ProviderStatus]) -> list[list[ProviderStatus]]:
    """Split so that no recipient appears twice in one round, keeping arrival order
    per recipient (a ``sent`` before the ``finalized`` that followed it)."""
    out: list[list[ProviderStatus]] = []
    depth: dict[uuid.UUID, int] = {}
    for update in updates:
        level = depth.get(update.recipient_id, 0)
        depth[update.recipient_id] = level + 1
        if level == len(out):
            out.append([])
        out[level].append(update)
    return out


RECEIPT_SPAN_WINDOW_S = 1.0
"""A message's receipt span gathers what one process applies for it this long."""
MAX_LINKS = 32
"""Webhook requests linked from one receipt span at most."""

MessageKey = tuple[uuid.UUID, uuid.UUID]


class _OpenSpan:
    __slots__ = ("failed", "links", "opened", "receipts", "span")

    def __init__(self, span: Span, opened: float) -> None:
        self.span = span
        self.opened = opened
        self.receipts = 0
        self.links = 0
        self.failed = False


class ReceiptSpans:
    """With tracing on, receipts as spans in their broadcasts' traces.

    One span per message and ``window_s`` (in this process), a child of the trace
    context stored on the message at acceptance, counting the receipts applied in
    that time and linked to (up to ``MAX_LINKS`` of) the webhook requests that
    brought them. So a broadcast's receipts cost spans by the second, never one
    per recipient or receipt. Does nothing when tracing is off."""

    def __init__(
        self, name: str, texts: SendTexts, window_s: float = RECEIPT_SPAN_WINDOW_S
    ) -> None:
        self._name = name
        self._texts = texts
        self._window_s = window_s
        self._open: dict[MessageKey, _OpenSpan] = {}

    async def add(
        self, conn: Conn, updates: Sequence[tuple[ProviderStatus, object | None]]
    ) -> list[MessageKey]:
        """Count ``updates`` (a receipt and its request's link, if any) in their
        messages' spans, opening those that are not; returns the messages touched."""
        if not tracing.enabled():
            return []
        self.close(older_than_s=self._window_s)
        touched: list[MessageKey] = []
        for update, link in updates:
            key = (update.church_id, update.message_id)
            current = self._open.get(key) or await self._opened(conn, key)
            if current is None:
                continue
            if key not in touched:
                touched.append(key)
            current.receipts += 1
            if link is not None and current.links < MAX_LINKS:
                tracing.add_link(current.span, link)
                current.links += 1
        return touched

    async def _opened(self, conn: Conn, key: MessageKey) -> _OpenSpan | None:
        church_id, message_id = key
        text = await self._texts.get(church_id, message_id, conn)
        # Another runner may have opened it while this one read the message.
        current = self._open.get(key)
        if current is not None:
            return current
        span = tracing.start_span(
            self._name,
            parent=text.traceparent if text is not None else "",
            kind="consumer",
            attributes={
                "koinonia.church_id": str(church_id),
                "koinonia.message_id": str(message_id),
            },
        )
        if span is None:
            return None
        current = self._open[key] = _OpenSpan(span, time.monotonic())
        if self._window_s > 0:
            asyncio.get_running_loop().call_later(self._window_s, self.close_stale)
        return current

    def failed(self, keys: Sequence[MessageKey], error: BaseException) -> None:
        for key in keys:
            current = self._open.get(key)
            if current is not None and not current.failed:
                current.failed = True
                current.span.record_exception(error)
                tracing.fail(current.span, type(error).__name__)

    def close_stale(self) -> None:
        # A timer may fire a hair early: what it was set for counts as stale.
        self.close(older_than_s=max(0.0, self._window_s - 0.01))

    def close(self, *, older_than_s: float = 0.0, now: float | None = None) -> None:
        """End the spans open at least ``older_than_s`` (all by default)."""
        at = time.monotonic() if now is None else now
        for key in [k for k, o in self._open.items() if at - o.opened >= older_than_s]:
            current = self._open.pop(key)
            current.span.set_attribute("koinonia.receipts", current.receipts)
            current.span.end()


class ReceiptBatcher:
    def __init__(
        self,
        pool: Pool,
        progress: ProgressTracker,
        *,
        runners: int = 4,
        max_batch: int = 256,
        metrics: Metrics | None = None,
    ) -> None:
        self._pool = pool
        # Delivered receipts: when the provider says each text was sent, by event id,
        # until its batch is applied (koinonia_receipt_latency_seconds).
        self._latency = metrics.receipt_latency if metrics is not None else None
        self._sent_at: dict[str, float] = {}
        self._progress = progress
        self._spans = ReceiptSpans("receipts", progress.texts)
        self._runners = runners
        self._max_batch = max_batch
        self._queue: asyncio.Queue[tuple[ProviderStatus, asyncio.Future[bool], object | None]] = (
            asyncio.Queue()
        )
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._run()) for _ in range(self._runners)]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._spans.close()

    async def submit(self, update: ProviderStatus, *, sent_at: float | None = None) -> bool:
        """Return once the receipt is committed (raises what the commit raised): False
        when it was refused (its provider id is not its recipient's), True otherwise.
        ``sent_at``: when the provider sent the text (epoch seconds), for the latency
        of a delivered receipt."""
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        if sent_at is not None and self._latency is not None:
            self._sent_at[update.event_id] = sent_at
        # The webhook request's span (None with tracing off), for the batch's links.
        self._queue.put_nowait((update, done, tracing.current_link()))
        return await done

    async def _run(self) -> None:
        while True:
            first = await self._queue.get()
            batch = [first]
            while len(batch) < self._max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            await self._apply(batch)

    async def _apply(
        self, batch: list[tuple[ProviderStatus, asyncio.Future[bool], object | None]]
    ) -> None:
        changes: list[tuple[uuid.UUID, uuid.UUID, Transition]] = []
        refused: set[str] = set()
        traced: list[MessageKey] = []
        sent_at = {
            entry[0].recipient_id: at
            for entry in batch
            if self._sent_at and (at := self._sent_at.pop(entry[0].event_id, None)) is not None
        }
        try:
            async with self._pool.connection() as conn:
                traced = await self._spans.add(conn, [(u, link) for u, _, link in batch])
                for part in rounds([u for u, _, _ in batch]):
                    # The receipts and their events commit together.
                    async with conn.transaction():
                        applied = await apply_provider_statuses(conn, part)
                        await self._progress.log(conn, applied.changes)
                    changes += applied.changes
                    refused |= applied.refused
        except Exception as exc:
            log.exception("receipt batch failed", extra={"receipts": len(batch)})
            self._spans.failed(traced, exc)
            for _, done, _ in batch:
                if not done.done():
                    done.set_exception(exc)
            return
        # The events are in the log before the webhooks are answered, and the
        # provider sends a recipient's next receipt only after this answer, so a
        # recipient's events leave the log in the order of its transitions.
        if sent_at and self._latency is not None:
            now = time.time()
            for _, _, change in changes:
                at = sent_at.get(change.id)
                if at is not None and change.status == RecipientStatus.DELIVERED:
                    self._latency.observe(max(0.0, now - at))
        if changes:
            try:
                await self._progress.record_many(changes)
            except Exception:
                log.exception("progress after receipts failed", extra={"receipts": len(batch)})
        for update, done, _ in batch:
            if not done.done():
                done.set_result(update.event_id not in refused)
