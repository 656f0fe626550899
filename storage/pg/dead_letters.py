"""The dead-letter stream: work that used every attempt, to inspect and send again.

The delivery worker copies a send batch to ``key_names.DEAD_LETTER_STREAM`` with a
``reason`` once its recipients have used ``max_attempts`` (they end ``failed``,
error ``max_attempts``). Here entries are read, filtered by church, and requeued.

Ids: an entry's stream id ``<ms>-<seq>`` is shown as a UUIDv7 carrying the same
two numbers (its timestamp is when the work died), so dead letters have ids like
every other row of the API; ``entry_id_of`` turns one back.

Requeueing never texts anyone twice:

- ``reset_exhausted`` (storage/pg/recipients.py) moves back to ``queued``, with a
  fresh attempt budget, only recipients still ``failed`` without a provider id,
  in one guarded UPDATE: two requeues of one entry race for the rows, and the
  loser finds none to send;
- every send carries the recipient's stable ``Idempotency-Key`` (``rcpt-<id>``),
  so an attempt that did reach the provider before it timed out is answered
  from the provider's idempotency record, not sent again. That record lives 24
  hours, so entries older than ``REQUEUE_WINDOW`` are refused (``Conflict``):
  for them a new broadcast is the honest way to try again;
- the entry is deleted once requeued; a crash before that leaves it listed, and
  requeueing it again finds nothing left to reset.

The queue entry is written back through ``storage.queue.enqueue_sends`` like any
other; the message's progress counters move the recipients from ``failed`` to
``queued`` and forget that it completed, so ``message.completed`` comes again
when the requeued recipients are final.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import msgspec

from storage.domain.errors import Conflict, NotFound
from storage.pg.database import Pool
from storage.pg.pagination import Page, decode_cursor, encode_cursor
from storage.pg.recipients import reset_exhausted
from storage.redis import key_names
from storage.redis.connection import Redis
from storage.redis.queue import Work, enqueue_sends, send_decoder
from storage.redis.scripts import lua

log = logging.getLogger("koinonia.storage.dead_letters")

REQUEUE_WINDOW = timedelta(hours=23)
"""Entries younger than this may be requeued: inside the provider's 24-hour
idempotency window, with an hour's margin."""

SCAN_CHUNK = 500
SCAN_BUDGET = 20_000
"""Entries one page request reads at most; a church with few dead letters in a long
stream gets a short page with a cursor rather than a slow answer."""

_SEQ_BITS = 62
_SEQ_MASK = (1 << _SEQ_BITS) - 1


class DeadLetter(msgspec.Struct, frozen=True):
    id: uuid.UUID
    """The entry, as a UUIDv7 whose timestamp is when the work was dead-lettered."""
    church_id: uuid.UUID
    kind: Literal["batch", "reply"]
    """``batch``: recipients of a broadcast; ``reply``: the one recipient of a staff
    reply or an automatic answer (its conversation message has the message's id)."""
    reason: str
    message_id: uuid.UUID
    """The broadcast, or the reply (which is also its conversation message's id)."""
    conversation_id: uuid.UUID | None
    recipient_ids: list[uuid.UUID]
    recipient_count: int
    attempt: int
    max_attempts: int
    dead_at: datetime
    requeueable: bool
    """Young enough to requeue (``REQUEUE_WINDOW``)."""


class Requeued(msgspec.Struct, frozen=True):
    id: uuid.UUID
    church_id: uuid.UUID
    message_id: uuid.UUID
    requeued: int
    """Recipients (or the one reply) sent again with a fresh attempt budget."""
    unchanged: int
    """Already requeued, or no longer failed: left alone."""


def entry_uuid(entry_id: str) -> uuid.UUID:
    """``"1732262400000-3"`` → a UUIDv7 with that millisecond and sequence number."""
    ms, seq = (int(part) for part in entry_id.split("-"))
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | 0b10 << 62 | (seq & _SEQ_MASK)
    return uuid.UUID(int=value)


def entry_id_of(ref: uuid.UUID | str) -> str | None:
    """The stream id a dead-letter id (or a raw ``<ms>-<seq>``) names; None if neither."""
    if isinstance(ref, str):
        parts = ref.split("-")
        if len(parts) == 2 and all(p.isdigit() and len(p) <= 20 for p in parts):
            return ref
        try:
            ref = uuid.UUID(ref)
        except ValueError:
            return None
    if ref.version != 7 or (ref.int >> 64) & 0xFFF:
        return None
    return f"{ref.int >> 80}-{ref.int & _SEQ_MASK}"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _letter(entry_id: str, fields: dict[Any, Any], now: datetime) -> DeadLetter | None:
    payload = fields.get(b"j") or fields.get("j")
    if payload is None:
        return None
    try:
        work: Work = send_decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError):
        log.warning("undecodable dead letter", extra={"entry": entry_id})
        return None
    reason = _text(fields.get(b"reason") or fields.get("reason") or b"")
    dead_at = datetime.fromtimestamp(int(entry_id.split("-")[0]) / 1000, UTC)
    kind: Literal["batch", "reply"] = "batch" if work.conversation_id is None else "reply"
    return DeadLetter(
        id=entry_uuid(entry_id),
        church_id=work.church_id,
        kind=kind,
        reason=reason,
        message_id=work.message_id,
        conversation_id=work.conversation_id,
        recipient_ids=list(work.recipient_ids),
        recipient_count=len(work.recipient_ids),
        attempt=work.attempt,
        max_attempts=work.max_attempts,
        dead_at=dead_at,
        requeueable=now - dead_at < REQUEUE_WINDOW,
    )


async def list_dead_letters(
    redis: Redis,
    church_id: uuid.UUID | None,
    *,
    limit: int,
    cursor: str | None,
    now: datetime | None = None,
) -> Page[DeadLetter]:
    """Newest first, one church's (or every church's, for operators), keyset-paged
    by entry id. Reads at most ``SCAN_BUDGET`` entries per page."""
    at = now or datetime.now(UTC)
    upper = "+"
    if cursor:
        after = entry_id_of(decode_cursor(cursor).id)
        if after is None:
            return Page(items=[], next_cursor=None)
        upper = f"({after}"
    found: list[DeadLetter] = []
    scanned = 0
    last: str | None = None
    while len(found) <= limit and scanned < SCAN_BUDGET:
        chunk: Any = await redis.xrevrange(
            key_names.DEAD_LETTER_STREAM, max=upper, min="-", count=SCAN_CHUNK
        )
        if not chunk:
            last = None
            break
        for raw_id, fields in chunk:
            entry_id = _text(raw_id)
            scanned += 1
            last = entry_id
            letter = _letter(entry_id, fields, at)
            if letter is not None and (church_id is None or letter.church_id == church_id):
                found.append(letter)
                if len(found) > limit:
                    break
        upper = f"({last}"
        if len(chunk) < SCAN_CHUNK:
            if len(found) <= limit:
                last = None  # the stream is exhausted: this is the last page
            break
    if len(found) > limit:
        items = found[:limit]
        return Page(items=items, next_cursor=encode_cursor(None, items[-1].id))
    if last is not None:
        # The budget ran out first: a short page, and a cursor to read on.
        return Page(items=found, next_cursor=encode_cursor(None, entry_uuid(last)))
    return Page(items=found, next_cursor=None)


async def dead_letters(
    redis: Redis, church_id: uuid.UUID | None = None, *, now: datetime | None = None
) -> AsyncIterator[DeadLetter]:
    """Every dead letter (of one church, or all), oldest first (the CLI's ``--all``)."""
    at = now or datetime.now(UTC)
    lower = "-"
    while True:
        chunk: Any = await redis.xrange(
            key_names.DEAD_LETTER_STREAM, min=lower, max="+", count=SCAN_CHUNK
        )
        if not chunk:
            return
        for raw_id, fields in chunk:
            entry_id = _text(raw_id)
            lower = f"({entry_id}"
            letter = _letter(entry_id, fields, at)
            if letter is not None and (church_id is None or letter.church_id == church_id):
                yield letter


async def get_dead_letter(
    redis: Redis,
    ref: uuid.UUID | str,
    church_id: uuid.UUID | None,
    *,
    now: datetime | None = None,
) -> tuple[str, DeadLetter, Work]:
    """(stream id, entry, its queue payload); another church's entry is NotFound."""
    entry_id = entry_id_of(ref)
    if entry_id is None:
        raise NotFound("dead letter")
    found: Any = await redis.xrange(key_names.DEAD_LETTER_STREAM, min=entry_id, max=entry_id)
    if not found:
        raise NotFound("dead letter")
    raw_id, fields = found[0]
    letter = _letter(_text(raw_id), fields, now or datetime.now(UTC))
    if letter is None or (church_id is not None and letter.church_id != church_id):
        raise NotFound("dead letter")
    payload = fields.get(b"j") or fields.get("j")
    return entry_id, letter, send_decoder.decode(payload)


_REOPEN_COUNTS = lua("reopen_counts")


async def requeue(
    pool: Pool,
    redis: Redis,
    ref: uuid.UUID | str,
    *,
    church_id: uuid.UUID | None,
    shards: int,
    max_attempts: int,
    now: datetime | None = None,
) -> Requeued:
    """Send a dead letter's work again with a fresh attempt budget, then delete it.

    ``church_id`` scopes the lookup (None: an operator's, any church). Raises
    NotFound for no such entry (or another church's) and Conflict for one older
    than ``REQUEUE_WINDOW``.
    """
    entry_id, letter, work = await get_dead_letter(redis, ref, church_id, now=now)
    if not letter.requeueable:
        raise Conflict(
            "this dead letter is older than the provider's 24-hour idempotency window; "
            "requeueing it could text a member twice: send a new message instead",
            field="id",
        )
    async with pool.connection() as conn:
        reset = await reset_exhausted(
            conn, work.church_id, work.message_id, list(work.recipient_ids)
        )
    if reset:
        await redis.eval(
            _REOPEN_COUNTS,
            1,
            key_names.message_counts(work.church_id, work.message_id),
            str(len(reset)),
        )
        again = msgspec.structs.replace(
            work, recipient_ids=reset, attempt=1, max_attempts=max_attempts
        )
        await enqueue_sends(redis, [again], shards)
    requeued, total = len(reset), len(work.recipient_ids)
    await redis.xdel(key_names.DEAD_LETTER_STREAM, entry_id)
    log.info(
        "dead letter requeued",
        extra={"entry": entry_id, "message_id": str(letter.message_id), "requeued": requeued},
    )
    return Requeued(
        id=letter.id,
        church_id=letter.church_id,
        message_id=letter.message_id,
        requeued=requeued,
        unchanged=total - requeued,
    )
