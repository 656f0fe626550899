"""Recipient status events and coalesced broadcast progress.

Every transition of a broadcast's recipient is published on ``message:<id>`` as
``message.recipient.status``
(integrators ask for each one). People watch ``message.progress`` instead: the
counters live in a Redis hash per message, updated in the same Lua call that
checks a 100 ms gate, so however many workers and web nodes record transitions,
a broadcast's progress is published at most ten times a second. A transition
that finds the gate closed leaves a trailing flush behind, so the last counts
are always published; the final ones go out with ``message.completed`` exactly
once (HSETNX). The single recipient of a staff reply or an automatic answer is a
conversation's affair: its transitions are ``conversation.message.status`` on
``inbox`` and ``conversation:<id>``, and no broadcast event mentions it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from typing import Any

from storage import keys
from storage.database import Pool
from storage.events import (
    ConversationMessageStatus,
    Counts,
    EventPublisher,
    MessageCompleted,
    MessageProgress,
    RecipientStatusChanged,
    new_event,
)
from storage.messages import SendTexts, mark_completed, message_counts
from storage.outbox import record_events
from storage.recipients import Transition
from storage.redis_connection import Redis
from storage.scripts import Call
from storage.statuses import ALL_STATUSES, FINAL
from storage.webhook_endpoints import interest

log = logging.getLogger("koinonia.delivery.progress")

GATE_MS = 100
COUNTS_TTL_S = 7 * 24 * 3600

# KEYS: counts hash, gate. ARGV: gate ms, then field/delta pairs.
# Returns nil when the hash is missing (Redis lost it): the caller rebuilds it.
_APPLY_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
for i = 2, #ARGV, 2 do redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1]) end
local open = redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[1])
local gate = 0
if open then gate = 1 end
return {gate, redis.call('HGETALL', KEYS[1])}
"""

_FINAL_FIELDS = tuple(s.value for s in FINAL)


class ProgressTracker:
    def __init__(self, redis: Redis, publisher: EventPublisher, pool: Pool) -> None:
        self._redis = redis
        self._publisher = publisher
        self._pool = pool
        self._webhooks = interest(pool)
        self._scripts = publisher.scripts
        self._apply = self._scripts.register(_APPLY_LUA)
        self.texts = SendTexts(pool)
        self._trailing: dict[tuple[uuid.UUID, uuid.UUID], None] = {}
        self._flusher: asyncio.Task[None] | None = None

    async def init_counts(
        self, church_id: uuid.UUID, message_id: uuid.UUID, total: int, queued: int, skipped: int
    ) -> None:
        key = keys.message_counts(church_id, message_id)
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(key, mapping={"total": total, "queued": queued, "skipped": skipped})
        pipe.expire(key, COUNTS_TTL_S)
        await pipe.execute()

    async def record(
        self, church_id: uuid.UUID, message_id: uuid.UUID, changes: list[Transition]
    ) -> None:
        """Publish one event per transition, then update and maybe publish progress.

        The one recipient of a staff reply or an automatic answer is told as
        ``conversation.message.status`` on the conversation's channels instead."""
        if not changes:
            return
        text = await self.texts.get(church_id, message_id)
        if text is not None and text.conversation_id is not None:
            await self._record_reply(church_id, message_id, text.conversation_id, changes)
            return
        channel = f"message:{message_id}"
        events = [
            new_event(
                "message.recipient.status",
                RecipientStatusChanged(
                    message_id=message_id,
                    recipient_id=c.id,
                    member_id=c.member_id,
                    status=c.status,
                    provider_message_id=c.provider_message_id,
                    error_code=c.error_code,
                ),
            )
            for c in changes
        ]
        calls = [self._publisher.publish_call(church_id, channel, e) for e in events]
        deltas: dict[str, int] = {}
        for c in changes:
            deltas[c.old_status] = deltas.get(c.old_status, 0) - 1
            deltas[c.status] = deltas.get(c.status, 0) + 1
        # The events and the counter update travel in one round trip.
        results = await self._scripts.run([*calls, self._apply_call(church_id, message_id, deltas)])
        if self._webhooks.wants(church_id, "message.recipient.status"):
            await self._to_webhooks(church_id, [(e.type, e.data) for e in events])
        await self._after_apply(church_id, message_id, results[-1])

    async def _record_reply(
        self,
        church_id: uuid.UUID,
        message_id: uuid.UUID,
        conversation_id: uuid.UUID,
        changes: list[Transition],
    ) -> None:
        events = [
            new_event(
                "conversation.message.status",
                ConversationMessageStatus(
                    conversation_id=conversation_id, message_id=message_id, status=c.status
                ),
            )
            for c in changes
        ]
        thread = f"conversation:{conversation_id}"
        await self._publisher.publish_many(
            church_id, [(channel, e) for e in events for channel in ("inbox", thread)]
        )
        if self._webhooks.wants(church_id, "conversation.message.status"):
            await self._to_webhooks(church_id, [(e.type, e.data) for e in events])
        if changes[-1].status in _FINAL_FIELDS:
            async with self._pool.connection() as conn:
                await mark_completed(conn, church_id, message_id)

    def _apply_call(
        self, church_id: uuid.UUID, message_id: uuid.UUID, deltas: dict[str, int]
    ) -> Call:
        args: list[str | int] = [GATE_MS]
        for field, delta in deltas.items():
            if delta:
                args += [field, delta]
        return (
            self._apply,
            [keys.message_counts(church_id, message_id), keys.progress_gate(church_id, message_id)],
            args,
        )

    async def refresh(self, church_id: uuid.UUID, message_id: uuid.UUID) -> None:
        """Re-read the counters and publish (or complete) as the gate allows."""
        await self._apply_deltas(church_id, message_id, {})

    async def _apply_deltas(
        self, church_id: uuid.UUID, message_id: uuid.UUID, deltas: dict[str, int]
    ) -> None:
        result = await self._scripts.run_one(*self._apply_call(church_id, message_id, deltas))
        await self._after_apply(church_id, message_id, result)

    async def _after_apply(self, church_id: uuid.UUID, message_id: uuid.UUID, result: Any) -> None:
        if result is None:
            await self._rebuild(church_id, message_id)
            return
        gate_open, flat = int(result[0]), result[1]
        fields = {_text(flat[i]): int(flat[i + 1]) for i in range(0, len(flat), 2)}
        await self._after_update(church_id, message_id, fields, gate_open=bool(gate_open))

    async def _after_update(
        self,
        church_id: uuid.UUID,
        message_id: uuid.UUID,
        fields: dict[str, int],
        *,
        gate_open: bool,
    ) -> None:
        counts = Counts(**{s.value: max(0, fields.get(s.value, 0)) for s in ALL_STATUSES})
        total = fields.get("total", 0)
        done = sum(fields.get(f, 0) for f in _FINAL_FIELDS)
        if total and done >= total:
            first = await self._redis.hsetnx(
                keys.message_counts(church_id, message_id), "completed", 1
            )
            if first:
                await self._complete(church_id, message_id, counts, total)
                return
        if gate_open:
            await self._publish_progress(church_id, message_id, counts, total)
        else:
            self._schedule_trailing(church_id, message_id)

    async def _complete(
        self, church_id: uuid.UUID, message_id: uuid.UUID, counts: Counts, total: int
    ) -> None:
        async with self._pool.connection() as conn:
            await mark_completed(conn, church_id, message_id)
        progress = new_event(
            "message.progress",
            MessageProgress(message_id=message_id, counts=counts, recipient_count=total),
        )
        completed = new_event(
            "message.completed", MessageCompleted(message_id=message_id, counts=counts)
        )
        channel = f"message:{message_id}"
        await self._publisher.publish_many(
            church_id,
            [
                (channel, progress),
                ("dashboard", progress),
                (channel, completed),
                ("dashboard", completed),
            ],
        )
        await self._to_webhooks(church_id, [(completed.type, completed.data)])

    async def _publish_progress(
        self, church_id: uuid.UUID, message_id: uuid.UUID, counts: Counts, total: int
    ) -> None:
        event = new_event(
            "message.progress",
            MessageProgress(message_id=message_id, counts=counts, recipient_count=total),
        )
        await self._publisher.publish_many(
            church_id, [(f"message:{message_id}", event), ("dashboard", event)]
        )
        if self._webhooks.wants(church_id, event.type):
            await self._to_webhooks(church_id, [(event.type, event.data)])

    async def _to_webhooks(self, church_id: uuid.UUID, events: list[tuple[str, Any]]) -> None:
        """Webhook copies of events for the church's matching endpoints (none: nothing
        stored). Hot paths ask the interest cache first, sparing churches without
        endpoints the round trip."""
        try:
            async with self._pool.connection() as conn:
                await record_events(conn, church_id, events)
        except Exception:
            log.exception("recording webhook events failed", extra={"events": len(events)})

    async def _rebuild(self, church_id: uuid.UUID, message_id: uuid.UUID) -> None:
        """Redis lost the counters: recount from Postgres, the truth."""
        async with self._pool.connection() as conn:
            counts = await message_counts(conn, church_id, message_id)
        values: dict[str, int] = {s.value: int(getattr(counts, s.value)) for s in ALL_STATUSES}
        total = sum(values.values())
        key = keys.message_counts(church_id, message_id)
        pipe = self._redis.pipeline(transaction=True)
        mapping: dict[str | bytes, int] = dict(values.items())
        mapping["total"] = total
        pipe.hset(key, mapping=mapping)  # type: ignore[arg-type]
        pipe.expire(key, COUNTS_TTL_S)
        await pipe.execute()
        log.info("progress counters rebuilt", extra={"message_id": str(message_id)})
        await self._after_update(church_id, message_id, {**values, "total": total}, gate_open=True)

    def _schedule_trailing(self, church_id: uuid.UUID, message_id: uuid.UUID) -> None:
        self._trailing[(church_id, message_id)] = None
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_trailing())

    async def _flush_trailing(self) -> None:
        while self._trailing:
            await asyncio.sleep(GATE_MS / 1000 + 0.01)
            pending = list(self._trailing)
            self._trailing.clear()
            for church_id, message_id in pending:
                try:
                    await self._apply_deltas(church_id, message_id, {})
                except Exception:
                    log.exception("trailing progress flush failed")

    async def aclose(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
