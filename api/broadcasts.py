"""Broadcast messages: accept (202), read with counts, list, recipients."""

from __future__ import annotations

import logging
from datetime import datetime

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from api.auth import principal
from api.errors import invalid_body, invalid_query
from api.listing import paged, services_of
from api.operation import Operation
from api.schemas import MessageAccepted, MessageDetail, MessageRequest
from api.validation import decode_body, page_params, path_id
from storage.churches import get_church
from storage.envelope import FieldError, ok
from storage.events import Counts, MessageCreated, new_event
from storage.messages import (
    MessageFilter,
    accept_message,
    get_message,
    list_messages,
    message_counts,
)
from storage.queue import MaterializeJob, enqueue_materialize
from storage.recipients import list_recipients
from storage.statuses import MessageStatus, RecipientStatus

log = logging.getLogger("koinonia.api.broadcasts")


async def post_message(request: Request) -> Response:
    who = await principal(request, "write")
    body = await decode_body(request, MessageRequest)
    problem = body.target.problem()
    if problem:
        raise invalid_body(FieldError("target", problem))
    services = services_of(request)
    async with services.pool.connection() as conn:
        church = await get_church(conn, who.church_id)
        assert church is not None
        message = await accept_message(
            conn,
            who.church_id,
            body=body.body,
            target=body.target.to_target(),
            from_number=church.phone_number,
            created_by=who.user_id,
        )
    # Committed: from here on nothing can lose the message. If Redis is down the
    # scheduler's reconciler materializes it later; the 202 stands either way.
    try:
        await enqueue_materialize(
            services.redis,
            MaterializeJob(
                church_id=who.church_id, message_id=message.id, created_at=message.created_at
            ),
        )
        await services.publisher.publish(
            who.church_id,
            "dashboard",
            new_event(
                "message.created",
                MessageCreated(
                    message_id=message.id,
                    recipient_count=message.recipient_count,
                    status=message.status,
                ),
            ),
        )
    except Exception:
        log.exception("enqueue after accept failed; the reconciler will pick it up")
    return ok(
        MessageAccepted(
            id=message.id,
            status=message.status,
            recipient_count=message.recipient_count,
            segments=message.segments,
            encoding=message.encoding,
            created_at=message.created_at,
        ),
        status=202,
    )


async def show_message(request: Request) -> Response:
    who = await principal(request, "read")
    message_id = path_id(request)
    async with services_of(request).pool.connection() as conn:
        message = await get_message(conn, who.church_id, message_id)
        counts = await message_counts(conn, who.church_id, message_id)
    if sum(getattr(counts, s.value) for s in RecipientStatus) == 0:
        # Not materialized yet: the whole audience is still waiting.
        counts = Counts(queued=message.recipient_count)
    return ok(
        MessageDetail(
            id=message.id,
            body=message.body,
            target=message.target,
            status=message.status,
            recipient_count=message.recipient_count,
            segments=message.segments,
            encoding=message.encoding,
            from_number=message.from_number,
            counts=counts,
            created_at=message.created_at,
            completed_at=message.completed_at,
        )
    )


async def index_recipients(request: Request) -> Response:
    who = await principal(request, "read")
    message_id = path_id(request)
    limit, cursor = page_params(request)
    status = request.query_params.get("status")
    if status is not None and status not in {s.value for s in RecipientStatus}:
        raise invalid_query(FieldError("status", "must be a recipient status"))
    async with services_of(request).pool.connection() as conn:
        await get_message(conn, who.church_id, message_id)
        page = await list_recipients(
            conn, who.church_id, message_id, limit=limit, cursor=cursor, status=status
        )
    return ok(page.items, next_cursor=page.next_cursor)


def _when(request: Request, name: str) -> datetime | None:
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


async def index_messages(request: Request) -> Response:
    """``?status=``, ``?since=`` (inclusive), ``?until=`` (exclusive) filter the list."""
    status = request.query_params.get("status")
    if status is not None and status not in {s.value for s in MessageStatus}:
        raise invalid_query(FieldError("status", "must be a message status"))
    where = MessageFilter(
        status=status, since=_when(request, "since"), until=_when(request, "until")
    )
    return await paged(
        request,
        lambda conn, church, limit, cursor: list_messages(
            conn, church, limit=limit, cursor=cursor, where=where
        ),
    )


def broadcast_routes() -> list[BaseRoute]:
    return [
        Route("/v1/messages", post_message, methods=["POST"]),
        Route("/v1/messages", index_messages, methods=["GET"]),
        Route("/v1/messages/{id}", show_message, methods=["GET"]),
        Route("/v1/messages/{id}/recipients", index_recipients, methods=["GET"]),
    ]


def broadcast_operations() -> list[Operation]:
    return []
