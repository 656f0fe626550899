"""What a send estimate reads (storage/domain/estimate.py): a broadcast's own
recipients still to go, the work queued ahead of it, and the recent sending pace.

Recipients have no status index on purpose (0001_core.sql), so nothing here scans
them by status across messages: a broadcast's own rows are read by their
primary-key prefix (one partition), and the work ahead comes from the broadcasts
still ``sending`` (the partial index ``message_active``) and those not yet
materialized (``message_pending``), each one's open recipients from the Redis
progress counters (delivery/progress.py) and only when Redis lost them from
its rows.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

import msgspec
from redis.exceptions import RedisError

from storage.domain.estimate import Ahead
from storage.domain.ids import created_at_of
from storage.pg.database import Conn
from storage.pg.messages import MAX_SCHEDULE_AHEAD, Target, count_audience
from storage.redis import key_names
from storage.redis.connection import Redis

RECENT = timedelta(seconds=60)
"""How far back a pace is measured."""
MAX_AHEAD = 500
"""Broadcasts ahead read at most (the oldest first): more is a backlog of hours anyway."""

_HANDED = "('sent', 'delivered', 'undelivered', 'failed')"
"""Statuses of a recipient the workers are done with (handed to the provider, or
given up on): the pace counts them."""


class Progress(msgspec.Struct, frozen=True):
    """One broadcast's recipients as a sender sees them."""

    ready: int
    """Still to be handed over, free to go now (``queued`` or ``sending``, not held)."""
    held: list[tuple[datetime, int]]
    """Held by quiet hours: (window opens, recipients), earliest first."""
    skipped: int
    handed: int
    handed_recently: int
    """Handed over within ``RECENT`` of ``now`` (by each one's last change)."""
    last_handed_at: datetime | None
    materialized_at: datetime | None


async def progress_of(
    conn: Conn, church_id: uuid.UUID, message_id: uuid.UUID, now: datetime
) -> Progress:
    """A broadcast's recipients by what is left to do (one scan of its own rows)."""
    created_at = created_at_of(message_id)
    cur = await conn.execute(
        "SELECT materialized_at FROM message WHERE church_id = %s AND id = %s AND created_at = %s",
        (church_id, message_id, created_at),
    )
    row = await cur.fetchone()
    materialized_at: datetime | None = row[0] if row else None
    # Grouped by the hold: rows without one are one group, each hold (a handful of
    # zones at most) another.
    cur = await conn.execute(
        "SELECT CASE WHEN not_before > %s THEN not_before END AS hold, "
        "count(*) FILTER (WHERE status IN ('queued', 'sending')), "
        "count(*) FILTER (WHERE status = 'skipped'), "
        f"count(*) FILTER (WHERE status IN {_HANDED}), "
        f"count(*) FILTER (WHERE status IN {_HANDED} AND updated_at > %s), "
        f"max(updated_at) FILTER (WHERE status IN {_HANDED}) "
        "FROM message_recipient WHERE church_id = %s AND message_id = %s AND created_at = %s "
        "GROUP BY 1",
        (now, now - RECENT, church_id, message_id, created_at),
    )
    ready = skipped = handed = recent = 0
    held: list[tuple[datetime, int]] = []
    last: datetime | None = None
    for hold, open_, skip, done, fresh, latest in await cur.fetchall():
        if hold is not None and open_:
            held.append((hold, int(open_)))
        else:
            ready += int(open_)
        skipped += int(skip)
        handed += int(done)
        recent += int(fresh)
        if latest is not None and (last is None or latest > last):
            last = latest
    held.sort()
    return Progress(
        ready=ready,
        held=held,
        skipped=skipped,
        handed=handed,
        handed_recently=recent,
        last_handed_at=last,
        materialized_at=materialized_at,
    )


def pace_of(progress: Progress, now: datetime, *, at_least_s: float = 10.0) -> float | None:
    """A running broadcast's own recent pace (texts/s), once it has been sending
    ``at_least_s`` and handed some over; None before (too early to tell)."""
    if progress.materialized_at is None:
        return None
    running_s = min(RECENT.total_seconds(), (now - progress.materialized_at).total_seconds())
    if running_s < at_least_s or progress.handed_recently < 10:
        return None
    return progress.handed_recently / running_s


class _Open(msgspec.Struct, frozen=True):
    church_id: uuid.UUID
    id: uuid.UUID
    same_number: bool
    media: bool
    materialized: bool
    recipient_count: int
    holdable: bool
    """Scheduled or recurring: quiet hours may hold some of its recipients."""


async def work_ahead(
    conn: Conn,
    redis: Redis,
    *,
    before: datetime,
    from_number: str,
    now: datetime,
    exclude: uuid.UUID | None = None,
) -> Ahead:
    """Recipients not yet handed over of every broadcast (and reply) accepted before
    ``before`` and not finished (but ``exclude``, the one estimated): on its number,
    on the account, and the MMS among them. Scheduled ones whose time has not come
    are not ahead."""
    oldest = now - MAX_SCHEDULE_AHEAD - timedelta(days=1)
    cols = (
        "church_id, id, from_number = %s, coalesce(cardinality(media_ids), 0) > 0, "
        "materialized_at IS NOT NULL, recipient_count, "
        "send_at IS NOT NULL OR recurring_id IS NOT NULL"
    )
    cur = await conn.execute(
        f"(SELECT {cols} FROM message WHERE status = 'sending' "
        "  AND created_at < %s AND created_at >= %s ORDER BY created_at LIMIT %s) "
        f"UNION ALL (SELECT {cols} FROM message WHERE materialized_at IS NULL "
        "  AND status = 'queued' AND created_at < %s AND created_at >= %s "
        "  ORDER BY created_at LIMIT %s)",
        (
            from_number,
            before,
            oldest,
            MAX_AHEAD,
            from_number,
            before,
            oldest,
            MAX_AHEAD,
        ),
    )
    found = [_Open(*r) for r in await cur.fetchall() if r[1] != exclude]
    number = account = mms = 0
    for item in found:
        left = await _left(conn, redis, item)
        account += left
        if item.same_number:
            number += left
        if item.media:
            mms += left
    return Ahead(number=number, account=account, mms=mms)


async def _left(conn: Conn, redis: Redis, item: _Open) -> int:
    """Open recipients of a broadcast ahead, held ones left out (they go when their
    window opens, not ahead): all of it before materialization; then the progress
    counters, or its rows when Redis lost those or some may be held (the counters
    count held recipients as queued)."""
    if not item.materialized:
        return item.recipient_count
    if item.holdable:
        return await _open_rows(conn, item)
    raw: Any = None
    try:
        raw = await redis.hmget(
            key_names.message_counts(item.church_id, item.id), ["queued", "sending"]
        )
    except (RedisError, OSError):
        # An estimate is read with every broadcast: Redis down costs a count, not the read.
        raw = None
    if raw and any(v is not None for v in raw):
        return max(0, sum(int(v) for v in raw if v is not None))
    return await _open_rows(conn, item)


async def _open_rows(conn: Conn, item: _Open) -> int:
    cur = await conn.execute(
        "SELECT count(*) FROM message_recipient WHERE church_id = %s AND message_id = %s "
        "AND created_at = %s AND status IN ('queued', 'sending') "
        "AND (not_before IS NULL OR not_before <= now())",
        (item.church_id, item.id, created_at_of(item.id)),
    )
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def recent_pace(conn: Conn, now: datetime) -> float | None:
    """Texts per second the workers handed to the provider over the last minute,
    across the account; None when nothing was sent in it.

    Read from the broadcasts still sending or completed within the minute (each
    one's own rows); a text's last change stands for its hand-over, which a
    delivery receipt moves by its latency (seconds)."""
    since = now - RECENT
    oldest = now - MAX_SCHEDULE_AHEAD - timedelta(days=1)
    cur = await conn.execute(
        "WITH active AS ("
        "  (SELECT church_id, id, created_at, materialized_at FROM message "
        "   WHERE status = 'sending' AND created_at >= %s LIMIT %s) "
        "  UNION ALL (SELECT church_id, id, created_at, materialized_at FROM message "
        "   WHERE status = 'completed' AND completed_at > %s AND created_at >= %s LIMIT %s)) "
        "SELECT (SELECT count(*) FROM active a JOIN message_recipient r "
        "  ON r.church_id = a.church_id AND r.message_id = a.id AND r.created_at = a.created_at "
        f"  WHERE r.status IN {_HANDED} AND r.updated_at > %s), "
        "(SELECT min(materialized_at) FROM active)",
        (oldest, MAX_AHEAD, since, now - timedelta(days=2), MAX_AHEAD, since),
    )
    row = await cur.fetchone()
    if row is None or not row[0]:
        return None
    started: datetime | None = row[1]
    window = RECENT.total_seconds()
    if started is not None:
        window = min(window, max(1.0, (now - started).total_seconds()))
    return int(row[0]) / window


async def audience_count(
    conn: Conn,
    church_id: uuid.UUID,
    target: Target,
    at: datetime,
    media_ids: list[uuid.UUID] | None = None,
) -> int:
    """How many members a broadcast to ``target`` accepted at ``at`` would have, counted
    as acceptance counts them (storage/pg/messages.py ``accept_message``), writing
    nothing; NotFound, in acceptance's order, when a group, member or branch it names,
    or then a file of ``media_ids``, is not the church's."""
    async with conn.transaction():
        return await count_audience(conn, church_id, target, at, media_ids)
