"""Analytics: a church's sending over a time range, and one broadcast's outcome.

Every query is scoped by church and bounded in ``created_at`` (a range, or the
one instant a message id names), so Postgres reads only the partitions that can
hold the rows. The API serves both through the cache (topic ``analytics``).

Definitions:

- a message is *sent* once it has started (``queued``, ``sending``,
  ``completed``); scheduled and canceled ones are not, and ranges select
  messages by their acceptance time. ``messages_sent`` counts broadcasts; the
  recipient counts, delivery rate and segments of a church's range count every
  text, staff replies and automatic answers included (each is a message of one
  recipient), since every one of them is delivered and billed alike;
- *delivery rate* is delivered / (sent + delivered + undelivered + failed): of
  the texts that were attempted and have a result, how many arrived (null when
  none has one yet). Skipped and still-queued recipients are left out;
- *segments sent* are the segments of every recipient handed to the carrier
  (sent, delivered or undelivered), the billed ones;
- *time to delivered* runs from the moment the message started (its
  ``send_at`` when scheduled, else its acceptance) to the delivery receipt;
- a *reply* is an inbound text from one of the message's recipients within
  ``REPLY_WINDOW`` after it started, whatever else they were sent meanwhile;
- the *timeline* counts, per bucket of ``bucket_s`` seconds from the message's start,
  the recipients whose last change fell in it, by the status they have now: *sent*
  every recipient handed to the carrier (sent, delivered, undelivered), *delivered*
  and *failed* (failed, undelivered) the final ones among them. A recipient has one
  time only (``updated_at``, its last change), so a delivered one counts as sent
  when its receipt came, seconds after it went. Per bucket, not cumulative: over a
  finished broadcast the buckets add up to its counts.
"""

from __future__ import annotations

import math
import uuid
from datetime import datetime, timedelta

import msgspec

from storage.domain.events import Counts
from storage.domain.ids import created_at_of
from storage.domain.statuses import ALL_STATUSES
from storage.pg.database import Conn
from storage.pg.freshness import stale_ok
from storage.pg.messages import Message

REPLY_WINDOW = timedelta(hours=48)
TOP_ERRORS = 10
_ATTEMPTED = ("sent", "delivered", "undelivered", "failed")
_BILLED = ("sent", "delivered", "undelivered")


class ErrorCount(msgspec.Struct, frozen=True):
    error_code: str
    count: int


class Summary(msgspec.Struct, frozen=True):
    since: datetime
    until: datetime
    messages_sent: int
    recipients: Counts
    """Texts accepted in the range, by status: broadcast recipients, staff replies and
    automatic answers."""
    delivery_rate: float | None
    failed_by_error_code: list[ErrorCount]
    """Failed and undelivered recipients by provider error code, the 10 most frequent."""
    segments_sent: int
    members_total: int
    """Now, not as of the range: members not erased."""
    members_opted_out: int
    conversations_open: int
    conversations_closed: int
    inbound_messages: int
    """Texts members sent in the range."""


class Percentiles(msgspec.Struct, frozen=True):
    p50: float
    p90: float


class TimelinePoint(msgspec.Struct, frozen=True):
    at: datetime
    """The bucket's start."""
    sent: int
    delivered: int
    failed: int


class Timeline(msgspec.Struct, frozen=True):
    bucket_s: int = 1
    points: list[TimelinePoint] = []
    """From the message's start to its last change, every bucket (zeros included)."""


MAX_POINTS = 120
BUCKETS_S = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600)
"""Bucket widths a timeline picks from: the narrowest giving at most ``MAX_POINTS``."""


def bucket_for(span_s: float) -> int:
    """The narrowest bucket (seconds) that covers ``span_s`` in at most ``MAX_POINTS``."""
    for width in BUCKETS_S:
        if span_s <= width * MAX_POINTS:
            return width
    return 86_400 * max(1, math.ceil(span_s / (86_400 * MAX_POINTS)))


class MessageAnalytics(msgspec.Struct, frozen=True):
    message_id: uuid.UUID
    status: str
    recipient_count: int
    counts: Counts
    delivery_rate: float | None
    seconds_to_delivered: Percentiles | None
    """From the message's start to each delivery receipt; null before the first."""
    failed_by_error_code: list[ErrorCount]
    segments_sent: int
    replies: int
    """Inbound texts from its recipients within 48 hours of its start."""
    replying_members: int
    reply_window_ends_at: datetime
    timeline: Timeline = Timeline()
    """Delivery over time (see the module's definitions)."""


def _rate(counts: Counts) -> float | None:
    attempted = sum(getattr(counts, s) for s in _ATTEMPTED)
    return round(counts.delivered / attempted, 4) if attempted else None


@stale_ok
async def church_summary(
    conn: Conn, church_id: uuid.UUID, since: datetime, until: datetime
) -> Summary:
    """``since`` inclusive, ``until`` exclusive."""
    cur = await conn.execute(
        "SELECT count(*) FROM message WHERE church_id = %s AND created_at >= %s "
        "AND created_at < %s AND status IN ('queued', 'sending', 'completed') "
        "AND kind = 'broadcast'",
        (church_id, since, until),
    )
    row = await cur.fetchone()
    messages_sent = int(row[0]) if row else 0
    window = "church_id = %s AND created_at >= %s AND created_at < %s"
    cur = await conn.execute(
        f"SELECT status, count(*), coalesce(sum(segments), 0) FROM message_recipient "
        f"WHERE {window} GROUP BY status",
        (church_id, since, until),
    )
    by_status: dict[str, int] = {}
    segments = 0
    for status, n, segs in await cur.fetchall():
        by_status[status] = int(n)
        if status in _BILLED:
            segments += int(segs)
    counts = Counts(**{s.value: by_status.get(s.value, 0) for s in ALL_STATUSES})
    failures = await _failures(conn, window, (church_id, since, until))
    cur = await conn.execute(
        "SELECT count(*), count(*) FILTER (WHERE NOT opted_in) FROM member "
        "WHERE church_id = %s AND deleted_at IS NULL",
        (church_id,),
    )
    members = await cur.fetchone()
    cur = await conn.execute(
        "SELECT count(*) FILTER (WHERE status = 'open'), count(*) FILTER (WHERE status = 'closed') "
        "FROM conversation WHERE church_id = %s",
        (church_id,),
    )
    conversations = await cur.fetchone()
    cur = await conn.execute(
        f"SELECT count(*) FROM conversation_message WHERE {window} AND direction = 'inbound'",
        (church_id, since, until),
    )
    inbound = await cur.fetchone()
    return Summary(
        since=since,
        until=until,
        messages_sent=messages_sent,
        recipients=counts,
        delivery_rate=_rate(counts),
        failed_by_error_code=failures,
        segments_sent=segments,
        members_total=int(members[0]) if members else 0,
        members_opted_out=int(members[1]) if members else 0,
        conversations_open=int(conversations[0]) if conversations else 0,
        conversations_closed=int(conversations[1]) if conversations else 0,
        inbound_messages=int(inbound[0]) if inbound else 0,
    )


async def _failures(conn: Conn, where: str, params: tuple[object, ...]) -> list[ErrorCount]:
    cur = await conn.execute(
        "SELECT coalesce(error_code, 'unknown'), count(*) FROM message_recipient "
        f"WHERE {where} AND status IN ('failed', 'undelivered') "
        "GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT %s",
        (*params, TOP_ERRORS),
    )
    return [ErrorCount(code, int(n)) for code, n in await cur.fetchall()]


def started_at(message: Message) -> datetime:
    return message.send_at or message.created_at


@stale_ok
async def message_analytics(conn: Conn, church_id: uuid.UUID, message: Message) -> MessageAnalytics:
    """One message's outcome; ``message`` is the caller's church's (already looked up)."""
    created_at = created_at_of(message.id)
    start = started_at(message)
    one = "church_id = %s AND message_id = %s AND created_at = %s"
    keys = (church_id, message.id, created_at)
    cur = await conn.execute(
        "SELECT status, count(*), coalesce(sum(segments), 0), min(updated_at), max(updated_at) "
        f"FROM message_recipient WHERE {one} GROUP BY status",
        keys,
    )
    by_status: dict[str, int] = {}
    segments = 0
    span: tuple[datetime, datetime] | None = None
    for status, n, segs, earliest, latest in await cur.fetchall():
        by_status[status] = int(n)
        if status in _BILLED:
            segments += int(segs)
        if status in _ATTEMPTED:
            span = (min(span[0], earliest), max(span[1], latest)) if span else (earliest, latest)
    timeline = await _timeline(conn, keys, min(start, span[0]), span[1]) if span else Timeline()
    if not by_status and message.status in ("scheduled", "queued"):
        by_status = {"queued": message.recipient_count}
    counts = Counts(**{s.value: by_status.get(s.value, 0) for s in ALL_STATUSES})
    cur = await conn.execute(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM updated_at - %s)), "
        "percentile_cont(0.9) WITHIN GROUP (ORDER BY extract(epoch FROM updated_at - %s)) "
        f"FROM message_recipient WHERE {one} AND status = 'delivered'",
        (start, start, *keys),
    )
    row = await cur.fetchone()
    timing = (
        Percentiles(round(max(0.0, float(row[0])), 3), round(max(0.0, float(row[1])), 3))
        if row and row[0] is not None
        else None
    )
    failures = await _failures(conn, one, keys)
    window_end = start + REPLY_WINDOW
    cur = await conn.execute(
        "SELECT count(*), count(DISTINCT c.member_id) FROM conversation_message cm "
        "JOIN conversation c ON c.church_id = cm.church_id AND c.id = cm.conversation_id "
        "WHERE cm.church_id = %s AND cm.direction = 'inbound' "
        "AND cm.created_at >= %s AND cm.created_at < %s AND c.member_id IN ("
        f"  SELECT member_id FROM message_recipient WHERE {one} AND status <> 'skipped')",
        (church_id, start, window_end, *keys),
    )
    replies = await cur.fetchone()
    return MessageAnalytics(
        message_id=message.id,
        status=message.status,
        recipient_count=message.recipient_count,
        counts=counts,
        delivery_rate=_rate(counts),
        seconds_to_delivered=timing,
        failed_by_error_code=failures,
        segments_sent=segments,
        replies=int(replies[0]) if replies else 0,
        replying_members=int(replies[1]) if replies else 0,
        reply_window_ends_at=window_end,
        timeline=timeline,
    )


async def _timeline(
    conn: Conn, keys: tuple[uuid.UUID, uuid.UUID, datetime], first: datetime, last: datetime
) -> Timeline:
    """The message's recipients per bucket from ``first`` (its start, or an earlier
    change) to ``last`` (its latest change); one more scan of its own rows."""
    # Whole seconds: the chart's labels read better, and the buckets stay aligned.
    first = first.replace(microsecond=0)
    width = bucket_for((last - first).total_seconds())
    cur = await conn.execute(
        "SELECT floor(extract(epoch FROM updated_at - %s) / %s)::int AS b, "
        "count(*) FILTER (WHERE status IN ('sent', 'delivered', 'undelivered')), "
        "count(*) FILTER (WHERE status = 'delivered'), "
        "count(*) FILTER (WHERE status IN ('failed', 'undelivered')) "
        "FROM message_recipient WHERE church_id = %s AND message_id = %s AND created_at = %s "
        "AND status IN ('sent', 'delivered', 'undelivered', 'failed') GROUP BY 1",
        (first, width, *keys),
    )
    found = {int(b): (int(s), int(d), int(f)) for b, s, d, f in await cur.fetchall()}
    # The last bucket as Postgres placed the rows, not as Python rounds the span.
    n = max([int((last - first).total_seconds() // width), *found]) + 1
    points = []
    for i in range(n):
        sent, delivered, failed = found.get(i, (0, 0, 0))
        points.append(
            TimelinePoint(
                at=first + timedelta(seconds=i * width),
                sent=sent,
                delivered=delivered,
                failed=failed,
            )
        )
    return Timeline(bucket_s=width, points=points)
