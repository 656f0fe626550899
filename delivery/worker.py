"""The delivery worker: materialize accepted broadcasts, send batches, record outcomes.

Loop shape (arq-style, bounded): blocking ``XREADGROUP`` claims entries, each
entry runs claim → send → record, and only then ``XACK``. A worker that dies
leaves its entries pending; ``XAUTOCLAIM`` hands them to a live worker after
``claim_idle_ms``. Retryable failures go to a per-shard sorted set with
exponential backoff and jitter; after ``max_attempts`` recipients end ``failed``
and the batch is copied to the dead-letter stream with the reason. SIGTERM stops
reading and lets in-flight entries finish.
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
from collections import OrderedDict
from typing import Any

import msgspec
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from delivery.progress import ProgressTracker
from delivery.provider import Provider, SendRequest, SendResult
from storage import keys, merge_fields
from storage.conversations import set_outbound_status
from storage.database import Conn
from storage.events import ConversationMessageStatus, new_event
from storage.ids import created_at_of
from storage.messages import merge_values
from storage.queue import (
    STREAM_MAXLEN,
    ConversationSend,
    MaterializeJob,
    RetryPump,
    SendBatch,
    encode_entry,
    enqueue_sends,
    materialize_decoder,
    schedule_retry,
    send_decoder,
)
from storage.recipients import (
    SendTarget,
    Transition,
    claim_for_send,
    materialize,
    record_provider_ids,
    transition_many,
)
from storage.services import Services
from storage.statuses import RecipientStatus

log = logging.getLogger("koinonia.delivery.worker")

READ_BLOCK_MS = 1000
ENTRIES_PER_READ = 8


def webhook_url(
    public_url: str, church_id: uuid.UUID, message_id: uuid.UUID, recipient_id: uuid.UUID
) -> str:
    """Where the provider reports on one recipient. The reference in the query lets
    the inbound handler find the row in its partition at once; it is matched
    together with the provider's message id, so a replayed body cannot move
    another recipient."""
    return (
        f"{public_url.rstrip('/')}/v1/provider/telnyx/webhooks"
        f"?ref={church_id}.{message_id}.{recipient_id}"
    )


def backoff_s(attempt: int, base_s: float, cap_s: float = 3600.0) -> float:
    """Exponential backoff with full jitter in [delay/2, delay]."""
    delay = min(cap_s, base_s * 2.0 ** max(0, attempt - 1))
    return float(delay / 2 + random.random() * delay / 2)


async def ensure_groups(services: Services) -> None:
    streams = [keys.send_stream(s) for s in range(services.settings.delivery.shards)]
    for stream in [*streams, keys.MATERIALIZE_STREAM]:
        with contextlib.suppress(ResponseError):  # BUSYGROUP: it exists already
            await services.redis.xgroup_create(stream, keys.SEND_GROUP, id="0", mkstream=True)


class _MessageCache:
    """Bodies of recent messages: every batch of a broadcast needs the same text."""

    def __init__(self, size: int = 256) -> None:
        self._items: OrderedDict[uuid.UUID, str] = OrderedDict()
        self._size = size

    async def body(self, conn: Conn, church_id: uuid.UUID, message_id: uuid.UUID) -> str | None:
        if message_id in self._items:
            self._items.move_to_end(message_id)
            return self._items[message_id]
        cur = await conn.execute(
            "SELECT body FROM message WHERE church_id = %s AND id = %s AND created_at = %s",
            (church_id, message_id, created_at_of(message_id)),
        )
        row = await cur.fetchone()
        if row is None:
            return None
        self._items[message_id] = row[0]
        if len(self._items) > self._size:
            self._items.popitem(last=False)
        return str(row[0])


class Worker:
    def __init__(self, services: Services, provider: Provider, *, name: str | None = None) -> None:
        self.services = services
        self.provider = provider
        self.settings = services.settings.delivery
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.progress = ProgressTracker(services.redis, services.publisher, services.pool)
        self._bodies = _MessageCache()
        self._pump = RetryPump(services.redis, self.settings.shards)
        self._stopping = asyncio.Event()
        self._inflight: set[asyncio.Task[None]] = set()
        # Queue entries in flight. Each is a batch of up to batch_size sends that the
        # provider adapter bounds to ``concurrency`` calls at once; a few batches
        # overlap claiming, sending and recording, more would only queue up.
        self._slots = asyncio.Semaphore(max(1, self.settings.concurrency // 16))
        self._streams = [keys.send_stream(s) for s in range(self.settings.shards)]

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        await ensure_groups(self.services)
        log.info("worker started", extra={"worker": self.name})
        loops = [
            asyncio.create_task(self._read_loop(), name="read"),
            asyncio.create_task(self._maintenance_loop(), name="maintenance"),
        ]
        await self._stopping.wait()
        for task in loops:
            task.cancel()
        for task in loops:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._inflight:
            log.info("draining", extra={"in_flight": len(self._inflight)})
            await asyncio.gather(*self._inflight, return_exceptions=True)
        await self.progress.aclose()
        log.info("worker stopped", extra={"worker": self.name})

    # -- claim ---------------------------------------------------------------

    async def _read_loop(self) -> None:
        streams: dict[str, str] = {keys.MATERIALIZE_STREAM: ">"}
        streams.update({s: ">" for s in self._streams})
        while not self._stopping.is_set():
            try:
                # Read only when an entry can start: unread work stays in Redis,
                # where another worker can take it.
                await self._slots.acquire()
                self._slots.release()
                reply: Any = await self.services.redis.xreadgroup(
                    keys.SEND_GROUP,
                    self.name,
                    streams,  # type: ignore[arg-type]
                    count=ENTRIES_PER_READ,
                    block=READ_BLOCK_MS,
                )
            except ResponseError as exc:
                if "NOGROUP" in str(exc):
                    await ensure_groups(self.services)
                    continue
                raise
            except (RedisConnectionError, OSError):
                log.warning("redis unavailable; retrying")
                await asyncio.sleep(0.5)
                continue
            for stream, entries in reply or []:
                for entry_id, fields in entries:
                    await self._start(_text(stream), _text(entry_id), fields)

    async def _start(self, stream: str, entry_id: str, fields: dict[bytes, bytes]) -> None:
        await self._slots.acquire()
        task = asyncio.create_task(self._execute(stream, entry_id, fields))
        self._inflight.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._inflight.discard(t)
            self._slots.release()

        task.add_done_callback(done)

    async def _execute(self, stream: str, entry_id: str, fields: dict[bytes, bytes]) -> None:
        payload = fields.get(b"j")
        try:
            if payload is None:
                log.error("queue entry without payload", extra={"entry": entry_id})
            elif stream == keys.MATERIALIZE_STREAM:
                await self.materialize(materialize_decoder.decode(payload))
            else:
                match send_decoder.decode(payload):
                    case SendBatch() as batch:
                        await self.send_batch(batch)
                    case ConversationSend() as reply:
                        await self.send_reply(reply)
        except Exception:
            # Left pending: XAUTOCLAIM retries it after claim_idle_ms, and the
            # reconciler covers the rows even if the entry itself is lost.
            log.exception("queue entry failed", extra={"entry": entry_id, "stream": stream})
            return
        await self.services.redis.xack(stream, keys.SEND_GROUP, entry_id)

    # -- execute -------------------------------------------------------------

    async def materialize(self, job: MaterializeJob) -> None:
        started = time.perf_counter()
        async with self.services.pool.connection() as conn:
            done = await materialize(conn, job.church_id, job.message_id)
            cur = await conn.execute(
                "SELECT phone_number FROM church WHERE id = %s", (job.church_id,)
            )
            row = await cur.fetchone()
        if done is None or row is None:
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
        batches = [
            SendBatch(
                church_id=job.church_id,
                message_id=job.message_id,
                created_at=job.created_at,
                recipient_ids=ids[i : i + size],
                from_number=row[0],
                max_attempts=self.settings.max_attempts,
            )
            for i in range(0, len(ids), size)
        ]
        await enqueue_sends(self.services.redis, batches, self.settings.shards)
        if total and not done.queued:
            await self.progress.refresh(job.church_id, job.message_id)

    async def send_batch(self, batch: SendBatch) -> None:
        async with self.services.pool.connection() as conn:
            targets, changes = await claim_for_send(
                conn, batch.church_id, batch.message_id, batch.recipient_ids
            )
            body = await self._bodies.body(conn, batch.church_id, batch.message_id)
            # Merge fields are rendered per recipient here, with the member's values now.
            personal = bool(targets) and body is not None and merge_fields.has_fields(body)
            values = (
                await merge_values(conn, batch.church_id, [t.member_id for t in targets])
                if personal
                else {}
            )
        await self.progress.record(batch.church_id, batch.message_id, changes)
        if not targets or body is None:
            return
        requests = [
            self._request(
                batch,
                merge_fields.render(body, values.get(t.member_id, {})) if personal else body,
                t,
            )
            for t in targets
        ]
        results = await self.provider.send(requests)
        await self._record(batch, targets, results)

    async def send_reply(self, job: ConversationSend) -> None:
        """One staff reply: queued → sending, then the provider's webhooks take over."""
        async with self.services.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT cm.body, m.phone_cipher, ch.phone_number, cm.status "
                "FROM conversation_message cm "
                "JOIN conversation c ON c.church_id = cm.church_id AND c.id = cm.conversation_id "
                "JOIN member m ON m.church_id = c.church_id AND m.id = c.member_id "
                "JOIN church ch ON ch.id = cm.church_id "
                "WHERE cm.church_id = %s AND cm.id = %s AND cm.created_at = %s",
                (job.church_id, job.message_id, created_at_of(job.message_id)),
            )
            row = await cur.fetchone()
            if row is None or row[3] not in ("queued", "sending"):
                return
            changed = await set_outbound_status(
                conn, job.church_id, job.message_id, "sending", None, ["queued"]
            )
        if changed is not None:
            await self._reply_status(job, "sending")
        request = SendRequest(
            from_number=row[2],
            to=self.services.vault.decrypt(job.church_id, bytes(row[1])),
            text=row[0],
            webhook_url=(
                f"{self.services.settings.public_url.rstrip('/')}/v1/provider/telnyx/webhooks"
                f"?cref={job.church_id}.{job.message_id}"
            ),
            idempotency_key=f"conv-{job.message_id}",
        )
        result = (await self.provider.send([request]))[0]
        if result.ok:
            async with self.services.pool.connection() as conn:
                await conn.execute(
                    "UPDATE conversation_message SET provider_message_id = %s "
                    "WHERE church_id = %s AND id = %s AND created_at = %s "
                    "AND provider_message_id IS NULL",
                    (
                        result.provider_message_id,
                        job.church_id,
                        job.message_id,
                        created_at_of(job.message_id),
                    ),
                )
        elif result.retryable and job.attempt < job.max_attempts:
            delay = max(
                result.retry_after_s or 0.0, backoff_s(job.attempt, self.settings.retry_base_s)
            )
            again = msgspec.structs.replace(job, attempt=job.attempt + 1)
            await schedule_retry(
                self.services.redis, again, int((time.time() + delay) * 1000), self.settings.shards
            )
        else:
            async with self.services.pool.connection() as conn:
                changed = await set_outbound_status(
                    conn, job.church_id, job.message_id, "failed", None, ["queued", "sending"]
                )
            if changed is not None:
                await self._reply_status(job, "failed")

    async def _reply_status(self, job: ConversationSend, status: str) -> None:
        event = new_event(
            "conversation.message.status",
            ConversationMessageStatus(
                conversation_id=job.conversation_id, message_id=job.message_id, status=status
            ),
        )
        await self.services.publisher.publish_many(
            job.church_id, [("inbox", event), (f"conversation:{job.conversation_id}", event)]
        )

    def _request(self, batch: SendBatch, body: str, target: SendTarget) -> SendRequest:
        return SendRequest(
            from_number=batch.from_number,
            to=self.services.vault.decrypt(batch.church_id, target.phone_cipher),
            text=body,
            webhook_url=webhook_url(
                self.services.settings.public_url, batch.church_id, batch.message_id, target.id
            ),
            idempotency_key=f"rcpt-{target.id}",
        )

    async def _record(
        self, batch: SendBatch, targets: list[SendTarget], results: list[SendResult]
    ) -> None:
        sent: list[tuple[uuid.UUID, str]] = []
        failed: dict[str, list[uuid.UUID]] = {}
        retry: list[uuid.UUID] = []
        retry_after = 0.0
        for target, result in zip(targets, results, strict=True):
            if result.ok and result.provider_message_id:
                sent.append((target.id, result.provider_message_id))
            elif result.retryable:
                retry.append(target.id)
                retry_after = max(retry_after, result.retry_after_s or 0.0)
            else:
                failed.setdefault(result.error_code or "provider_error", []).append(target.id)
        changes: list[Transition] = []
        exhausted = batch.attempt >= batch.max_attempts
        if retry and exhausted:
            failed.setdefault("max_attempts", []).extend(retry)
        async with self.services.pool.connection() as conn:
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
        await self.progress.record(batch.church_id, batch.message_id, changes)
        if retry and exhausted:
            await self.services.redis.xadd(
                keys.DEAD_LETTER_STREAM,
                {
                    "j": encode_entry(msgspec.structs.replace(batch, recipient_ids=retry)),
                    "reason": "max_attempts",
                },
                maxlen=STREAM_MAXLEN,
                approximate=True,
            )
        elif retry:
            delay = max(retry_after, backoff_s(batch.attempt, self.settings.retry_base_s))
            again = msgspec.structs.replace(batch, recipient_ids=retry, attempt=batch.attempt + 1)
            due_ms = int((time.time() + delay) * 1000)
            await schedule_retry(self.services.redis, again, due_ms, self.settings.shards)

    # -- maintenance ---------------------------------------------------------

    async def _maintenance_loop(self) -> None:
        last_claim = 0.0
        while not self._stopping.is_set():
            try:
                await self._pump.pump(int(time.time() * 1000))
                if time.monotonic() - last_claim > max(1.0, self.settings.claim_idle_ms / 4000):
                    last_claim = time.monotonic()
                    await self._autoclaim()
            except Exception:
                log.exception("maintenance step failed")
            await asyncio.sleep(0.2)

    async def _autoclaim(self) -> None:
        for stream in [keys.MATERIALIZE_STREAM, *self._streams]:
            try:
                claimed: Any = await self.services.redis.xautoclaim(
                    stream,
                    keys.SEND_GROUP,
                    self.name,
                    self.settings.claim_idle_ms,
                    start_id="0-0",
                    count=ENTRIES_PER_READ,
                )
            except ResponseError as exc:
                if "NOGROUP" in str(exc):
                    await ensure_groups(self.services)
                    return
                raise
            for entry_id, fields in claimed[1]:
                if fields:
                    log.info("taking over stalled entry", extra={"entry": _text(entry_id)})
                    await self._start(stream, _text(entry_id), fields)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
