"""Message recipients: materialization, claiming for a send, guarded transitions.

Every status change is an ``UPDATE ... WHERE status = ANY(<allowed>)`` so a
late, duplicated or reordered provider webhook, or a retried batch, can never
move a recipient backwards (storage/domain/statuses.py holds the rules).

Quiet hours (storage/domain/quiet_hours.py): a scheduled or recurring message's
recipients outside their local window are made ``queued`` with ``not_before``, the
instant their window opens. Claiming leaves such rows alone, the reconciler does
not count them as lost, and the scheduler's ``release_held`` clears the column and
re-enqueues them when the time comes. Counts are untouched: a held recipient is
simply ``queued``, so the message completes only once it has been sent.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import msgspec
from psycopg import sql
from psycopg.pq import TransactionStatus

from storage.domain.ids import created_at_of
from storage.domain.statuses import UNCONFIRMED, RecipientStatus, allowed_from
from storage.pg.database import Conn
from storage.pg.freshness import stale_ok
from storage.pg.held_recipients import hold_plan, hold_sql
from storage.pg.messages import AUDIENCE_PLAN, OPEN_RECIPIENT, Target, audience_params
from storage.pg.pagination import Page, decode_cursor, page_of
from storage.pg.partitions import month_start, partition_name


class Recipient(msgspec.Struct, frozen=True):
    id: uuid.UUID
    member_id: uuid.UUID
    status: str
    provider_message_id: str | None
    error_code: str | None
    attempts: int
    segments: int
    updated_at: datetime


class Materialized(msgspec.Struct, frozen=True):
    recipient_ids: list[uuid.UUID]
    """Every recipient row made, in id order (skipped ones included)."""
    queued: int
    skipped: int
    held: int = 0
    """Of the queued, how many wait for their quiet-hours window to open."""


class SendTarget(msgspec.Struct, frozen=True):
    """A recipient claimed for sending, with what the provider call needs."""

    id: uuid.UUID
    member_id: uuid.UUID
    phone_cipher: bytes
    attempts: int


class Transition(msgspec.Struct, frozen=True):
    id: uuid.UUID
    member_id: uuid.UUID
    old_status: str
    status: str
    provider_message_id: str | None
    error_code: str | None


async def materialize(
    conn: Conn, church_id: uuid.UUID, message_id: uuid.UUID, *, now: datetime | None = None
) -> Materialized | None:
    """Create the recipient rows of an accepted message, once.

    Returns None when the message is already materialized or another worker holds
    it right now. Members who opted out since acceptance become ``skipped`` rows,
    so the counts always add up to the recipient count. A scheduled or recurring
    message's recipients outside their quiet-hours window get ``not_before``.
    """
    created_at = created_at_of(message_id)
    async with conn.transaction():
        cur = await conn.execute(
            "SELECT target, segments, send_at IS NOT NULL OR recurring_id IS NOT NULL "
            "FROM message WHERE church_id = %s AND id = %s "
            "AND created_at = %s AND materialized_at IS NULL FOR UPDATE SKIP LOCKED",
            (church_id, message_id, created_at),
        )
        row = await cur.fetchone()
        if row is None:
            return None
        target = msgspec.convert(row[0], Target)
        plan = await hold_plan(conn, church_id, now or datetime.now(UTC)) if row[2] else None
        hold, hold_params, joins, join_params = hold_sql(plan, church_id)
        await conn.execute(AUDIENCE_PLAN)
        audience, params = audience_params(target, church_id, created_at)
        # Ids are the message id's first 80 bits and a row number: increasing, so
        # the primary key index fills at its right edge instead of splitting
        # pages all over (1.6x faster at 50,000 rows than random UUIDs), and
        # computable here, so no row travels back to the client.
        cur = await conn.execute(
            "WITH ins AS (INSERT INTO message_recipient (church_id, message_id, id, created_at, "
            "member_id, status, segments, not_before) "
            "SELECT %s, %s, (%s || lpad(to_hex(row_number() OVER ()), 12, '0'))::uuid, %s, "
            "a.id, CASE WHEN a.opted_in THEN 'queued' ELSE 'skipped' END, %s, "
            f"CASE WHEN a.opted_in THEN {hold} END "
            f"FROM ({audience}) a{joins} RETURNING status, not_before) "
            "SELECT count(*), count(*) FILTER (WHERE status = 'queued'), "
            "count(*) FILTER (WHERE not_before IS NOT NULL) FROM ins",
            (
                church_id,
                message_id,
                message_id.hex[:20],
                created_at,
                row[1],
                *hold_params,
                *params,
                *join_params,
            ),
        )
        counted = await cur.fetchone()
        total, queued, held = (
            (int(counted[0]), int(counted[1]), int(counted[2])) if counted else (0, 0, 0)
        )
        await conn.execute(
            "UPDATE message SET materialized_at = clock_timestamp(), recipient_count = %s, "
            "status = CASE WHEN %s = 0 THEN 'completed' ELSE 'sending' END, "
            "completed_at = CASE WHEN %s = 0 THEN now() END "
            "WHERE church_id = %s AND id = %s AND created_at = %s",
            (total, queued, queued, church_id, message_id, created_at),
        )
    # Skipped and held rows ride along in the batches: claiming ignores them.
    ids = [recipient_id(message_id, n) for n in range(1, total + 1)] if queued else []
    return Materialized(recipient_ids=ids, queued=queued, skipped=total - queued, held=held)


def recipient_id(message_id: uuid.UUID, number: int) -> uuid.UUID:
    """The id of a message's ``number``-th recipient (1-based), as materialize makes it."""
    return uuid.UUID(bytes=message_id.bytes[:10] + number.to_bytes(6, "big"))


async def refresh_statistics(conn: Conn, message_id: uuid.UUID, inserted: int) -> bool:
    """ANALYZE the recipients' partition when its statistics predate most of its
    rows (a fresh month, or a first large broadcast): every later statement on it
    is then planned on its real size. Bounded cost: ANALYZE samples at most
    30,000 rows whatever the partition's size."""
    if inserted < 1000:
        return False
    month = created_at_of(message_id).date()
    name = partition_name("message_recipient", month_start(month))
    cur = await conn.execute("SELECT reltuples FROM pg_class WHERE oid = to_regclass(%s)", (name,))
    row = await cur.fetchone()
    if row is None or float(row[0]) >= inserted:
        return False
    await conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(name)))
    return True


async def pending_materialization(
    conn: Conn, older_than: datetime, limit: int = 100
) -> list[tuple[uuid.UUID, uuid.UUID]]:
    """(church id, message id) of accepted messages still without recipient rows."""
    cur = await conn.execute(
        "SELECT church_id, id FROM message WHERE materialized_at IS NULL "
        "AND created_at < %s AND send_at IS NULL AND status = 'queued' "
        "ORDER BY created_at LIMIT %s",
        (older_than, limit),
    )
    return [(r[0], r[1]) for r in await cur.fetchall()]


async def claim_for_send(
    conn: Conn,
    church_id: uuid.UUID,
    message_id: uuid.UUID,
    recipient_ids: list[uuid.UUID],
    *,
    consent_exempt: bool = False,
) -> tuple[list[SendTarget], list[Transition]]:
    """Move the batch's sendable recipients to ``sending`` (opted-out ones to
    ``skipped``) and return them with their phones.

    This is the consent check every text passes when it is sent, whichever path
    accepted it. ``consent_exempt`` (a HELP answer, a START confirmation) skips only
    the opt-in part of it: an erased member is never texted.

    Rows already ``sending`` with no provider id are taken again: a worker died
    between claiming and recording the send, and the provider's idempotency key
    makes the repeat harmless. Rows with a provider id were sent: left alone.
    Rows held for quiet hours (``not_before`` ahead) are left ``queued``.
    """
    created_at = created_at_of(message_id)
    # Single-table statements on primary keys only: their plans stay right even
    # when the statistics have not yet seen a broadcast materialized a moment ago
    # (a join planned on such statistics can turn quadratic).
    async with conn.transaction():
        cur = await conn.execute(
            "SELECT id, member_id, status FROM message_recipient "
            "WHERE church_id = %s AND message_id = %s AND created_at = %s AND id = ANY(%s) "
            "AND status IN ('queued', 'sending') AND provider_message_id IS NULL "
            "AND (not_before IS NULL OR not_before <= now()) FOR UPDATE",
            (church_id, message_id, created_at, recipient_ids),
        )
        locked = await cur.fetchall()
        if not locked:
            return [], []
        cur = await conn.execute(
            "SELECT id, phone_cipher, (opted_in OR %s) AND deleted_at IS NULL FROM member "
            "WHERE church_id = %s AND id = ANY(%s)",
            (consent_exempt, church_id, [r[1] for r in locked]),
        )
        members = {r[0]: (bytes(r[1]), bool(r[2])) for r in await cur.fetchall()}
        sendable = [r[0] for r in locked if members.get(r[1], (b"", False))[1]]
        skipped = [r[0] for r in locked if not members.get(r[1], (b"", False))[1]]
        cur = await conn.execute(
            "UPDATE message_recipient SET status = CASE WHEN id = ANY(%s) THEN 'skipped' "
            "ELSE 'sending' END, attempts = attempts + 1, updated_at = now() "
            "WHERE church_id = %s AND message_id = %s AND created_at = %s AND id = ANY(%s) "
            "RETURNING id, attempts",
            (skipped, church_id, message_id, created_at, sendable + skipped),
        )
        attempts = {r[0]: int(r[1]) for r in await cur.fetchall()}
    rows = [
        (
            rid,
            member_id,
            members.get(member_id, (b"", False))[0],
            attempts.get(rid, 0),
            old,
            "skipped" if rid in set(skipped) else "sending",
        )
        for rid, member_id, old in locked
    ]
    targets: list[SendTarget] = []
    changes: list[Transition] = []
    for rid, member_id, cipher, tries, old, new in rows:
        if new == "sending":
            targets.append(SendTarget(rid, member_id, cipher, tries))
        if old != new:
            changes.append(Transition(rid, member_id, old, new, None, None))
    return targets, changes


async def record_provider_ids(
    conn: Conn, church_id: uuid.UUID, message_id: uuid.UUID, sent: list[tuple[uuid.UUID, str]]
) -> None:
    """Store provider message ids; statuses are left to the (possibly earlier) webhooks."""
    if not sent:
        return
    # Rows are locked in input order (the join is driven by the unnest); receipts
    # lock in id order too (apply_provider_statuses), so the two cannot deadlock.
    sent = sorted(sent)
    await conn.execute(
        "UPDATE message_recipient r SET provider_message_id = s.pid, updated_at = now() "
        "FROM unnest(%s::uuid[], %s::text[]) AS s(id, pid) "
        "WHERE r.church_id = %s AND r.message_id = %s AND r.created_at = %s AND r.id = s.id "
        "AND r.provider_message_id IS NULL",
        (
            [s[0] for s in sent],
            [s[1] for s in sent],
            church_id,
            message_id,
            created_at_of(message_id),
        ),
    )


async def transition_many(
    conn: Conn,
    church_id: uuid.UUID,
    message_id: uuid.UUID,
    recipient_ids: list[uuid.UUID],
    target: RecipientStatus,
    *,
    provider_message_id: str | None = None,
    error_code: str | None = None,
) -> list[Transition]:
    allowed = [s.value for s in allowed_from(target)]
    created_at = created_at_of(message_id)
    # Lock first to learn each row's old status (the progress counters need it);
    # the UPDATE repeats the guard so it holds whatever the isolation level.
    async with conn.transaction():
        cur = await conn.execute(
            "SELECT id, status FROM message_recipient WHERE church_id = %s AND message_id = %s "
            "AND created_at = %s AND id = ANY(%s) AND status = ANY(%s) FOR UPDATE",
            (church_id, message_id, created_at, recipient_ids, allowed),
        )
        old = {r[0]: r[1] for r in await cur.fetchall()}
        if not old:
            return []
        cur = await conn.execute(
            "UPDATE message_recipient SET status = %s, updated_at = now(), "
            "  provider_message_id = coalesce(provider_message_id, %s), "
            "  error_code = coalesce(%s, error_code) "
            "WHERE church_id = %s AND message_id = %s AND created_at = %s AND id = ANY(%s) "
            "AND status = ANY(%s) "
            "RETURNING id, member_id, status, provider_message_id, error_code",
            (
                target.value,
                provider_message_id,
                error_code,
                church_id,
                message_id,
                created_at,
                list(old),
                allowed,
            ),
        )
        rows = await cur.fetchall()
    return [Transition(r[0], r[1], old[r[0]], r[2], r[3], r[4]) for r in rows]


class ProviderStatus(msgspec.Struct, frozen=True):
    """One provider receipt to apply: its event id, whose recipient, what status."""

    event_id: str
    event_type: str
    church_id: uuid.UUID
    message_id: uuid.UUID
    recipient_id: uuid.UUID
    target: RecipientStatus
    provider_message_id: str
    error_code: str | None


class Applied(msgspec.Struct, frozen=True):
    changes: list[tuple[uuid.UUID, uuid.UUID, Transition]]
    """(church, message, transition) of every status that moved."""
    refused: set[str]
    """Event ids of receipts whose provider message id is not their recipient's: not
    applied and not recorded (so not deduplicated either)."""


async def apply_provider_statuses(conn: Conn, updates: list[ProviderStatus]) -> Applied:
    """Apply many receipts in one statement: each event id is recorded once and its
    status applied when the rules allow: forward only, and only when the row's
    provider id is unset or the receipt's own. A receipt naming a recipient whose
    provider id is another one, or whose own id belongs to another recipient, is
    refused whole: nothing of it is written.

    A ``sent`` receipt that says the carrier will never confirm (error
    ``delivery_unconfirmed``) may also land on a row already ``sent``: it makes
    that row final.

    The caller gives each recipient at most once per call (two receipts for one
    recipient in one statement would update its row once, arbitrarily). Joins
    are forced to primary-key lookups: the plan must not depend on statistics.
    """
    if not updates:
        return Applied(changes=[], refused=set())
    # Lock order = input order (nested loops over the unnest): by id, as
    # record_provider_ids does, so concurrent writers of one batch cannot deadlock.
    updates = sorted(updates, key=lambda u: (u.church_id, u.message_id, u.recipient_id))
    # In the caller's transaction, which logs the events with it (no savepoint of
    # its own: two round trips per batch), and both plan settings in one statement.
    if conn.info.transaction_status != TransactionStatus.INTRANS:
        raise RuntimeError("apply_provider_statuses runs inside its caller's transaction")
    await conn.execute(
        "SELECT set_config('enable_hashjoin', 'off', true), "
        "set_config('enable_mergejoin', 'off', true)"
    )
    cur = await conn.execute(
        "WITH input AS (SELECT * FROM unnest(%s::text[], %s::text[], %s::uuid[], "
        "  %s::uuid[], %s::uuid[], %s::timestamptz[], %s::text[], %s::text[], %s::text[], "
        "  %s::text[]) AS i(event_id, event_type, church_id, message_id, id, created_at, "
        "  target, pid, err, allowed)), "
        "mismatched AS (SELECT i.event_id FROM input i JOIN message_recipient r "
        "  ON r.church_id = i.church_id AND r.message_id = i.message_id AND r.id = i.id "
        "  AND r.created_at = i.created_at "
        "  WHERE r.provider_message_id <> i.pid "
        # A row without a provider id yet (the receipt outran the send's answer):
        # the receipt's id must not be another recipient's.
        "  OR (r.provider_message_id IS NULL AND EXISTS (SELECT 1 FROM message_recipient o "
        "      WHERE o.provider_message_id = i.pid AND o.id <> i.id))), "
        "ev AS (INSERT INTO provider_event (church_id, event_id, event_type) "
        "  SELECT church_id, event_id, event_type FROM input "
        "  WHERE event_id NOT IN (SELECT event_id FROM mismatched) "
        "  ON CONFLICT DO NOTHING RETURNING event_id), "
        "old AS (SELECT r.church_id, r.message_id, r.id, r.created_at, r.status AS before, "
        "  i.target, i.pid, i.err FROM input i JOIN message_recipient r "
        "  ON r.church_id = i.church_id AND r.message_id = i.message_id AND r.id = i.id "
        "  AND r.created_at = i.created_at "
        "  WHERE i.event_id IN (SELECT event_id FROM ev) "
        "  AND r.status = ANY(string_to_array(i.allowed, ',')) "
        "  AND (r.provider_message_id IS NULL OR r.provider_message_id = i.pid) "
        "  FOR UPDATE OF r), "
        "moved AS (UPDATE message_recipient r SET status = old.target, updated_at = now(), "
        "  provider_message_id = old.pid, error_code = coalesce(old.err, r.error_code) "
        "FROM old WHERE r.church_id = old.church_id AND r.message_id = old.message_id "
        "  AND r.id = old.id AND r.created_at = old.created_at "
        "RETURNING r.church_id, r.message_id, r.id, r.member_id, old.before, r.status, "
        "  r.provider_message_id, r.error_code) "
        "SELECT church_id, message_id, id, member_id, before, status, provider_message_id, "
        "  error_code, NULL FROM moved "
        "UNION ALL SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, event_id "
        "FROM mismatched",
        (
            [u.event_id for u in updates],
            [u.event_type for u in updates],
            [u.church_id for u in updates],
            [u.message_id for u in updates],
            [u.recipient_id for u in updates],
            [created_at_of(u.message_id) for u in updates],
            [u.target.value for u in updates],
            [u.provider_message_id for u in updates],
            [u.error_code for u in updates],
            [",".join(s.value for s in _receipt_allowed(u)) for u in updates],
        ),
    )
    rows = await cur.fetchall()
    return Applied(
        changes=[
            (r[0], r[1], Transition(r[2], r[3], r[4], r[5], r[6], r[7]))
            for r in rows
            if r[8] is None
        ],
        refused={r[8] for r in rows if r[8] is not None},
    )


def _receipt_allowed(update: ProviderStatus) -> frozenset[RecipientStatus]:
    allowed = allowed_from(update.target)
    if update.target is RecipientStatus.SENT and update.error_code == UNCONFIRMED:
        return allowed | {RecipientStatus.SENT}
    return allowed


async def locate_by_provider_id(
    conn: Conn, provider_message_id: str
) -> tuple[uuid.UUID, uuid.UUID, uuid.UUID] | None:
    """(church, message, recipient) for a provider message id: the slow path for a
    webhook whose URL lost our reference; it probes every partition's index."""
    cur = await conn.execute(
        "SELECT church_id, message_id, id FROM message_recipient WHERE provider_message_id = %s",
        (provider_message_id,),
    )
    row = await cur.fetchone()
    return (row[0], row[1], row[2]) if row else None


@stale_ok
async def list_recipients(
    conn: Conn,
    church_id: uuid.UUID,
    message_id: uuid.UUID,
    *,
    limit: int,
    cursor: str | None,
    status: str | None = None,
) -> Page[Recipient]:
    after = decode_cursor(cursor).id if cursor else None
    params: list[Any] = [church_id, message_id, created_at_of(message_id), after, after]
    extra = ""
    if status is not None:
        extra = " AND status = %s"
        params.append(status)
    params.append(limit + 1)
    cur = await conn.execute(
        "SELECT id, member_id, status, provider_message_id, error_code, attempts, segments, "
        "updated_at FROM message_recipient WHERE church_id = %s AND message_id = %s "
        f"AND created_at = %s AND (%s::uuid IS NULL OR id > %s){extra} ORDER BY id LIMIT %s",
        params,
    )
    rows = [Recipient(*r) for r in await cur.fetchall()]
    return page_of(rows, limit, lambda r: (None, r.id))


async def stale_open_recipients(
    conn: Conn, older_than: datetime, limit: int = 5000
) -> list[tuple[uuid.UUID, uuid.UUID, uuid.UUID]]:
    """(church, message, recipient) still queued, or sending without a provider id,
    untouched since ``older_than``: work the queue lost. Rows held for quiet hours
    are not lost: ``release_held`` sends them when their window opens."""
    cur = await conn.execute(
        "SELECT r.church_id, r.message_id, r.id FROM message m JOIN message_recipient r "
        "ON r.church_id = m.church_id AND r.message_id = m.id AND r.created_at = m.created_at "
        "WHERE m.status = 'sending' AND r.status IN ('queued', 'sending') "
        "AND r.provider_message_id IS NULL AND r.not_before IS NULL AND r.updated_at < %s "
        "ORDER BY m.created_at LIMIT %s",
        (older_than, limit),
    )
    return [(r[0], r[1], r[2]) for r in await cur.fetchall()]


async def finished_messages(conn: Conn, limit: int = 100) -> list[tuple[uuid.UUID, uuid.UUID]]:
    """(church, message) of messages still ``sending`` whose every recipient is final:
    the completion the progress counters missed (Redis lost them, or a process died
    between a commit and its counter update). Postgres decides, not Redis."""
    cur = await conn.execute(
        "SELECT m.church_id, m.id FROM message m WHERE m.status = 'sending' "
        "AND m.materialized_at IS NOT NULL AND NOT EXISTS ("
        "  SELECT 1 FROM message_recipient r WHERE r.church_id = m.church_id "
        f"  AND r.message_id = m.id AND r.created_at = m.created_at AND {OPEN_RECIPIENT}) "
        "ORDER BY m.created_at LIMIT %s",
        (limit,),
    )
    return [(r[0], r[1]) for r in await cur.fetchall()]


class AwaitingReceipt(msgspec.Struct, frozen=True):
    """A text the provider accepted whose final receipt has not come."""

    church_id: uuid.UUID
    message_id: uuid.UUID
    id: uuid.UUID
    provider_message_id: str
    status: RecipientStatus
    started_at: datetime
    """When its message started sending (the provider's window counts from about then)."""


async def claim_awaiting_receipts(
    conn: Conn, quiet_since: datetime, limit: int = 500
) -> list[AwaitingReceipt]:
    """Recipients ``sending`` or ``sent`` with a provider id and no final status, quiet
    since ``quiet_since``; each is touched, so it is looked up again only after another
    quiet period, by one scheduler at a time (``SKIP LOCKED``)."""
    async with conn.transaction():
        cur = await conn.execute(
            "WITH due AS (SELECT r.church_id, r.message_id, r.id, r.created_at, "
            "  coalesce(m.materialized_at, m.created_at) AS started_at "
            "  FROM message m JOIN message_recipient r ON r.church_id = m.church_id "
            "  AND r.message_id = m.id AND r.created_at = m.created_at "
            "  WHERE m.status = 'sending' AND r.status IN ('sending', 'sent') "
            "  AND r.provider_message_id IS NOT NULL "
            "  AND r.error_code IS DISTINCT FROM %s AND r.updated_at < %s "
            "  ORDER BY r.updated_at LIMIT %s FOR UPDATE OF r SKIP LOCKED) "
            "UPDATE message_recipient r SET updated_at = now() FROM due "
            "WHERE r.church_id = due.church_id AND r.message_id = due.message_id "
            "AND r.id = due.id AND r.created_at = due.created_at "
            "RETURNING r.church_id, r.message_id, r.id, r.provider_message_id, r.status, "
            "  due.started_at",
            (UNCONFIRMED, quiet_since, limit),
        )
        return [
            AwaitingReceipt(r[0], r[1], r[2], r[3], RecipientStatus(r[4]), r[5])
            for r in await cur.fetchall()
        ]


async def touch(
    conn: Conn, church_id: uuid.UUID, message_id: uuid.UUID, recipient_ids: list[uuid.UUID]
) -> None:
    """Mark re-enqueued rows as fresh so the reconciler does not pick them twice."""
    await conn.execute(
        "UPDATE message_recipient SET updated_at = now() WHERE church_id = %s "
        "AND message_id = %s AND created_at = %s AND id = ANY(%s)",
        (church_id, message_id, created_at_of(message_id), recipient_ids),
    )


async def reset_exhausted(
    conn: Conn, church_id: uuid.UUID, message_id: uuid.UUID, recipient_ids: list[uuid.UUID]
) -> list[uuid.UUID]:
    """Give dead-lettered recipients a fresh attempt budget: ``failed`` rows the
    provider never accepted (no provider id) go back to ``queued`` with no attempts,
    and their message, if it had completed, is ``sending`` again. Returns the rows
    reset; a row already reset, sent meanwhile or accepted by the provider is left
    alone, so resetting twice sends nobody twice."""
    created_at = created_at_of(message_id)
    async with conn.transaction():
        cur = await conn.execute(
            "UPDATE message_recipient SET status = 'queued', attempts = 0, error_code = NULL, "
            "not_before = NULL, updated_at = now() "
            "WHERE church_id = %s AND message_id = %s AND created_at = %s AND id = ANY(%s) "
            "AND status = 'failed' AND provider_message_id IS NULL RETURNING id",
            (church_id, message_id, created_at, recipient_ids),
        )
        reset = sorted(r[0] for r in await cur.fetchall())
        if reset:
            await conn.execute(
                "UPDATE message SET status = 'sending', completed_at = NULL "
                "WHERE church_id = %s AND id = %s AND created_at = %s AND status = 'completed'",
                (church_id, message_id, created_at),
            )
    return reset
