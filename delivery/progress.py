"""Recipient status events and coalesced broadcast progress.

Every transition of a broadcast's recipient is an event on ``message:<id>``,
``message.recipient.status`` (integrators ask for each one), logged in the very
transaction that made it (``log``: storage/pg/event_log.py), so it reaches realtime
and webhooks whatever happens after the commit. The single recipient of a staff
reply or an automatic answer is a conversation's affair: its transitions are
``conversation.message.status`` on ``inbox`` and ``conversation:<id>``, and no
broadcast event mentions it.

People watch ``message.progress`` instead (``record``, after the commit): the
counters live in a Redis hash per message, updated in the same Lua call that checks
a 100 ms gate, so however many workers and web nodes record transitions, a
broadcast's progress is logged at most ten times a second. A transition that finds
the gate closed leaves a trailing flush behind, so the last counts always go out.
The counters are only a fast path: when Redis lost them they are rebuilt from
Postgres, and completion is decided by Postgres (``complete``): the guarded UPDATE
that marks the message completed logs the final progress and ``message.completed``
in its own transaction, so there is exactly one, whether the counters, or the
scheduler's completion sweep over the recipient rows, noticed it first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from storage.domain.events import (
    ConversationMessageStatus,
    ConversationMessageStatusEvent,
    Counts,
    MessageCompleted,
    MessageCompletedEvent,
    MessageProgress,
    MessageProgressEvent,
    MessageRecipientStatusEvent,
    RecipientStatusChanged,
)
from storage.domain.statuses import ALL_STATUSES, FINAL
from storage.pg.database import Conn, Pool
from storage.pg.event_log import Emission, EventRelay, append
from storage.pg.messages import SendTexts, mark_completed, message_counts
from storage.pg.recipients import Transition
from storage.redis import key_names
from storage.redis.connection import Redis, riding_slot_moves
from storage.redis.scripts import Call, ScriptRunner, lua

log = logging.getLogger("koinonia.delivery.progress")

GATE_MS = 100
COUNTS_TTL_S = 7 * 24 * 3600

_APPLY_LUA = lua("progress_apply")

_FINAL_FIELDS = tuple(s.value for s in FINAL)


class ProgressTracker:
    def __init__(self, redis: Redis, scripts: ScriptRunner, pool: Pool, relay: EventRelay) -> None:
        self._redis = redis
        self._pool = pool
        self._relay = relay
        self._scripts = scripts
        self._apply = self._scripts.register(_APPLY_LUA)
        self.texts = SendTexts(pool)
        self._trailing: dict[tuple[uuid.UUID, uuid.UUID], None] = {}
        self._flusher: asyncio.Task[None] | None = None

    async def init_counts(
        self, church_id: uuid.UUID, message_id: uuid.UUID, total: int, queued: int, skipped: int
    ) -> None:
        key = key_names.message_counts(church_id, message_id)

        async def write() -> None:
            pipe = self._redis.pipeline(transaction=True)
            pipe.hset(key, mapping={"total": total, "queued": queued, "skipped": skipped})
            pipe.expire(key, COUNTS_TTL_S)
            await pipe.execute()

        # A transaction met by a slot migration ran nothing: run it again.
        await riding_slot_moves(write)

    # -- in the transaction of the transitions -------------------------------------------

    async def log(
        self, conn: Conn, changes: Iterable[tuple[uuid.UUID, uuid.UUID, Transition]]
    ) -> None:
        """Log one event per transition, (church, message, transition), in the caller's
        transaction."""
        emissions: list[Emission] = []
        for church_id, message_id, change in changes:
            emissions.append(await self._emission(conn, church_id, message_id, change))
        await append(conn, emissions)

    async def _emission(
        self, conn: Conn, church_id: uuid.UUID, message_id: uuid.UUID, change: Transition
    ) -> Emission:
        text = await self.texts.get(church_id, message_id, conn)
        if text is not None and text.conversation_id is not None:
            conversation_id = text.conversation_id
            return (
                church_id,
                ("inbox", f"conversation:{conversation_id}"),
                ConversationMessageStatusEvent.new(
                    ConversationMessageStatus(
                        conversation_id=conversation_id, message_id=message_id, status=change.status
                    ),
                ),
            )
        return (
            church_id,
            (f"message:{message_id}",),
            MessageRecipientStatusEvent.new(
                RecipientStatusChanged(
                    message_id=message_id,
                    recipient_id=change.id,
                    member_id=change.member_id,
                    status=change.status,
                    provider_message_id=change.provider_message_id,
                    error_code=change.error_code,
                ),
            ),
        )

    # -- after the commit ----------------------------------------------------------------

    async def record(
        self, church_id: uuid.UUID, message_id: uuid.UUID, changes: list[Transition]
    ) -> None:
        """After the commit of logged transitions: relay them now, count them, and
        log progress (or completion) as the gate allows."""
        if not changes:
            return
        self._relay.kick()
        text = await self.texts.get(church_id, message_id)
        if text is not None and text.conversation_id is not None:
            if changes[-1].status in _FINAL_FIELDS:
                await self.complete(church_id, message_id)
            return
        deltas: dict[str, int] = {}
        for c in changes:
            deltas[c.old_status] = deltas.get(c.old_status, 0) - 1
            deltas[c.status] = deltas.get(c.status, 0) + 1
        try:
            result = await self._scripts.run_one(*self._apply_call(church_id, message_id, deltas))
        except Exception:
            # The transitions and their events are committed; the counters are a fast
            # path that the completion sweep and the next rebuild make good.
            log.warning("progress counters not updated", extra={"message_id": str(message_id)})
            return
        await self._after_apply(church_id, message_id, result)

    async def record_many(self, changes: Iterable[tuple[uuid.UUID, uuid.UUID, Transition]]) -> None:
        by_message: dict[tuple[uuid.UUID, uuid.UUID], list[Transition]] = defaultdict(list)
        for church_id, message_id, change in changes:
            by_message[(church_id, message_id)].append(change)
        for (church_id, message_id), items in by_message.items():
            await self.record(church_id, message_id, items)

    def _apply_call(
        self, church_id: uuid.UUID, message_id: uuid.UUID, deltas: dict[str, int]
    ) -> Call:
        args: list[str | int] = [GATE_MS]
        for field, delta in deltas.items():
            if delta:
                args += [field, delta]
        return (
            self._apply,
            [
                key_names.message_counts(church_id, message_id),
                key_names.progress_gate(church_id, message_id),
            ],
            args,
        )

    async def refresh(self, church_id: uuid.UUID, message_id: uuid.UUID) -> None:
        """Re-read the counters and log progress (or complete) as the gate allows."""
        result = await self._scripts.run_one(*self._apply_call(church_id, message_id, {}))
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
        total = fields.get("total", 0)
        done = sum(fields.get(f, 0) for f in _FINAL_FIELDS)
        if total and done >= total:
            first = await self._redis.hsetnx(
                key_names.message_counts(church_id, message_id), "completed", 1
            )
            if first:
                await self.complete(church_id, message_id)
                return
        if gate_open:
            counts = Counts(**{s.value: max(0, fields.get(s.value, 0)) for s in ALL_STATUSES})
            event = MessageProgressEvent.new(
                MessageProgress(message_id=message_id, counts=counts, recipient_count=total)
            )
            async with self._pool.connection() as conn:
                await append(conn, [(church_id, (f"message:{message_id}", "dashboard"), event)])
            self._relay.kick()
        else:
            self._schedule_trailing(church_id, message_id)

    async def complete(self, church_id: uuid.UUID, message_id: uuid.UUID) -> bool:
        """Mark the message completed, once: the final progress and ``message.completed``
        are logged in the same transaction (counts from Postgres, the truth). A reply's
        message completes quietly (its conversation events said it all)."""
        text = await self.texts.get(church_id, message_id)
        async with self._pool.connection() as conn, conn.transaction():
            if not await mark_completed(conn, church_id, message_id):
                # Already completed, or the counters ran ahead of Postgres (rebuilt
                # while transitions were in flight): recount at the next transition.
                await self._forget_counts(church_id, message_id)
                return False
            if text is None or text.conversation_id is None:
                counts = await message_counts(conn, church_id, message_id)
                total = sum(getattr(counts, s.value) for s in ALL_STATUSES)
                progress = MessageProgressEvent.new(
                    MessageProgress(message_id=message_id, counts=counts, recipient_count=total)
                )
                completed = MessageCompletedEvent.new(
                    MessageCompleted(message_id=message_id, counts=counts)
                )
                channels = (f"message:{message_id}", "dashboard")
                await append(
                    conn, [(church_id, channels, progress), (church_id, channels, completed)]
                )
        self._relay.kick()
        return True

    async def _forget_counts(self, church_id: uuid.UUID, message_id: uuid.UUID) -> None:
        with contextlib.suppress(Exception):
            await self._redis.delete(key_names.message_counts(church_id, message_id))

    async def _rebuild(self, church_id: uuid.UUID, message_id: uuid.UUID) -> None:
        """Redis lost the counters: recount from Postgres, the truth."""
        async with self._pool.connection() as conn:
            counts = await message_counts(conn, church_id, message_id)
        values: dict[str, int] = {s.value: int(getattr(counts, s.value)) for s in ALL_STATUSES}
        total = sum(values.values())
        key = key_names.message_counts(church_id, message_id)
        mapping: dict[str | bytes, int] = dict(values.items())
        mapping["total"] = total

        async def write() -> None:
            pipe = self._redis.pipeline(transaction=True)
            pipe.hset(key, mapping=mapping)  # type: ignore[arg-type]
            pipe.expire(key, COUNTS_TTL_S)
            await pipe.execute()

        await riding_slot_moves(write)
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
                    await self.refresh(church_id, message_id)
                except Exception:
                    log.exception("trailing progress flush failed")

    async def aclose(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
