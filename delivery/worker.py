"""The delivery worker: materialize accepted broadcasts, send batches, record outcomes.

Every text we send passes here on one path: a broadcast's recipients, a staff
reply, an automatic answer to a keyword (HELP, START). A reply or an answer is
a message of one recipient (storage/pg/conversations.py ``accept_reply``), so the
queue entry is always a ``SendBatch`` and the steps below, consent checked when
it is sent included, are the same for all of them (docs/architecture.md, "One
send pipeline").

Loop shape (arq-style, bounded): a reading loop claims queue entries fairly
across churches (storage/redis/queue.py: each church's own stream, churches taking
turns through the ready sets), each entry runs admit → claim → send → record in
its own task, and only then is it acknowledged. A worker that dies leaves its
entries pending; the next worker to lease that church takes them over
(``XAUTOCLAIM``) after ``claim_idle_ms``.

Admission (delivery/throttle.py, delivery/breaker.py): before recipients are
claimed, tokens are taken from the provider account's and the sending number's
buckets (and the account's MMS bucket for a text with media) through the circuit,
in one Redis call per hash tag. A short wait is slept in place; a
long one, an open circuit, or a ``429`` hands the recipients back to the church's
delayed set at the same attempt. Failures of one send (an isolated 5xx, a bad
answer) retry with exponential backoff and jitter at the next attempt; after
``max_attempts`` the recipients end ``failed`` and the batch is copied to the
dead-letter stream with the reason.

SIGTERM stops reading; in-flight entries finish what is on the wire, hand back
what has not gone yet (delayed set, due now) and are acknowledged, so nothing
stays pending for a takeover and nothing is sent twice.

Every entry runs with its ids in the log context (``message_id``, ``church_id``,
``batch`` or ``job``: storage/process/logs.py). With tracing on
(storage/process/tracing.py) a materialize job and a send batch are one span each,
continuing the trace context their entry carries, and the provider calls of a
chunk one span: never a span per recipient.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
import uuid
from typing import Any

import msgspec
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from delivery.breaker import CircuitBreaker
from delivery.progress import ProgressTracker
from delivery.provider import Provider, SendRequest, SendResult
from delivery.throttle import ACCOUNT, Throttle
from storage.domain import merge_fields
from storage.domain.statuses import RecipientStatus
from storage.pg.churches import sending_number
from storage.pg.messages import adopt_traceparent, merge_values
from storage.pg.recipients import (
    SendTarget,
    Transition,
    claim_for_send,
    materialize,
    record_provider_ids,
    transition_many,
)
from storage.process import tracing
from storage.process.logs import log_context
from storage.process.metrics import SendMetrics
from storage.process.services import Services
from storage.redis import key_names
from storage.redis.queue import (
    STREAM_MAXLEN,
    MaterializeJob,
    SendBatch,
    SendQueue,
    Taken,
    encode_entry,
    enqueue_sends,
    materialize_decoder,
    migrate_shard_streams,
    schedule_retry,
    send_decoder,
)
from storage.redis.send_limits import CLOSED, Admission, ProviderLimits, account_id

log = logging.getLogger("koinonia.delivery.worker")

READ_BLOCK_MS = 1000
CLAIM_PER_READ = 8


def webhook_url(public_url: str, ref: str) -> str:
    """Where the provider reports on one recipient. The reference (storage/domain/receipt_refs.py)
    lets the inbound handler find the row in its partition at once; our MAC in it
    keeps a genuine receipt from being pointed at another recipient."""
    return f"{public_url.rstrip('/')}/v1/provider/telnyx/webhooks?ref={ref}"


def backoff_s(attempt: int, base_s: float, cap_s: float = 3600.0) -> float:
    """Exponential backoff with full jitter in [delay/2, delay]."""
    delay = min(cap_s, base_s * 2.0 ** max(0, attempt - 1))
    return float(delay / 2 + random.random() * delay / 2)


async def ensure_groups(services: Services) -> None:
    """The materialize stream's group (each church's send stream makes its own)."""
    with contextlib.suppress(ResponseError):  # BUSYGROUP: it exists already
        await services.redis.xgroup_create(
            key_names.MATERIALIZE_STREAM, key_names.SEND_GROUP, id="0", mkstream=True
        )


class Outcome(msgspec.Struct):
    """What became of one chunk of a batch."""

    successes: int = 0
    throttled: list[uuid.UUID] = msgspec.field(default_factory=list)
    """Refused with 429: again after ``retry_after_s``, same attempt."""
    retry_after_s: float = 0.0
    unavailable: list[uuid.UUID] = msgspec.field(default_factory=list)
    """Not served (5xx, timeout, connection): the circuit decides whether they count."""
    why: str | None = None
    """The error code of the first of them, for the log."""
    counted: list[uuid.UUID] = msgspec.field(default_factory=list)
    """Failed in a way worth another attempt, and it counts as one."""


class Worker:
    def __init__(self, services: Services, provider: Provider, *, name: str | None = None) -> None:
        self.services = services
        self.provider = provider
        self.settings = services.settings.delivery
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.progress = ProgressTracker(
            services.redis, services.scripts, services.pool, services.relay
        )
        self.queue = SendQueue(
            services.redis,
            self.settings.shards,
            self.name,
            quantum=self.settings.church_quantum,
            claim_idle_ms=self.settings.claim_idle_ms,
        )
        limits = ProviderLimits(services.scripts, account_id(services.settings.provider))
        # A probe gets the provider's whole timeout before another may go.
        probe_ms = round((services.settings.provider.timeout_s + 1) * 1000)
        self.throttle = Throttle(limits, self.settings, probe_ms)
        self.breaker = CircuitBreaker(limits, self.settings)
        self._stopping = asyncio.Event()
        self._hold_until = 0.0
        """Monotonic time before which this worker takes no new work (account paused)."""
        self._inflight: set[asyncio.Task[None]] = set()
        # Queue entries in flight. Each is a batch of up to batch_size sends that the
        # provider adapter bounds to ``concurrency`` calls at once; a few batches
        # overlap claiming, sending and recording, more would only queue up.
        self._slots = asyncio.Semaphore(max(1, self.settings.concurrency // 16))
        self._measure = SendMetrics(services.metrics) if services.metrics is not None else None

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        await ensure_groups(self.services)
        with contextlib.suppress(Exception):
            moved = await migrate_shard_streams(self.services.redis, self.settings.shards)
            if moved:
                log.info("moved entries of the old shard streams", extra={"entries": moved})
        log.info("worker started", extra={"worker": self.name})
        loops = [
            asyncio.create_task(self._send_loop(), name="sends"),
            asyncio.create_task(self._materialize_loop(), name="materialize"),
            asyncio.create_task(self._maintenance_loop(), name="maintenance"),
        ]
        await self._stopping.wait()
        # The loops see the stop within one blocking read; a loop is never cut
        # between leasing a church and releasing it.
        _, late = await asyncio.wait(loops, timeout=READ_BLOCK_MS / 1000 + 2)
        for task in late:
            task.cancel()
        for task in loops:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._inflight:
            log.info("draining", extra={"in_flight": len(self._inflight)})
            await asyncio.gather(*self._inflight, return_exceptions=True)
        await self.progress.aclose()
        log.info("worker stopped", extra={"worker": self.name})

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake at once when the worker is asked to stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), max(0.0, seconds))

    # -- claim ---------------------------------------------------------------

    async def _send_loop(self) -> None:
        while not self._stopping.is_set():
            await self._slots.acquire()
            try:
                taken = await self._next_work()
            except BaseException:
                self._slots.release()
                raise
            if taken is None:
                self._slots.release()
                continue
            task = asyncio.create_task(self._execute_all(taken))
            self._inflight.add(task)

            def done(t: asyncio.Task[None]) -> None:
                self._inflight.discard(t)
                self._slots.release()

            task.add_done_callback(done)

    async def _next_work(self) -> Taken | None:
        """Entries of the church whose turn it is, or None after waiting a little
        (for work to arrive, or for an open circuit or a paused account)."""
        if self._stopping.is_set():
            return None
        hold = max(self.breaker.blocked_for(), self._hold_until - time.monotonic())
        if hold > 0:
            await self._sleep(hold)
            return None
        try:
            taken = await self.queue.claim()
            if taken is None:
                await self.queue.wait(min(1.0, self.queue.next_due_in_s()))
            return taken
        except (RedisConnectionError, OSError):
            log.warning("redis unavailable; retrying")
        except Exception:
            log.exception("claiming work failed")
        await self._sleep(0.5)
        return None

    async def _execute_all(self, taken: Taken) -> None:
        """The entries of one turn (``church_quantum`` of them at most), side by side."""
        await asyncio.gather(
            *(self._execute(taken.stream, entry_id, payload) for entry_id, payload in taken.entries)
        )

    async def _execute(self, stream: str, entry_id: str, payload: bytes | None) -> None:
        try:
            work = send_decoder.decode(payload) if payload is not None else None
        except msgspec.DecodeError:
            work = None
        if work is None:
            log.error("unreadable queue entry dropped", extra={"entry": entry_id})
        else:
            with log_context(
                message_id=str(work.message_id),
                church_id=str(work.church_id),
                batch=entry_id,
                attempt=str(work.attempt),
            ):
                started = time.perf_counter()
                try:
                    with tracing.span(
                        "send batch", parent=work.traceparent, kind="consumer"
                    ) as span:
                        if span is not None:
                            span.set_attributes(_batch_attributes(work, stream, entry_id))
                        sent = await self.send_batch(work)
                        log.info(
                            "batch done",
                            extra={
                                "recipients": len(work.recipient_ids),
                                "sent": sent,
                                "ms": round((time.perf_counter() - started) * 1000, 1),
                            },
                        )
                except Exception:
                    # Left pending: the church's next lease takes it over after
                    # claim_idle_ms, and the reconciler covers the rows even if the entry
                    # itself is lost.
                    log.exception("queue entry failed", extra={"entry": entry_id, "stream": stream})
                    return
        try:
            await self.queue.done(stream, entry_id)
        except (RedisError, OSError):
            # The work is done; the entry stays pending and its next lease finds the
            # rows already past it (a failover or a blink between the two).
            log.warning("queue entry done but not acknowledged", extra={"entry": entry_id})

    # -- materialize ---------------------------------------------------------

    async def _materialize_loop(self) -> None:
        streams: Any = {key_names.MATERIALIZE_STREAM: ">"}
        while not self._stopping.is_set():
            try:
                reply: Any = await self.services.redis.xreadgroup(
                    key_names.SEND_GROUP, self.name, streams, count=1, block=READ_BLOCK_MS
                )
            except ResponseError as exc:
                if "NOGROUP" in str(exc):
                    with contextlib.suppress(RedisError, OSError):
                        await ensure_groups(self.services)
                    continue
                log.warning("materialize read failed; retrying", exc_info=True)
                await self._sleep(0.5)
                continue
            except (RedisError, OSError):
                log.warning("redis unavailable; retrying")
                await self._sleep(0.5)
                continue
            for _stream, entries in reply or []:
                for entry_id, fields in entries:
                    await self._materialize_entry(_text(entry_id), fields)

    async def _materialize_entry(self, entry_id: str, fields: dict[bytes, bytes]) -> None:
        payload = fields.get(b"j")
        try:
            job = materialize_decoder.decode(payload) if payload is not None else None
        except Exception:
            log.exception("materialize failed", extra={"entry": entry_id})
            return
        if job is not None:
            with log_context(
                message_id=str(job.message_id),
                church_id=str(job.church_id),
                job="materialize",
                entry=entry_id,
            ):
                try:
                    await self.materialize(job)
                except Exception:
                    log.exception("materialize failed", extra={"entry": entry_id})
                    return
        try:
            await self.services.redis.xack(
                key_names.MATERIALIZE_STREAM, key_names.SEND_GROUP, entry_id
            )
        except (RedisError, OSError):
            # Done in Postgres (materialized_at); a second take finds nothing to do.
            log.warning("materialize ack lost", extra={"entry": entry_id})

    async def materialize(self, job: MaterializeJob) -> None:
        """Materialize in a span that continues the job's trace context, or the one
        stored on the message (a scheduled message's sweep-made job carries none)."""
        parent = job.traceparent
        if not parent and tracing.enabled():
            text = await self.progress.texts.get(job.church_id, job.message_id)
            parent = text.traceparent if text is not None else ""
        with tracing.span("materialize", parent=parent, kind="consumer") as span:
            if span is not None:
                span.set_attributes(
                    {
                        "messaging.system": "redis",
                        "messaging.destination.name": key_names.MATERIALIZE_STREAM,
                        "messaging.operation.type": "process",
                        "koinonia.church_id": str(job.church_id),
                        "koinonia.message_id": str(job.message_id),
                    }
                )
            await self._materialize(job, adopt=span is not None and not parent)

    async def _materialize(self, job: MaterializeJob, *, adopt: bool) -> None:
        started = time.perf_counter()
        async with self.services.pool.connection() as conn:
            done = await materialize(conn, job.church_id, job.message_id)
            from_number = await sending_number(conn, job.church_id)
            if adopt and done is not None:
                # A message with no trace of its own (a recurring occurrence) takes this
                # one, so that its receipts join it.
                await adopt_traceparent(
                    conn, job.church_id, job.message_id, tracing.current_traceparent()
                )
        if done is None or from_number is None:
            return
        took = time.perf_counter() - started
        total = done.queued + done.skipped
        log.info(
            "recipients materialized",
            extra={
                "message_id": str(job.message_id),
                "recipients": total,
                "ms": round(took * 1000, 1),
                "rows_per_s": round(total / took) if took > 0 else None,
            },
        )
        await self.progress.init_counts(
            job.church_id, job.message_id, total, done.queued, done.skipped
        )
        size = self.settings.batch_size
        ids = done.recipient_ids
        traceparent = tracing.current_traceparent()
        batches = [
            SendBatch(
                church_id=job.church_id,
                message_id=job.message_id,
                created_at=job.created_at,
                recipient_ids=ids[i : i + size],
                from_number=from_number,
                max_attempts=self.settings.max_attempts,
                traceparent=traceparent,
            )
            for i in range(0, len(ids), size)
        ]
        await enqueue_sends(self.services.redis, batches, self.settings.shards)
        self.queue.look_again(job.church_id)
        if total and not done.queued:
            await self.progress.refresh(job.church_id, job.message_id)

    # -- send ----------------------------------------------------------------

    async def send_batch(self, batch: SendBatch) -> int:
        """Send what can go now; returns how many the provider accepted (the rest were
        skipped, failed, or went back to the delayed set)."""
        remaining = batch.recipient_ids
        counted: list[uuid.UUID] = []
        sent = 0
        # Waits in place end here, well before another worker would take the entry over.
        budget = time.monotonic() + max(
            self.settings.throttle_hold_s, self.settings.claim_idle_ms / 4000
        )
        # Read once per message and process (cached): whether the texts carry media
        # decides whether they also need the account's MMS tokens.
        text = await self.progress.texts.get(batch.church_id, batch.message_id)
        mms = text is not None and bool(text.media_ids)
        while remaining:
            if self._stopping.is_set():
                await self._hand_back(batch, remaining, 0.0)
                break
            admission = await self.throttle.admit(batch.from_number, len(remaining), mms)
            self.breaker.observe(admission)
            if not admission.granted:
                if (
                    admission.circuit != CLOSED
                    or admission.wait_s > self.settings.throttle_hold_s
                    or time.monotonic() + admission.wait_s > budget
                ):
                    await self._hand_back(
                        batch, remaining, self._wait_for(admission), admission.limited_by
                    )
                    break
                if admission.limited_by != ACCOUNT:
                    # The number is out of tokens: other workers pass this church by.
                    await self.queue.pause(batch.church_id, _ms_from_now(admission.wait_s))
                await self._sleep(admission.wait_s)
                continue
            chunk, remaining = remaining[: admission.granted], remaining[admission.granted :]
            outcome = await self._send_chunk(batch, chunk, mms)
            sent += outcome.successes
            counted += await self._settle(batch, outcome, admission.probe)
        if counted:
            await self._retry_or_dead_letter(batch, counted)
        return sent

    def _wait_for(self, admission: Admission) -> float:
        if admission.circuit != CLOSED:
            # Spread the return after an outage: the probe goes first anyway.
            return admission.wait_s + random.random() * max(
                1.0, self.settings.circuit_cooldown_s / 2
            )
        return admission.wait_s

    async def _hand_back(
        self,
        batch: SendBatch,
        recipient_ids: list[uuid.UUID],
        delay_s: float,
        limited_by: int = -1,
    ) -> None:
        """Back to the church's delayed set at the same attempt (waiting is not failing).

        ``limited_by`` names the bucket that made the wait: the account's holds off
        this worker's reading (every church would wait alike), the number's pauses
        the church (others go on)."""
        again = msgspec.structs.replace(batch, recipient_ids=recipient_ids)
        due_ms = _ms_from_now(delay_s)
        await schedule_retry(self.services.redis, again, due_ms, self.settings.shards)
        self.queue.look_again(batch.church_id, due_ms)
        if limited_by == ACCOUNT:
            self._hold_until = max(self._hold_until, time.monotonic() + delay_s)
        elif limited_by > ACCOUNT:
            await self.queue.pause(batch.church_id, due_ms)

    async def _settle(self, batch: SendBatch, outcome: Outcome, probe: bool) -> list[uuid.UUID]:
        """Throttled and circuit-held recipients go back at the same attempt; returns
        those whose failure counts as an attempt."""
        counted = list(outcome.counted)
        change = await self.breaker.record(
            outcome.successes, len(outcome.unavailable), probe=probe, why=outcome.why
        )
        if outcome.unavailable:
            if change is not None and change.state != CLOSED:
                delay = max(0.0, change.open_until_ms / 1000 - time.time())
                await self._hand_back(
                    batch,
                    outcome.unavailable,
                    delay + random.random() * self.settings.circuit_cooldown_s / 2,
                )
            else:
                counted += outcome.unavailable
        if outcome.throttled:
            wait = max(outcome.retry_after_s, 1.0)
            await self.throttle.provider_said_wait(wait)
            await self._hand_back(batch, outcome.throttled, wait, ACCOUNT)
        return counted

    async def _send_chunk(
        self, batch: SendBatch, recipient_ids: list[uuid.UUID], mms: bool = False
    ) -> Outcome:
        async with self.services.pool.connection() as conn:
            text = await self.progress.texts.get(batch.church_id, batch.message_id, conn)
            # Consent is checked here, when it is sent, for every text of every kind.
            async with conn.transaction():
                targets, changes = await claim_for_send(
                    conn,
                    batch.church_id,
                    batch.message_id,
                    recipient_ids if text is not None else [],
                    consent_exempt=text is not None and text.consent_exempt,
                )
                await self.progress.log(conn, _of(batch, changes))
            body = text.body if text is not None else ""
            # Merge fields are rendered per recipient here, with the member's values now.
            personal = bool(targets) and merge_fields.has_fields(body)
            values = (
                await merge_values(conn, batch.church_id, [t.member_id for t in targets])
                if personal
                else {}
            )
        await self.progress.record(batch.church_id, batch.message_id, changes)
        if self._measure is not None:
            self._measure.skipped(sum(1 for c in changes if c.status == RecipientStatus.SKIPPED))
        unused = len(recipient_ids) - len(targets)
        if unused:
            await self.throttle.refund(batch.from_number, unused, mms)
        if not targets:
            return Outcome()
        media_urls = self._media_urls(batch, text.media_ids if text is not None else [])
        callback = webhook_url(self.services.settings.public_url, "")
        make_ref = self.services.refs.make
        decrypt = self.services.vault.decrypt
        requests = [
            SendRequest(
                from_number=batch.from_number,
                to=decrypt(batch.church_id, t.phone_cipher),
                text=merge_fields.render(body, values.get(t.member_id, {})) if personal else body,
                webhook_url=callback + make_ref(batch.church_id, batch.message_id, t.id),
                idempotency_key=f"rcpt-{t.id}",
                media_urls=media_urls,
            )
            for t in targets
        ]
        with tracing.span("provider send", kind="client") as span:
            results = await self.provider.send(requests)
            if span is not None:
                span.set_attributes(_send_attributes(results))
        return await self._record(batch, targets, results)

    def _media_urls(self, batch: SendBatch, media_ids: list[uuid.UUID]) -> list[str]:
        """Links the provider fetches the files from, made now: a text handed back or
        retried hours later gets links that work when it goes, never stale ones.

        The expiry is on a grid of the link lifetime (valid between one and two
        lifetimes from now), so the attempts at one recipient within a window send the
        same body under the same Idempotency-Key: a retry after a timeout the provider
        had in fact accepted is then answered as a replay, not refused as another
        body."""
        if not media_ids:
            return []
        ttl = max(1, self.settings.media_link_ttl_s)
        expires = (int(time.time()) // ttl + 2) * ttl
        public_url = self.services.settings.public_url
        make = self.services.media_links.make
        return [make(public_url, batch.church_id, m, expires) for m in media_ids]

    async def _record(
        self, batch: SendBatch, targets: list[SendTarget], results: list[SendResult]
    ) -> Outcome:
        """Store provider ids and final failures; sort the retryable ones."""
        sent: list[tuple[uuid.UUID, str]] = []
        failed: dict[str, list[uuid.UUID]] = {}
        outcome = Outcome()
        for target, result in zip(targets, results, strict=True):
            if result.ok and result.provider_message_id:
                sent.append((target.id, result.provider_message_id))
            elif result.throttled:
                outcome.throttled.append(target.id)
                outcome.retry_after_s = max(outcome.retry_after_s, result.retry_after_s or 0.0)
            elif result.unavailable:
                outcome.unavailable.append(target.id)
                outcome.why = outcome.why or result.error_code
            elif result.retryable:
                outcome.counted.append(target.id)
            else:
                failed.setdefault(result.error_code or "provider_error", []).append(target.id)
        outcome.successes = len(sent)
        if (measure := self._measure) is not None:
            if sent:
                text = await self.progress.texts.get(batch.church_id, batch.message_id)
                scheduled = text is None or text.scheduled
                measure.sent(len(sent), None if scheduled else batch.created_at.timestamp())
            if failed:
                measure.failed(sum(len(ids) for ids in failed.values()))
        changes: list[Transition] = []
        if sent or failed:
            async with self.services.pool.connection() as conn, conn.transaction():
                await record_provider_ids(conn, batch.church_id, batch.message_id, sent)
                for code, ids in failed.items():
                    changes += await transition_many(
                        conn,
                        batch.church_id,
                        batch.message_id,
                        ids,
                        RecipientStatus.FAILED,
                        error_code=code,
                    )
                await self.progress.log(conn, _of(batch, changes))
        await self.progress.record(batch.church_id, batch.message_id, changes)
        return outcome

    async def _retry_or_dead_letter(self, batch: SendBatch, retry: list[uuid.UUID]) -> None:
        if batch.attempt >= batch.max_attempts:
            async with self.services.pool.connection() as conn, conn.transaction():
                changes = await transition_many(
                    conn,
                    batch.church_id,
                    batch.message_id,
                    retry,
                    RecipientStatus.FAILED,
                    error_code="max_attempts",
                )
                await self.progress.log(conn, _of(batch, changes))
            await self.progress.record(batch.church_id, batch.message_id, changes)
            await self.services.redis.xadd(
                key_names.DEAD_LETTER_STREAM,
                {
                    "j": encode_entry(msgspec.structs.replace(batch, recipient_ids=retry)),
                    "reason": "max_attempts",
                },
                maxlen=STREAM_MAXLEN,
                approximate=True,
            )
            if self._measure is not None:
                self._measure.dead_lettered(len(retry))
            return
        delay = backoff_s(batch.attempt, self.settings.retry_base_s)
        again = msgspec.structs.replace(batch, recipient_ids=retry, attempt=batch.attempt + 1)
        due_ms = _ms_from_now(delay)
        await schedule_retry(self.services.redis, again, due_ms, self.settings.shards)
        self.queue.look_again(batch.church_id, due_ms)
        if self._measure is not None:
            self._measure.retried(len(retry))

    # -- maintenance ---------------------------------------------------------

    async def _maintenance_loop(self) -> None:
        """Take over materialize entries of dead workers (send entries are taken over
        by the church's next lease)."""
        every = max(1.0, self.settings.claim_idle_ms / 4000)
        while not self._stopping.is_set():
            await self._sleep(every)
            if self._stopping.is_set():
                break
            try:
                await self._autoclaim()
            except (RedisError, OSError) as exc:
                log.warning("maintenance step failed: redis unavailable", extra={"error": str(exc)})
            except Exception:
                log.exception("maintenance step failed")

    async def _autoclaim(self) -> None:
        try:
            claimed: Any = await self.services.redis.xautoclaim(
                key_names.MATERIALIZE_STREAM,
                key_names.SEND_GROUP,
                self.name,
                self.settings.claim_idle_ms,
                start_id="0-0",
                count=CLAIM_PER_READ,
            )
        except ResponseError as exc:
            if "NOGROUP" in str(exc):
                await ensure_groups(self.services)
                return
            raise
        for entry_id, fields in claimed[1]:
            if fields:
                log.info("taking over stalled entry", extra={"entry": _text(entry_id)})
                await self._materialize_entry(_text(entry_id), fields)


def _of(
    batch: SendBatch, changes: list[Transition]
) -> list[tuple[uuid.UUID, uuid.UUID, Transition]]:
    return [(batch.church_id, batch.message_id, c) for c in changes]


def _batch_attributes(batch: SendBatch, stream: str, entry_id: str) -> dict[str, str | int]:
    return {
        "messaging.system": "redis",
        "messaging.destination.name": stream,
        "messaging.message.id": entry_id,
        "messaging.operation.type": "process",
        "koinonia.church_id": str(batch.church_id),
        "koinonia.message_id": str(batch.message_id),
        "koinonia.recipients": len(batch.recipient_ids),
        "koinonia.attempt": batch.attempt,
    }


def _send_attributes(results: list[SendResult]) -> dict[str, int]:
    return {
        "koinonia.provider.requests": len(results),
        "koinonia.provider.accepted": sum(1 for r in results if r.ok),
        "koinonia.provider.throttled": sum(1 for r in results if r.throttled),
        "koinonia.provider.unavailable": sum(1 for r in results if r.unavailable),
    }


def _ms_from_now(seconds: float) -> int:
    return int((time.time() + max(0.0, seconds)) * 1000)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
