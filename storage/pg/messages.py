"""Broadcast messages: acceptance, reading, counts.

A staff reply or an automatic answer is a ``message`` row too (``kind`` ``reply``
or ``answer``, one recipient, storage/pg/conversations.py ``accept_reply``), so that
every text is sent the same way; the reads here show broadcasts only.

Acceptance writes one row: the message with its resolved target and the
audience size. The recipient rows are materialized right after the 202 by a
worker (storage/pg/recipients.py) from that target, restricted to what existed
at acceptance (member and membership ``created_at <= message.created_at``), so
a 50,000-member broadcast is accepted in one short transaction and nothing
accepted can be lost: a message whose recipients are not yet materialized is
found again by ``materialized_at IS NULL``.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from datetime import datetime, timedelta
from typing import Any

import msgspec
from psycopg.types.json import Jsonb

from storage.domain.errors import Conflict, NotFound
from storage.domain.events import Counts, MessageCreated, MessageCreatedEvent
from storage.domain.ids import created_at_of, uuid7
from storage.domain.segments import count_segments
from storage.domain.statuses import ALL_STATUSES, UNCONFIRMED, MessageStatus
from storage.pg.database import Conn, Pool
from storage.pg.event_log import append
from storage.pg.freshness import stale_ok
from storage.pg.groups import existing_ids
from storage.pg.media import media_by_ids
from storage.pg.pagination import Page, decode_cursor, page_of
from storage.redis.connection import Redis
from storage.redis.queue import MaterializeJob, enqueue_materialize


class Target(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    group_ids: list[uuid.UUID] | None = None
    member_ids: list[uuid.UUID] | None = None
    branch_ids: list[uuid.UUID] | None = None
    all: bool | None = None


class Message(msgspec.Struct, frozen=True):
    id: uuid.UUID
    body: str
    target: Target
    status: str
    recipient_count: int
    segments: int
    encoding: str
    from_number: str
    send_at: datetime | None
    created_at: datetime
    completed_at: datetime | None
    template_id: uuid.UUID | None = None
    recurring_id: uuid.UUID | None = None
    canceled_at: datetime | None = None
    media_ids: list[uuid.UUID] = []
    """MMS files (storage/pg/media.py), in the order the provider gets them."""
    archived: bool = False
    """Read from the archive (storage/archive/reader.py): its month has left the
    database."""


_COLS = (
    "id, body, target, status, recipient_count, segments, encoding, from_number, "
    "send_at, created_at, completed_at, template_id, recurring_id, canceled_at, media_ids"
)

MAX_SCHEDULE_AHEAD = timedelta(days=365)
"""How far ahead ``send_at`` may be; it also bounds the partitions the scheduler scans."""


def _message(row: tuple[Any, ...]) -> Message:
    target = msgspec.convert(row[2], Target)
    return Message(row[0], row[1], target, *row[3:])


_LIST_COLS = _COLS.replace("target,", "target::text,", 1)
"""The page's columns with the target as JSON text, decoded by a typed decoder:
py-spy showed jsonb → dict → ``msgspec.convert`` as ~7 % of a messages page."""
_target_decoder = msgspec.json.Decoder(Target)


def _listed_message(row: tuple[Any, ...]) -> Message:
    return Message(row[0], row[1], _target_decoder.decode(row[2]), *row[3:])


AUDIENCE_PLAN = "SET LOCAL enable_nestloop = off"
"""An audience is thousands of rows joined by church: hash joins are always right,
while a nested loop planned on statistics that have not yet seen a fresh import
(tables "empty" that hold 50,000 rows) turns quadratic. Set per transaction."""


def audience_sql(target: Target) -> tuple[str, list[Any]]:
    """SQL selecting ``(member_id, opted_in_now)`` of the target's audience as it
    was at ``accepted_at``; parameters: church id, accepted_at, then the ids."""
    where_member = (
        "m.church_id = %s AND m.created_at <= %s AND m.deleted_at IS NULL "
        "AND (m.opted_in AND m.opt_changed_at <= m_acc.at OR "
        "     NOT m.opted_in AND m.opt_changed_at > m_acc.at)"
    )
    if target.all:
        return (
            f"SELECT m.id, m.opted_in FROM member m, (SELECT %s::timestamptz AS at) m_acc "
            f"WHERE {where_member}",
            ["acc", "church", "acc"],
        )
    if target.group_ids is not None:
        # Driven from the memberships (primary key prefix church, group), then one
        # member lookup each: a plan that stays fast even before ANALYZE has seen
        # a freshly imported audience.
        return (
            "SELECT m.id, m.opted_in FROM (SELECT %s::timestamptz AS at) m_acc, "
            "(SELECT DISTINCT gm.member_id FROM group_membership gm WHERE gm.church_id = %s "
            " AND gm.group_id = ANY(%s) AND gm.created_at <= %s) g "
            f"JOIN member m ON m.id = g.member_id WHERE {where_member}",
            ["acc", "church", "ids", "acc", "church", "acc"],
        )
    if target.branch_ids is not None:
        return (
            "SELECT m.id, m.opted_in FROM member m, (SELECT %s::timestamptz AS at) m_acc "
            f"WHERE {where_member} AND m.branch_id = ANY(%s)",
            ["acc", "church", "acc", "ids"],
        )
    return (
        "SELECT m.id, m.opted_in FROM member m, (SELECT %s::timestamptz AS at) m_acc "
        f"WHERE {where_member} AND m.id = ANY(%s)",
        ["acc", "church", "acc", "ids"],
    )


def audience_params(
    target: Target, church_id: uuid.UUID, accepted_at: datetime
) -> tuple[str, tuple[Any, ...]]:
    sql, names = audience_sql(target)
    ids = target.group_ids or target.branch_ids or target.member_ids or []
    values = {"acc": accepted_at, "church": church_id, "ids": ids}
    return sql, tuple(values[n] for n in names)


def target_ids(target: Target) -> tuple[str, list[uuid.UUID]] | None:
    """(table, ids) the target names, for the existence check; None for ``all``."""
    if target.group_ids is not None:
        return "member_group", target.group_ids
    if target.member_ids is not None:
        return "member", target.member_ids
    if target.branch_ids is not None:
        return "branch", target.branch_ids
    return None


async def count_audience(
    conn: Conn,
    church_id: uuid.UUID,
    target: Target,
    at: datetime,
    media_ids: list[uuid.UUID] | None = None,
) -> int:
    """How many members a broadcast to ``target`` accepted at ``at`` goes to; NotFound
    when a group, member or branch it names, or then one of ``media_ids``, is not the
    church's. Inside the caller's transaction (the audience plan is set locally)."""
    named = target_ids(target)
    if named is not None:
        table, ids = named
        found = await existing_ids(conn, church_id, table, ids)
        if found != set(ids):
            raise NotFound({"member_group": "group", "member": "member"}.get(table, "branch"))
    await media_by_ids(conn, church_id, media_ids or [])
    await conn.execute(AUDIENCE_PLAN)
    sql, params = audience_params(target, church_id, at)
    cur = await conn.execute(f"SELECT count(*) FROM ({sql}) a", params)
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def accept_message(
    conn: Conn,
    church_id: uuid.UUID,
    *,
    body: str,
    target: Target,
    from_number: str,
    created_by: uuid.UUID | None,
    send_at: datetime | None = None,
    template_id: uuid.UUID | None = None,
    recurring_id: uuid.UUID | None = None,
    traceparent: str = "",
    media_ids: list[uuid.UUID] | None = None,
) -> Message:
    """Commit the message and its resolved target; recipients follow from a worker.

    With ``send_at`` the message waits as ``scheduled``; otherwise it is ``queued``
    and its ``message.created`` webhook event is recorded in the same transaction.
    ``segments`` / ``encoding`` are those of ``body`` as written: for a body with
    merge fields that is the un-rendered template, an estimate of each recipient's.
    ``traceparent``: the accepting request's trace context (storage/process/tracing.py),
    stored so that the broadcast's receipts join its trace; empty stores NULL.
    ``media_ids``: the church's files sent with it (``NotFound`` for any other id),
    checked in the same transaction as the row that names them.
    """
    message_id = uuid7()
    accepted_at = created_at_of(message_id)
    info = count_segments(body)
    status = MessageStatus.SCHEDULED if send_at is not None else MessageStatus.QUEUED
    async with conn.transaction():
        count = await count_audience(conn, church_id, target, accepted_at, media_ids)
        cur = await conn.execute(
            "INSERT INTO message (church_id, id, created_at, body, target, status, "
            "recipient_count, segments, encoding, from_number, created_by, send_at, "
            "template_id, recurring_id, traceparent, media_ids) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
            f"RETURNING {_COLS}",
            (
                church_id,
                message_id,
                accepted_at,
                body,
                Jsonb(msgspec.to_builtins(target)),
                status.value,
                count,
                info.segments,
                info.encoding,
                from_number,
                created_by,
                send_at,
                template_id,
                recurring_id,
                traceparent or None,
                list(media_ids or []),
            ),
        )
        out = await cur.fetchone()
        assert out is not None
        message = _message(out)
        if status is MessageStatus.QUEUED:
            await record_created(conn, church_id, message)
    return message


def created_event(message: Message) -> MessageCreated:
    return MessageCreated(
        message_id=message.id, recipient_count=message.recipient_count, status=message.status
    )


async def record_created(conn: Conn, church_id: uuid.UUID, message: Message) -> None:
    """Log ``message.created`` (the dashboard and webhooks) in the caller's
    transaction: when the message starts (at acceptance, or when its ``send_at``
    comes)."""
    event = MessageCreatedEvent.new(created_event(message))
    await append(conn, [(church_id, ("dashboard",), event)])


async def announce_started(
    redis: Redis, church_id: uuid.UUID, message: Message, traceparent: str = ""
) -> None:
    """After the commit of a started message: enqueue its materialization. Losing
    this only delays the message (the sweeps find it). ``traceparent``: the trace
    the materialization continues (empty: the worker reads the message's own)."""
    await enqueue_materialize(
        redis,
        MaterializeJob(
            church_id=church_id,
            message_id=message.id,
            created_at=message.created_at,
            traceparent=traceparent,
        ),
    )


async def adopt_traceparent(
    conn: Conn, church_id: uuid.UUID, message_id: uuid.UUID, traceparent: str
) -> None:
    """Store a trace context on a message accepted without one (a recurring
    occurrence, or accepted while tracing was off), so its receipts join the trace
    its worker started. A context stored already is kept."""
    await conn.execute(
        "UPDATE message SET traceparent = %s "
        "WHERE church_id = %s AND id = %s AND created_at = %s AND traceparent IS NULL",
        (traceparent, church_id, message_id, created_at_of(message_id)),
    )


async def cancel_message(conn: Conn, church_id: uuid.UUID, message_id: uuid.UUID) -> Message:
    """Cancel a scheduled message that has not started; anything else is a Conflict.

    Races with the scheduler are decided by the row lock: the scheduler's claim
    holds it while it turns the message ``queued``, and this guarded UPDATE then
    finds no ``scheduled`` row.
    """
    if message_id.version != 7:
        raise NotFound("message")
    cur = await conn.execute(
        "UPDATE message SET status = 'canceled', canceled_at = now() "
        "WHERE church_id = %s AND id = %s AND created_at = %s AND status = 'scheduled' "
        f"RETURNING {_COLS}",
        (church_id, message_id, created_at_of(message_id)),
    )
    row = await cur.fetchone()
    if row is None:
        current = await get_message(conn, church_id, message_id)
        raise Conflict(
            f"only a scheduled message that has not started can be canceled; "
            f"this one is {current.status}",
            field="status",
        )
    return _message(row)


async def claim_due_scheduled(
    conn: Conn, now: datetime, limit: int = 100
) -> list[tuple[uuid.UUID, Message]]:
    """Turn due ``scheduled`` messages ``queued``, once across any number of schedulers
    (``FOR UPDATE SKIP LOCKED``), recording each one's ``message.created`` in the
    same transaction; returns (church id, message). The caller enqueues their
    materialization after the commit (``unstarted_scheduled`` covers a lost one)."""
    async with conn.transaction():
        cur = await conn.execute(
            "UPDATE message SET status = 'queued' WHERE (church_id, id, created_at) IN ("
            "  SELECT church_id, id, created_at FROM message WHERE status = 'scheduled' "
            "  AND send_at <= %s AND created_at >= %s ORDER BY send_at LIMIT %s "
            "  FOR UPDATE SKIP LOCKED) "
            f"AND status = 'scheduled' RETURNING church_id, {_COLS}",
            (now, now - MAX_SCHEDULE_AHEAD - timedelta(days=1), limit),
        )
        claimed = [(r[0], _message(r[1:])) for r in await cur.fetchall()]
        for church_id, message in claimed:
            await record_created(conn, church_id, message)
    return claimed


async def unstarted_scheduled(
    conn: Conn, older_than: datetime, limit: int = 100
) -> list[tuple[uuid.UUID, uuid.UUID]]:
    """(church id, message id) of scheduled messages claimed before ``older_than``
    whose materialization never ran (the enqueue after the claim was lost)."""
    cur = await conn.execute(
        "SELECT church_id, id FROM message WHERE materialized_at IS NULL AND status = 'queued' "
        "AND send_at IS NOT NULL AND send_at < %s AND created_at >= %s "
        "ORDER BY created_at LIMIT %s",
        (older_than, older_than - MAX_SCHEDULE_AHEAD - timedelta(days=1), limit),
    )
    return [(r[0], r[1]) for r in await cur.fetchall()]


class MergeValues(msgspec.Struct, frozen=True):
    first_name: str
    last_name: str
    church_name: str

    def fields(self) -> dict[str, str]:
        return {
            "first_name": self.first_name,
            "last_name": self.last_name,
            "full_name": f"{self.first_name} {self.last_name}".strip(),
            "church_name": self.church_name,
        }


async def merge_values(
    conn: Conn, church_id: uuid.UUID, member_ids: list[uuid.UUID]
) -> dict[uuid.UUID, dict[str, str]]:
    """The merge-field values of each member (storage/domain/merge_fields.py FIELDS), as of now."""
    if not member_ids:
        return {}
    cur = await conn.execute(
        "SELECT m.id, m.first_name, m.last_name, c.name FROM member m "
        "JOIN church c ON c.id = m.church_id WHERE m.church_id = %s AND m.id = ANY(%s)",
        (church_id, member_ids),
    )
    return {r[0]: MergeValues(r[1], r[2], r[3]).fields() for r in await cur.fetchall()}


@stale_ok
async def get_message(conn: Conn, church_id: uuid.UUID, message_id: uuid.UUID) -> Message:
    if message_id.version != 7:
        raise NotFound("message")
    cur = await conn.execute(
        f"SELECT {_COLS} FROM message WHERE church_id = %s AND id = %s AND created_at = %s "
        "AND kind = 'broadcast'",
        (church_id, message_id, created_at_of(message_id)),
    )
    row = await cur.fetchone()
    if row is None:
        raise NotFound("message")
    return _message(row)


async def message_exists(conn: Conn, church_id: uuid.UUID, message_id: uuid.UUID) -> bool:
    if message_id.version != 7:
        return False
    cur = await conn.execute(
        "SELECT 1 FROM message WHERE church_id = %s AND id = %s AND created_at = %s "
        "AND kind = 'broadcast'",
        (church_id, message_id, created_at_of(message_id)),
    )
    return await cur.fetchone() is not None


class MessageFilter(msgspec.Struct, frozen=True):
    status: str | None = None
    since: datetime | None = None
    """Created at or after (inclusive); bounds the partitions scanned."""
    until: datetime | None = None
    """Created before (exclusive)."""


def list_messages_sql(
    church_id: uuid.UUID, *, limit: int, cursor: str | None, where: MessageFilter | None = None
) -> tuple[str, list[Any]]:
    """The statement of ``list_messages`` and its parameters (``bench/rest.py``'s
    reference server runs the very same)."""
    clauses = ["church_id = %s", "kind = 'broadcast'"]
    params: list[Any] = [church_id]
    if cursor:
        c = decode_cursor(cursor)
        clauses.append("(created_at, id) < (%s, %s)")
        params += [c.at, c.id]
    if where is not None:
        for clause, value in (
            ("status = %s", where.status),
            ("created_at >= %s", where.since),
            ("created_at < %s", where.until),
        ):
            if value is not None:
                clauses.append(clause)
                params.append(value)
    params.append(limit + 1)
    sql = (
        f"SELECT {_LIST_COLS} FROM message WHERE {' AND '.join(clauses)} "
        "ORDER BY created_at DESC, id DESC LIMIT %s"
    )
    return sql, params


@stale_ok
async def list_messages(
    conn: Conn,
    church_id: uuid.UUID,
    *,
    limit: int,
    cursor: str | None,
    where: MessageFilter | None = None,
) -> Page[Message]:
    """Broadcasts, newest first (replies are listed in their conversations); a date
    range prunes partitions."""
    sql, params = list_messages_sql(church_id, limit=limit, cursor=cursor, where=where)
    cur = await conn.execute(sql, params)
    rows = [_listed_message(r) for r in await cur.fetchall()]
    return page_of(rows, limit, lambda r: (r.created_at, r.id))


@stale_ok
async def message_counts(conn: Conn, church_id: uuid.UUID, message_id: uuid.UUID) -> Counts:
    cur = await conn.execute(
        "SELECT status, count(*) FROM message_recipient "
        "WHERE church_id = %s AND message_id = %s AND created_at = %s GROUP BY status",
        (church_id, message_id, created_at_of(message_id)),
    )
    found = {status: int(n) for status, n in await cur.fetchall()}
    return Counts(**{s.value: found.get(s.value, 0) for s in ALL_STATUSES})


class SendText(msgspec.Struct, frozen=True):
    """What sending a message's recipients needs to know of the message."""

    body: str
    consent_exempt: bool
    """Sent whatever the member's opt-in state: only HELP answers and START confirmations."""
    conversation_id: uuid.UUID | None
    """The conversation of a staff reply or an automatic answer; None for a broadcast."""
    traceparent: str = ""
    """The trace context stored at acceptance (empty: none): what receipts continue."""
    scheduled: bool = False
    """Scheduled or recurring: its recipients wait for a send time or quiet hours by
    design (not measured by ``koinonia_accept_to_sent_seconds``)."""
    media_ids: list[uuid.UUID] = []
    """MMS files, in order: each recipient's send carries a fresh link to each."""


class SendTexts:
    """``SendText`` of recent messages, read from Postgres once per message and process:
    every batch and every receipt of a broadcast asks again, and none of it changes
    (but a trace context a worker adopts at materialization, before any receipt)."""

    def __init__(self, pool: Pool, size: int = 4096) -> None:
        self._pool = pool
        self._size = size
        self._known: OrderedDict[uuid.UUID, SendText | None] = OrderedDict()

    async def get(
        self, church_id: uuid.UUID, message_id: uuid.UUID, conn: Conn | None = None
    ) -> SendText | None:
        """None for no such message. ``conn``: a connection the caller holds already."""
        if message_id in self._known:
            self._known.move_to_end(message_id)
            return self._known[message_id]
        query = (
            "SELECT body, consent_exempt, conversation_id, coalesce(traceparent, ''), "
            "send_at IS NOT NULL OR recurring_id IS NOT NULL, media_ids "
            "FROM message "
            "WHERE church_id = %s AND id = %s AND created_at = %s"
        )
        params = (church_id, message_id, created_at_of(message_id))
        if conn is not None:
            row = await (await conn.execute(query, params)).fetchone()
        else:
            async with self._pool.connection() as own:
                row = await (await own.execute(query, params)).fetchone()
        text = (
            SendText(
                row[0],
                bool(row[1]),
                row[2],
                row[3],
                scheduled=bool(row[4]),
                media_ids=list(row[5] or []),
            )
            if row
            else None
        )
        self._known[message_id] = text
        if len(self._known) > self._size:
            self._known.popitem(last=False)
        return text


OPEN_RECIPIENT = (
    "(r.status IN ('queued', 'sending') OR (r.status = 'sent' AND r.error_code IS DISTINCT FROM "
    f"'{UNCONFIRMED}'))"
)
"""SQL over ``message_recipient r``: the recipient is not final yet (storage/domain/statuses.py)."""


async def mark_completed(conn: Conn, church_id: uuid.UUID, message_id: uuid.UUID) -> bool:
    """Complete the message if it is not yet and every recipient is final, whatever a
    caller's counters said (Redis counters rebuilt mid-broadcast can run ahead);
    True only for the call that completed it."""
    created_at = created_at_of(message_id)
    cur = await conn.execute(
        "UPDATE message SET status = 'completed', completed_at = now() "
        "WHERE church_id = %s AND id = %s AND created_at = %s AND status <> 'completed' "
        "AND NOT EXISTS (SELECT 1 FROM message_recipient r WHERE r.church_id = %s "
        f"  AND r.message_id = %s AND r.created_at = %s AND {OPEN_RECIPIENT})",
        (church_id, message_id, created_at, church_id, message_id, created_at),
    )
    return cur.rowcount == 1
