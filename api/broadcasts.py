"""Broadcast messages: accept (202) now or at ``send_at``, cancel, read with counts,
list, recipients. Recurring messages and analytics add their operations here."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime
from typing import Literal

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from api.analytics import analytics_operations, query_time
from api.auth import principal
from api.broadcast_request import BroadcastRequest, check_request, request_text
from api.errors import invalid_query
from api.estimates import Estimate, estimate_of
from api.listing import paged, read, services_of
from api.operation import Operation, QueryParam, audit_target
from api.recurring import recurring_operations
from api.validation import decode_body, page_params, path_id
from storage.domain import merge_fields
from storage.domain.envelope import FieldError
from storage.domain.errors import NotFound
from storage.domain.events import Counts
from storage.domain.statuses import MessageStatus, RecipientStatus
from storage.pg.churches import get_church
from storage.pg.messages import (
    Message,
    MessageFilter,
    Target,
    accept_message,
    announce_started,
    cancel_message,
    get_message,
    list_messages,
    message_counts,
)
from storage.pg.recipients import Recipient, list_recipients
from storage.process import tracing
from storage.responses import ok

log = logging.getLogger("koinonia.api.broadcasts")

ANALYTICS = "analytics"


class BroadcastAccepted(msgspec.Struct, frozen=True):
    id: uuid.UUID
    status: str
    """``queued``, or ``scheduled`` when ``send_at`` was given."""
    recipient_count: int
    segments: int
    """Of the body as written: for a body with merge fields, the un-rendered text's."""
    encoding: str
    personalized: bool
    """The body has merge fields, rendered for each recipient when sent."""
    send_at: datetime | None
    template_id: uuid.UUID | None
    created_at: datetime
    media_ids: list[uuid.UUID]
    """The message's files (``GET /v1/media/{id}``); empty for an SMS."""
    estimate: Estimate | None
    """When the last recipient will have been handed to the provider (docs/protocol.md
    "Send estimates"); null only when it could not be worked out just now."""


class BroadcastDetail(msgspec.Struct, frozen=True):
    id: uuid.UUID
    body: str
    target: Target
    status: str
    recipient_count: int
    segments: int
    """Of the body as written: for a body with merge fields, the un-rendered text's."""
    encoding: str
    personalized: bool
    from_number: str
    counts: Counts
    send_at: datetime | None
    template_id: uuid.UUID | None
    recurring_id: uuid.UUID | None
    created_at: datetime
    completed_at: datetime | None
    canceled_at: datetime | None
    archived: bool
    """Read from the archive: its month has left the database (``GET /v1/archive``)."""
    media_ids: list[uuid.UUID]
    """The message's files (``GET /v1/media/{id}``); empty for an SMS."""
    estimate: Estimate | None
    """As on the ``202``, worked out again from the recipients left."""


async def _estimate(request: Request, church_id: uuid.UUID, message: Message) -> Estimate | None:
    """The message's estimate; None when the stores could not give it (the message
    itself was read, or committed, and is answered all the same)."""
    services = services_of(request)
    try:
        async with services.pool.connection() as conn:
            return await estimate_of(services, conn, church_id, message)
    except Exception:
        log.warning("estimate not worked out", exc_info=True)
        return None


async def post_message(request: Request) -> Response:
    who = await principal(request, "write")
    body = await decode_body(request, BroadcastRequest)
    check_request(body, datetime.now(UTC))
    services = services_of(request)
    async with services.pool.connection() as conn:
        church = await get_church(conn, who.church_id)
        assert church is not None
        text = await request_text(conn, who.church_id, body)
        # The request's trace context (empty with tracing off): stored on the message for
        # its receipts, and carried by the materialize job to the worker.
        traceparent = tracing.current_traceparent()
        message = await accept_message(
            conn,
            who.church_id,
            body=text,
            target=body.target.to_target(),
            from_number=church.phone_number,
            created_by=who.user_id,
            send_at=body.send_at,
            template_id=body.template_id,
            traceparent=traceparent,
            media_ids=body.media_ids,
        )
    audit_target(request, message.id)
    # Committed: from here on nothing can lose the message. If Redis is down the
    # scheduler's sweeps materialize it later; the 202 stands either way.
    try:
        if message.status == MessageStatus.QUEUED:
            await announce_started(services.redis, who.church_id, message, traceparent)
        await services.cache.invalidate(who.church_id, ANALYTICS)
    except Exception:
        log.exception("enqueue after accept failed; the reconciler will pick it up")
    return ok(
        BroadcastAccepted(
            id=message.id,
            status=message.status,
            recipient_count=message.recipient_count,
            segments=message.segments,
            encoding=message.encoding,
            personalized=merge_fields.has_fields(message.body),
            send_at=message.send_at,
            template_id=message.template_id,
            created_at=message.created_at,
            media_ids=message.media_ids,
            estimate=await _estimate(request, who.church_id, message),
        ),
        status=202,
    )


def _detail(message: Message, counts: Counts, estimate: Estimate | None) -> BroadcastDetail:
    return BroadcastDetail(
        id=message.id,
        body=message.body,
        target=message.target,
        status=message.status,
        recipient_count=message.recipient_count,
        segments=message.segments,
        encoding=message.encoding,
        personalized=merge_fields.has_fields(message.body),
        from_number=message.from_number,
        counts=counts,
        send_at=message.send_at,
        template_id=message.template_id,
        recurring_id=message.recurring_id,
        created_at=message.created_at,
        completed_at=message.completed_at,
        canceled_at=message.canceled_at,
        archived=message.archived,
        media_ids=message.media_ids,
        estimate=estimate,
    )


async def show_message(request: Request) -> Response:
    """Live first; a message its month's partitions no longer hold, from the archive."""
    who = await principal(request, "read")
    message_id = path_id(request)
    archive = services_of(request).archive
    try:
        message = await read(request, get_message, who.church_id, message_id)
    except NotFound:
        message = await read(request, archive.get_message, who.church_id, message_id)
        counts = await read(request, archive.message_counts, who.church_id, message_id)
        return ok(_detail(message, counts, await _estimate(request, who.church_id, message)))
    counts = await read(request, message_counts, who.church_id, message_id)
    if sum(getattr(counts, s.value) for s in RecipientStatus) == 0 and message.status in (
        MessageStatus.SCHEDULED,
        MessageStatus.QUEUED,
    ):
        # Not materialized yet: the whole audience is still waiting.
        counts = Counts(queued=message.recipient_count)
    return ok(_detail(message, counts, await _estimate(request, who.church_id, message)))


async def post_cancel(request: Request) -> Response:
    """Only a ``scheduled`` message whose time has not come can be canceled."""
    who = await principal(request, "write")
    services = services_of(request)
    async with services.pool.connection() as conn:
        message = await cancel_message(conn, who.church_id, path_id(request))
    try:
        await services.cache.invalidate(who.church_id, ANALYTICS)
    except Exception:
        log.exception("analytics invalidation failed")
    return ok(_detail(message, Counts(), await _estimate(request, who.church_id, message)))


async def index_recipients(request: Request) -> Response:
    who = await principal(request, "read")
    message_id = path_id(request)
    limit, cursor = page_params(request)
    status = request.query_params.get("status")
    if status is not None and status not in {s.value for s in RecipientStatus}:
        raise invalid_query(FieldError("status", "must be a recipient status"))
    try:
        await read(request, get_message, who.church_id, message_id)
    except NotFound:
        archive = services_of(request).archive
        await read(request, archive.get_message, who.church_id, message_id)
        page = await read(
            request,
            archive.list_recipients,
            who.church_id,
            message_id,
            limit=limit,
            cursor=cursor,
            status=status,
        )
        return ok(page.items, next_cursor=page.next_cursor)
    page = await read(
        request,
        list_recipients,
        who.church_id,
        message_id,
        limit=limit,
        cursor=cursor,
        status=status,
    )
    return ok(page.items, next_cursor=page.next_cursor)


async def index_messages(request: Request) -> Response:
    """``?status=``, ``?since=`` (inclusive), ``?until=`` (exclusive) filter the list;
    ``?include_archived=true`` continues it into archived months."""
    status = request.query_params.get("status")
    if status is not None and status not in {s.value for s in MessageStatus}:
        raise invalid_query(FieldError("status", "must be a message status"))
    archived = request.query_params.get("include_archived", "false")
    if archived not in ("true", "false"):
        raise invalid_query(FieldError("include_archived", "must be true or false"))
    where = MessageFilter(
        status=status, since=query_time(request, "since"), until=query_time(request, "until")
    )
    if archived == "true":
        return await paged(request, services_of(request).archive.list_messages, where=where)
    return await paged(request, list_messages, where=where)


MessageStatusName = Literal["scheduled", "queued", "sending", "completed", "canceled"]
RecipientStatusName = Literal[
    "queued", "sending", "sent", "delivered", "failed", "undelivered", "skipped"
]


def message_operations() -> list[Operation]:
    return [
        Operation(
            "POST",
            "/v1/messages",
            post_message,
            "message.create",
            "Send a broadcast now or at send_at (accepted at once, sent asynchronously)",
            "messages",
            scope="write",
            body=BroadcastRequest,
            response=BroadcastAccepted,
            status=202,
            errors=("not_found",),
            description=(
                "`media_ids` (at most 10, from `POST /v1/media`) make it an MMS; `body` may "
                "then be empty. An unknown id, or another church's, is `404` and nothing is "
                "accepted. "
                "The audience is the target's members when the message is accepted; "
                "members who opt out before it is sent are skipped. Merge fields "
                "(`{{first_name}}`, `{{last_name}}`, `{{full_name}}`, `{{church_name}}`) "
                "are rendered per recipient at send time; `segments` counts the text as "
                "written."
            ),
            examples={
                "now": {"body": "Service at 10am", "target": {"group_ids": ["<group id>"]}},
                "scheduled": {
                    "body": "Hi {{first_name}}, see you Sunday!",
                    "target": {"all": True},
                    "send_at": "2030-01-05T14:00:00Z",
                },
                "template": {"template_id": "<template id>", "target": {"all": True}},
                "mms": {
                    "body": "This week's flyer",
                    "media_ids": ["<media id>"],
                    "target": {"all": True},
                },
            },
        ),
        Operation(
            "GET",
            "/v1/messages",
            index_messages,
            "message.list",
            "List broadcasts, newest first",
            "messages",
            response=list[Message],
            listing=True,
            query=(
                QueryParam("status", MessageStatusName, "only messages in this status"),
                QueryParam("since", datetime, "accepted at or after (inclusive)"),
                QueryParam("until", datetime, "accepted before (exclusive)"),
                QueryParam(
                    "include_archived",
                    bool,
                    "also list archived months, after the live ones (default false)",
                ),
            ),
        ),
        Operation(
            "GET",
            "/v1/messages/{id}",
            show_message,
            "message.show",
            "One broadcast with its recipient counts",
            "messages",
            response=BroadcastDetail,
        ),
        Operation(
            "POST",
            "/v1/messages/{id}/cancel",
            post_cancel,
            "message.cancel",
            "Cancel a scheduled broadcast that has not started",
            "messages",
            scope="write",
            response=BroadcastDetail,
            errors=("conflict",),
        ),
        Operation(
            "GET",
            "/v1/messages/{id}/recipients",
            index_recipients,
            "message.recipients",
            "A broadcast's recipients, in id order",
            "messages",
            response=list[Recipient],
            listing=True,
            query=(QueryParam("status", RecipientStatusName, "only recipients in this status"),),
        ),
    ]


def broadcast_operations() -> list[Operation]:
    return [*message_operations(), *recurring_operations(), *analytics_operations()]
