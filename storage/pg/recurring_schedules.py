"""Recurring messages: a rule in the church's time zone, and one message per occurrence.

Rules are read in the church's zone (``church.timezone``), so "every Sunday at
09:00" stays 09:00 on both sides of a DST change. A wall-clock time that a
spring-forward skips (02:30 on that night) runs at the same distance past the
change (03:30); one that a fall-back repeats runs once, at its first occurrence.

Exactly once, with any number of schedulers: ``run_next_due`` claims a due row
with ``FOR UPDATE SKIP LOCKED`` (another scheduler takes another row or none),
inserts the occurrence under its unique ``(church_id, recurring_id,
occurrence_at)`` key, makes the message and advances ``next_run_at`` in that one
transaction. An occurrence whose key exists already is never made again.

Each occurrence becomes an ordinary message (``recurring_id`` set), accepted at
its run time: its audience is the target's members at that moment, and a
template is read then, so edits to a template reach the following runs.
"""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import msgspec
from psycopg.types.json import Jsonb

from storage.domain.errors import InvalidInput, NotFound, StorageError
from storage.domain.ids import uuid7
from storage.domain.recurrence import Rule, next_occurrence, zone_of
from storage.pg.database import Conn
from storage.pg.freshness import stale_ok
from storage.pg.groups import existing_ids
from storage.pg.messages import Message, Target, accept_message, target_ids
from storage.pg.pagination import Page, decode_cursor, page_of
from storage.pg.templates import get_template

MISSED_AFTER = timedelta(hours=1)
"""An occurrence found more than this late (schedulers were down) is recorded
``missed`` and not sent: a "see you this morning" text is worse late than never."""


class RecurringMessage(msgspec.Struct, frozen=True):
    id: uuid.UUID
    name: str
    body: str | None
    template_id: uuid.UUID | None
    target: Target
    rule: Rule
    starts_on: date | None
    ends_on: date | None
    enabled: bool
    next_run_at: datetime | None
    """The next occurrence, UTC; null when paused or past ``ends_on``."""
    next_run_local: str | None
    """The same instant in the church's time zone (ISO 8601 with its offset)."""
    timezone: str
    last_run_at: datetime | None
    created_at: datetime
    updated_at: datetime


class Occurrence(msgspec.Struct, frozen=True):
    occurrence_at: datetime
    status: str
    """``sent`` (a message was made), ``missed`` (found too late) or ``failed``."""
    message_id: uuid.UUID | None
    detail: str | None
    created_at: datetime


_COLS = (
    "r.id, r.name, r.body, r.template_id, r.target, r.rule, r.starts_on, r.ends_on, "
    "r.enabled, r.next_run_at, c.timezone, r.last_run_at, r.created_at, r.updated_at"
)
_FROM = "recurring_message r JOIN church c ON c.id = r.church_id"


def _recurring(row: tuple[Any, ...]) -> RecurringMessage:
    next_run_at: datetime | None = row[9]
    local = next_run_at.astimezone(zone_of(row[10])).isoformat() if next_run_at else None
    return RecurringMessage(
        id=row[0],
        name=row[1],
        body=row[2],
        template_id=row[3],
        target=msgspec.convert(row[4], Target),
        rule=msgspec.convert(row[5], Rule),
        starts_on=row[6],
        ends_on=row[7],
        enabled=row[8],
        next_run_at=next_run_at,
        next_run_local=local,
        timezone=row[10],
        last_run_at=row[11],
        created_at=row[12],
        updated_at=row[13],
    )


class RecurringFields(msgspec.Struct, frozen=True):
    """Everything a recurring message is made of (a create, or an update merged in)."""

    name: str
    body: str | None
    template_id: uuid.UUID | None
    target: Target
    rule: Rule
    starts_on: date | None
    ends_on: date | None
    enabled: bool

    def schedule_key(self) -> tuple[Any, ...]:
        return (self.rule, self.starts_on, self.ends_on, self.enabled)


def _columns(fields: RecurringFields) -> tuple[Any, ...]:
    """name, body, template_id, target, rule, starts_on, ends_on, enabled: the
    columns create and update write, in that order."""
    return (
        fields.name,
        fields.body,
        fields.template_id,
        Jsonb(msgspec.to_builtins(fields.target)),
        Jsonb(msgspec.to_builtins(fields.rule)),
        fields.starts_on,
        fields.ends_on,
        fields.enabled,
    )


async def _church_zone(conn: Conn, church_id: uuid.UUID) -> ZoneInfo:
    cur = await conn.execute("SELECT timezone FROM church WHERE id = %s", (church_id,))
    row = await cur.fetchone()
    return zone_of(row[0] if row else "UTC")


async def _check_references(conn: Conn, church_id: uuid.UUID, fields: RecurringFields) -> None:
    if fields.starts_on and fields.ends_on and fields.starts_on > fields.ends_on:
        raise InvalidInput("ends_on", "must not be before starts_on")
    named = target_ids(fields.target)
    if named is not None:
        table, ids = named
        if await existing_ids(conn, church_id, table, ids) != set(ids):
            raise NotFound({"member_group": "group", "member": "member"}.get(table, "branch"))
    if fields.template_id is not None:
        await get_template(conn, church_id, fields.template_id)


def _next_run(fields: RecurringFields, zone: ZoneInfo, now: datetime) -> datetime | None:
    if not fields.enabled:
        return None
    return next_occurrence(
        fields.rule, zone, now, starts_on=fields.starts_on, ends_on=fields.ends_on
    )


async def create_recurring(
    conn: Conn,
    church_id: uuid.UUID,
    fields: RecurringFields,
    *,
    created_by: uuid.UUID | None,
    now: datetime | None = None,
) -> RecurringMessage:
    await _check_references(conn, church_id, fields)
    zone = await _church_zone(conn, church_id)
    next_run_at = _next_run(fields, zone, now or datetime.now(UTC))
    cur = await conn.execute(
        "WITH r AS (INSERT INTO recurring_message (church_id, id, name, body, template_id, "
        "target, rule, starts_on, ends_on, enabled, next_run_at, created_by) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING *) "
        f"SELECT {_COLS} FROM r JOIN church c ON c.id = r.church_id",
        (
            church_id,
            uuid7(),
            *_columns(fields),
            next_run_at,
            created_by,
        ),
    )
    row = await cur.fetchone()
    assert row is not None
    return _recurring(row)


async def get_recurring(
    conn: Conn, church_id: uuid.UUID, recurring_id: uuid.UUID, *, lock: bool = False
) -> RecurringMessage:
    cur = await conn.execute(
        f"SELECT {_COLS} FROM {_FROM} WHERE r.church_id = %s AND r.id = %s"
        + (" FOR UPDATE OF r" if lock else ""),
        (church_id, recurring_id),
    )
    row = await cur.fetchone()
    if row is None:
        raise NotFound("recurring message")
    return _recurring(row)


def fields_of(found: RecurringMessage) -> RecurringFields:
    return RecurringFields(
        name=found.name,
        body=found.body,
        template_id=found.template_id,
        target=found.target,
        rule=found.rule,
        starts_on=found.starts_on,
        ends_on=found.ends_on,
        enabled=found.enabled,
    )


async def update_recurring(
    conn: Conn,
    church_id: uuid.UUID,
    recurring_id: uuid.UUID,
    change: Any,
    *,
    now: datetime | None = None,
) -> RecurringMessage:
    """Apply ``change(current fields) -> new fields`` under the row's lock.

    A changed rule, start, end or a re-enable schedules from now on (missed runs
    are not made up); other edits keep ``next_run_at``. Pausing clears it.
    """
    async with conn.transaction():
        found = await get_recurring(conn, church_id, recurring_id, lock=True)
        before = fields_of(found)
        after: RecurringFields = change(before)
        await _check_references(conn, church_id, after)
        next_run_at = found.next_run_at
        if after.schedule_key() != before.schedule_key() or next_run_at is None:
            zone = await _church_zone(conn, church_id)
            next_run_at = _next_run(after, zone, now or datetime.now(UTC))
        cur = await conn.execute(
            "WITH r AS (UPDATE recurring_message SET name = %s, body = %s, template_id = %s, "
            "target = %s, rule = %s, starts_on = %s, ends_on = %s, enabled = %s, "
            "next_run_at = %s, updated_at = now() WHERE church_id = %s AND id = %s "
            f"RETURNING *) SELECT {_COLS} FROM r JOIN church c ON c.id = r.church_id",
            (
                *_columns(after),
                next_run_at,
                church_id,
                recurring_id,
            ),
        )
        row = await cur.fetchone()
        assert row is not None
    return _recurring(row)


async def delete_recurring(
    conn: Conn, church_id: uuid.UUID, recurring_id: uuid.UUID
) -> RecurringMessage:
    """Delete it and its occurrence log; the messages it made stay (with ``recurring_id``).

    A scheduler in the middle of its occurrence holds the row lock, so the delete
    waits for that commit; after it nothing more runs."""
    async with conn.transaction():
        found = await get_recurring(conn, church_id, recurring_id, lock=True)
        await conn.execute(
            "DELETE FROM recurring_message WHERE church_id = %s AND id = %s",
            (church_id, recurring_id),
        )
    return msgspec.structs.replace(found, enabled=False, next_run_at=None, next_run_local=None)


@stale_ok
async def list_recurring(
    conn: Conn, church_id: uuid.UUID, *, limit: int, cursor: str | None
) -> Page[RecurringMessage]:
    """Newest first."""
    clauses = ["r.church_id = %s"]
    params: list[Any] = [church_id]
    if cursor:
        c = decode_cursor(cursor)
        clauses.append("(r.created_at, r.id) < (%s, %s)")
        params += [c.at, c.id]
    params.append(limit + 1)
    cur = await conn.execute(
        f"SELECT {_COLS} FROM {_FROM} WHERE {' AND '.join(clauses)} "
        "ORDER BY r.created_at DESC, r.id DESC LIMIT %s",
        params,
    )
    rows = [_recurring(r) for r in await cur.fetchall()]
    return page_of(rows, limit, lambda r: (r.created_at, r.id))


@stale_ok
async def list_occurrences(
    conn: Conn, church_id: uuid.UUID, recurring_id: uuid.UUID, *, limit: int, cursor: str | None
) -> Page[Occurrence]:
    """Most recent first."""
    await get_recurring(conn, church_id, recurring_id)
    params: list[Any] = [church_id, recurring_id]
    extra = ""
    if cursor:
        extra = " AND occurrence_at < %s"
        params.append(decode_cursor(cursor).at)
    params.append(limit + 1)
    cur = await conn.execute(
        "SELECT occurrence_at, status, message_id, detail, created_at FROM recurring_occurrence "
        f"WHERE church_id = %s AND recurring_id = %s{extra} "
        "ORDER BY occurrence_at DESC LIMIT %s",
        params,
    )
    rows = [Occurrence(*r) for r in await cur.fetchall()]
    return page_of(rows, limit, lambda o: (o.occurrence_at, recurring_id))


class Ran(msgspec.Struct, frozen=True):
    """What one claim did: the occurrence, and the message to enqueue if one was made."""

    church_id: uuid.UUID
    recurring_id: uuid.UUID
    occurrence_at: datetime
    status: str
    message: Message | None


async def run_next_due(conn: Conn, now: datetime | None = None) -> Ran | None:
    """Claim one due recurring message and make its occurrence, exactly once.

    Returns None when nothing is due (or every due row is being run by another
    scheduler). The message is committed here; the caller enqueues it.
    """
    now = now or datetime.now(UTC)
    async with conn.transaction():
        cur = await conn.execute(
            f"SELECT {_COLS}, r.church_id, r.created_by, c.phone_number FROM {_FROM} "
            "WHERE r.enabled AND r.next_run_at <= %s ORDER BY r.next_run_at LIMIT 1 "
            "FOR UPDATE OF r SKIP LOCKED",
            (now,),
        )
        row = await cur.fetchone()
        if row is None:
            return None
        found = _recurring(row[:14])
        church_id, created_by, from_number = row[14], row[15], row[16]
        occurrence_at = found.next_run_at
        assert occurrence_at is not None
        cur = await conn.execute(
            "INSERT INTO recurring_occurrence (church_id, recurring_id, occurrence_at, status) "
            "VALUES (%s, %s, %s, 'failed') ON CONFLICT DO NOTHING RETURNING 1",
            (church_id, found.id, occurrence_at),
        )
        fresh = await cur.fetchone() is not None
        status, message, detail = "sent", None, None
        if not fresh:
            status = "duplicate"
        elif now - occurrence_at > MISSED_AFTER:
            status, detail = "missed", f"found {now - occurrence_at} late"
        else:
            try:
                message = await _make_message(conn, church_id, found, from_number, created_by)
            except StorageError as exc:
                status, detail = "failed", str(exc)
        if fresh:
            await conn.execute(
                "UPDATE recurring_occurrence SET status = %s, message_id = %s, detail = %s "
                "WHERE church_id = %s AND recurring_id = %s AND occurrence_at = %s",
                (
                    status,
                    message.id if message else None,
                    detail,
                    church_id,
                    found.id,
                    occurrence_at,
                ),
            )
        zone = zone_of(found.timezone)
        next_run_at = next_occurrence(
            found.rule,
            zone,
            max(occurrence_at, now),
            starts_on=found.starts_on,
            ends_on=found.ends_on,
        )
        await conn.execute(
            "UPDATE recurring_message SET next_run_at = %s, "
            "last_run_at = CASE WHEN %s THEN %s ELSE last_run_at END "
            "WHERE church_id = %s AND id = %s",
            (next_run_at, message is not None, occurrence_at, church_id, found.id),
        )
    return Ran(church_id, found.id, occurrence_at, status, message)


async def _make_message(
    conn: Conn,
    church_id: uuid.UUID,
    found: RecurringMessage,
    from_number: str,
    created_by: uuid.UUID | None,
) -> Message:
    body = found.body
    if found.template_id is not None:
        body = (await get_template(conn, church_id, found.template_id)).body
    if not body:
        raise InvalidInput("body", "the message has no text")
    # accept_message's own transaction is a savepoint here: a failure (a group
    # deleted since) rolls back only the message, and the occurrence records it.
    return await accept_message(
        conn,
        church_id,
        body=body,
        target=found.target,
        from_number=from_number,
        created_by=created_by,
        template_id=found.template_id,
        recurring_id=found.id,
    )
