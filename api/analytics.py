"""Analytics: a church's summary over a time range, and one broadcast's outcome with
its delivery over time (the dashboard's chart).

Both are served cache-aside (topic ``analytics``): the summary for
``SUMMARY_TTL_S`` (accepting or canceling a broadcast invalidates it at once),
a broadcast's analytics for ``IN_FLIGHT_TTL_S`` while it is sending, longer once
it is completed, and for a day once its reply window has closed too.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

from starlette.requests import Request
from starlette.responses import Response

from api.auth import principal
from api.errors import invalid_query
from api.listing import read, services_of
from api.operation import Operation, QueryParam
from api.validation import path_id
from storage.domain.envelope import FieldError
from storage.domain.statuses import MessageStatus
from storage.pg.analytics import (
    REPLY_WINDOW,
    MessageAnalytics,
    Summary,
    church_summary,
    message_analytics,
    started_at,
)
from storage.pg.messages import Message, get_message
from storage.responses import ok

TOPIC = "analytics"
SUMMARY_TTL_S = 30.0
PAST_SUMMARY_TTL_S = 300.0
"""A range that ended over ``REPLY_WINDOW`` ago changes only with a rare late receipt."""
IN_FLIGHT_TTL_S = 5.0
COMPLETED_TTL_S = 60.0
SETTLED_TTL_S = 86_400.0
DEFAULT_RANGE = timedelta(days=30)
MAX_RANGE = timedelta(days=400)


def query_time(request: Request, name: str) -> datetime | None:
    raw = request.query_params.get(name)
    if raw is None:
        return None
    try:
        value = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        value = None
    if value is None or value.tzinfo is None:
        raise invalid_query(
            FieldError(name, "must be an ISO 8601 time with a zone, e.g. 2026-11-01T00:00:00Z")
        )
    return value


def _range(request: Request, now: datetime) -> tuple[datetime, datetime]:
    until = query_time(request, "until")
    if until is None:
        # The open end is rounded up to the minute, so repeated calls share a cache entry.
        until = datetime.fromtimestamp(math.ceil(now.timestamp() / 60) * 60, UTC)
    since = query_time(request, "since") or until - DEFAULT_RANGE
    if since >= until:
        raise invalid_query(FieldError("since", "must be before until"))
    if until - since > MAX_RANGE:
        raise invalid_query(FieldError("since", f"the range is at most {MAX_RANGE.days} days"))
    return since.astimezone(UTC), until.astimezone(UTC)


async def show_summary(request: Request) -> Response:
    """``?since=`` (inclusive, default 30 days before ``until``), ``?until=`` (exclusive,
    default now)."""
    who = await principal(request, "read")
    now = datetime.now(UTC)
    since, until = _range(request, now)
    services = services_of(request)

    async def compute() -> Summary:
        return await read(request, church_summary, who.church_id, since, until)

    ttl = PAST_SUMMARY_TTL_S if until < now - REPLY_WINDOW else SUMMARY_TTL_S
    summary = await services.cache.get_or_compute(
        who.church_id,
        TOPIC,
        f"summary:{since.isoformat()}:{until.isoformat()}",
        Summary,
        compute,
        ttl_s=ttl,
    )
    return ok(summary)


def message_ttl(message: Message, now: datetime) -> float:
    if message.status != MessageStatus.COMPLETED:
        return IN_FLIGHT_TTL_S
    if now > started_at(message) + REPLY_WINDOW:
        return SETTLED_TTL_S
    return COMPLETED_TTL_S


async def show_message_analytics(request: Request) -> Response:
    who = await principal(request, "read")
    message_id = path_id(request)
    services = services_of(request)
    message = await read(request, get_message, who.church_id, message_id)

    async def compute() -> MessageAnalytics:
        return await read(request, message_analytics, who.church_id, message)

    # The status is in the name: a broadcast that completes is a new entry at once.
    found = await services.cache.get_or_compute(
        who.church_id,
        TOPIC,
        f"message:{message.id}:{message.status}",
        MessageAnalytics,
        compute,
        ttl_s=message_ttl(message, datetime.now(UTC)),
    )
    return ok(found)


def analytics_operations() -> list[Operation]:
    return [
        Operation(
            "GET",
            "/v1/analytics/summary",
            show_summary,
            "analytics.summary",
            "The church's sending, delivery, members and inbox over a time range",
            "analytics",
            response=Summary,
            query=(
                QueryParam("since", datetime, "from (inclusive); default 30 days before until"),
                QueryParam("until", datetime, "to (exclusive); default now"),
            ),
            description=(
                "Messages and recipients are those accepted in the range; members and "
                "conversations are counted as they are now. Cached for up to 30 s."
            ),
        ),
        Operation(
            "GET",
            "/v1/messages/{id}/analytics",
            show_message_analytics,
            "message.analytics",
            "One broadcast's outcome: counts, delivery rate and times, failures, replies, "
            "delivery over time",
            "messages",
            response=MessageAnalytics,
            description=(
                "Delivery rate = delivered / (sent + delivered + undelivered + failed). "
                "Replies are inbound texts from its recipients within 48 hours of its start. "
                "`timeline` counts recipients per bucket of `bucket_s` seconds (at most 120 "
                "buckets, from its start to its last change) by each one's last change and "
                "status now: `sent` (sent, delivered, undelivered), `delivered`, `failed` "
                "(failed, undelivered); per bucket, not cumulative."
            ),
        ),
    ]
