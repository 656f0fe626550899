"""Send estimates: POST /v1/messages/estimate, and ``data.estimate`` of a broadcast
(docs/protocol.md "Send estimates").

``finishes_at`` is when the last recipient will have been handed to the provider:
storage/domain/estimate.py models the sending limits as queues and quiet hours as
holds; storage/pg/send_backlog.py reads what is left and what is ahead. An
estimate is computed on each request, from the rows and counters as they are, so
it follows the broadcast as it runs.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from api.auth import principal
from api.broadcast_request import BroadcastRequest, check_request, request_text
from api.listing import services_of
from api.operation import Operation
from api.validation import decode_body
from storage.domain.estimate import (
    Limits,
    Wave,
    finishes_at,
    limited,
    queues,
    segments_total,
    start_waves,
)
from storage.domain.segments import count_segments
from storage.domain.statuses import MessageStatus
from storage.pg.churches import get_church
from storage.pg.database import Conn
from storage.pg.held_recipients import hold_plan
from storage.pg.messages import Message
from storage.pg.send_backlog import (
    Progress,
    audience_count,
    pace_of,
    progress_of,
    recent_pace,
    work_ahead,
)
from storage.process.services import Services
from storage.process.settings import DeliverySettings
from storage.responses import ok


class Estimate(msgspec.Struct, frozen=True):
    segments_total: int
    """Recipients to be sent times the segments of the text as written; an MMS counts one
    per recipient (carriers do not split an MMS)."""
    finishes_at: datetime
    """When the last recipient will have been handed to the provider (UTC)."""


class EstimateAnswer(msgspec.Struct, frozen=True):
    estimate: Estimate
    recipient_count: int
    """Members the broadcast would go to if accepted now (opted in, not erased)."""


def limits_of(delivery: DeliverySettings) -> Limits:
    return Limits(
        per_number=delivery.rate_per_number,
        per_account=delivery.rate_per_account,
        mms_per_account=delivery.mms_rate_per_account,
        burst_s=delivery.rate_burst_s,
    )


def _utc(at: datetime) -> datetime:
    return at.astimezone(UTC)


async def _finish(
    services: Services,
    conn: Conn,
    *,
    now: datetime,
    waves: list[Wave],
    media: bool,
    from_number: str,
    before: datetime,
    exclude: uuid.UUID | None = None,
    progress: Progress | None = None,
) -> datetime:
    if not any(w.count > 0 for w in waves):
        return finishes_at(now, waves, [])
    limits = limits_of(services.settings.delivery)
    ahead = await work_ahead(
        conn, services.redis, before=before, from_number=from_number, now=now, exclude=exclude
    )
    running = progress is not None and progress.handed > 0
    # The workers' observed pace matters only when no limit of ours applies.
    recent = None if limited(limits, media=media) else await recent_pace(conn, now)
    through = queues(limits, media=media, ahead=ahead, recent_rate=recent, running=running)
    pace = pace_of(progress, now) if progress is not None else None
    return finishes_at(now, waves, through, running_rate=pace)


async def estimate_of(
    services: Services, conn: Conn, church_id: uuid.UUID, message: Message
) -> Estimate:
    """``data.estimate`` of a broadcast of ``church_id`` (already looked up), as it stands
    now: a finished one says when it finished, a canceled one nothing left."""
    now = datetime.now(UTC)
    media = bool(message.media_ids)
    if message.status == MessageStatus.CANCELED:
        return Estimate(0, _utc(message.canceled_at or now))
    if message.archived or message.status == MessageStatus.COMPLETED:
        return Estimate(
            segments_total(message.recipient_count, message.segments, media=media),
            _utc(message.completed_at or message.created_at),
        )
    held = message.send_at is not None or message.recurring_id is not None
    progress: Progress | None = None
    if message.status in (MessageStatus.SENDING, MessageStatus.QUEUED):
        progress = await progress_of(conn, church_id, message.id, now)
    if progress is None or progress.materialized_at is None:
        # Not made into recipients yet: the audience counted at acceptance, from its
        # start (``send_at``, or now), held as quiet hours would hold it then.
        start = max(now, message.send_at or now)
        plan = await hold_plan(conn, church_id, start) if held else None
        waves = start_waves(message.recipient_count, start, plan)
        recipients = message.recipient_count
        progress = None
    else:
        waves = [Wave(now, progress.ready), *(Wave(at, n) for at, n in progress.held)]
        recipients = message.recipient_count - progress.skipped
    finish = await _finish(
        services,
        conn,
        now=now,
        waves=waves,
        media=media,
        from_number=message.from_number,
        before=message.created_at,
        exclude=message.id,
        progress=progress,
    )
    if progress is not None and not any(w.count for w in waves) and progress.last_handed_at:
        # Every recipient is handed over (receipts may still come): when the last went.
        finish = progress.last_handed_at
    return Estimate(segments_total(recipients, message.segments, media=media), _utc(finish))


async def post_estimate(request: Request) -> Response:
    """The body of POST /v1/messages, validated the same way; nothing is written."""
    who = await principal(request, "write")
    body = await decode_body(request, BroadcastRequest)
    now = datetime.now(UTC)
    check_request(body, now)
    services = services_of(request)
    async with services.pool.connection() as conn:
        church = await get_church(conn, who.church_id)
        assert church is not None
        text = await request_text(conn, who.church_id, body)
        media = bool(body.media_ids)
        target = body.target.to_target()
        count = await audience_count(conn, who.church_id, target, now, body.media_ids)
        start = body.send_at or now
        plan = await hold_plan(conn, who.church_id, start) if body.send_at is not None else None
        finish = await _finish(
            services,
            conn,
            now=now,
            waves=start_waves(count, start, plan),
            media=media,
            from_number=church.phone_number,
            before=now,
        )
    segments = count_segments(text).segments
    estimate = Estimate(segments_total(count, segments, media=media), _utc(finish))
    return ok(EstimateAnswer(estimate=estimate, recipient_count=count))


def estimate_operations() -> list[Operation]:
    return [
        Operation(
            "POST",
            "/v1/messages/estimate",
            post_estimate,
            "message.estimate",
            "Estimate a broadcast before sending it: recipients, segments, when it finishes",
            "messages",
            scope="write",
            body=BroadcastRequest,
            response=EstimateAnswer,
            errors=("not_found",),
            audit=False,
            description=(
                "Takes the body of `POST /v1/messages`, validated the same way, and "
                "writes nothing. `estimate.finishes_at` is when the last recipient "
                "would have been handed to the provider: from the sending limits that "
                "apply (per number, per account, and per account for MMS; with none "
                "configured, the workers' recent pace), the work queued ahead and, for "
                "a scheduled send, quiet hours."
            ),
            examples={
                "now": {"body": "Service at 10am", "target": {"group_ids": ["<group id>"]}},
                "scheduled": {
                    "body": "See you Sunday!",
                    "target": {"all": True},
                    "send_at": "2030-01-05T14:00:00Z",
                },
            },
        ),
    ]
