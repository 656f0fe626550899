"""Conversations: the shared inbox, its threads, and staff replies."""

from __future__ import annotations

import uuid
from typing import Literal

from starlette.requests import Request
from starlette.responses import Response

from api.auth import principal
from api.errors import invalid_query
from api.listing import paged, read, services_of
from api.operation import Operation, QueryParam
from api.schemas import ConversationPatch, ReplyRequest
from api.validation import decode_body, path_id
from storage.domain.envelope import FieldError
from storage.pg.conversations import (
    Conversation,
    ConversationFilter,
    ConversationMessage,
    accept_reply,
    get_conversation,
    list_conversations,
    update_conversation,
)
from storage.process import tracing
from storage.redis.queue import hand_over
from storage.responses import ok


async def show_conversation(request: Request) -> Response:
    who = await principal(request, "read")
    conversation_id = path_id(request)
    conversation = await read(request, get_conversation, who.church_id, conversation_id)
    return ok(conversation)


async def index_thread(request: Request) -> Response:
    """Live messages first, then the archived months', newest first."""
    conversation_id = path_id(request)
    return await paged(
        request,
        services_of(request).archive.list_conversation_messages,
        conversation_id,
    )


async def post_reply(request: Request) -> Response:
    """Commit the reply (``409 opted_out`` for a member who opted out), then enqueue it."""
    who = await principal(request, "write")
    conversation_id = path_id(request)
    body = await decode_body(request, ReplyRequest)
    services = services_of(request)
    delivery = services.settings.delivery
    async with services.pool.connection() as conn:
        accepted = await accept_reply(
            conn,
            who.church_id,
            conversation_id,
            body=body.body,
            sent_by=who.user_id,
            max_attempts=delivery.max_attempts,
            traceparent=tracing.current_traceparent(),
        )
    await hand_over(services.redis, [accepted.batch], delivery.shards)
    return ok(accepted.message, status=202)


async def patch_conversation(request: Request) -> Response:
    """Close, reopen or (un)assign a conversation."""
    who = await principal(request, "write")
    conversation_id = path_id(request)
    body = await decode_body(request, ConversationPatch)
    async with services_of(request).pool.connection() as conn:
        conversation = await update_conversation(
            conn, who.church_id, conversation_id, status=body.status, assignee_id=body.assignee_id
        )
    return ok(conversation)


async def mark_read(request: Request) -> Response:
    who = await principal(request, "write")
    conversation_id = path_id(request)
    async with services_of(request).pool.connection() as conn:
        conversation = await update_conversation(
            conn, who.church_id, conversation_id, mark_read=True
        )
    return ok(conversation)


def _conversation_filter(request: Request) -> ConversationFilter:
    query = request.query_params
    problems: list[FieldError] = []
    status = query.get("status")
    if status is not None and status not in ("open", "closed"):
        problems.append(FieldError("status", "must be open or closed"))
    unread_raw = query.get("unread")
    unread = None if unread_raw is None else unread_raw.lower() in ("true", "1", "yes")
    if unread_raw is not None and unread_raw.lower() not in (
        "true",
        "false",
        "1",
        "0",
        "yes",
        "no",
    ):
        problems.append(FieldError("unread", "must be true or false"))
    assignee: uuid.UUID | None = None
    if (raw := query.get("assignee_id")) is not None:
        try:
            assignee = uuid.UUID(raw)
        except ValueError:
            problems.append(FieldError("assignee_id", "must be a UUID"))
    if problems:
        raise invalid_query(*problems)
    return ConversationFilter(status=status, unread=unread, assignee_id=assignee)


async def index_conversations(request: Request) -> Response:
    """``?status=open|closed``, ``?unread=true|false``, ``?assignee_id=`` filter the list."""
    where = _conversation_filter(request)
    return await paged(
        request,
        list_conversations,
        where=where,
    )


def inbox_operations() -> list[Operation]:
    conversation_filters = (
        QueryParam("status", Literal["open", "closed"], "only open or only closed"),
        QueryParam("unread", bool, "only conversations with (or without) unread messages"),
        QueryParam("assignee_id", uuid.UUID, "only conversations assigned to this staff user"),
    )
    return [
        Operation(
            "GET",
            "/v1/conversations",
            index_conversations,
            "conversation.list",
            "List conversations, most recent activity first",
            "inbox",
            response=list[Conversation],
            listing=True,
            query=conversation_filters,
        ),
        Operation(
            "GET",
            "/v1/conversations/{id}",
            show_conversation,
            "conversation.show",
            "One conversation",
            "inbox",
            response=Conversation,
        ),
        Operation(
            "PATCH",
            "/v1/conversations/{id}",
            patch_conversation,
            "conversation.update",
            "Close, reopen, assign or unassign a conversation",
            "inbox",
            scope="write",
            body=ConversationPatch,
            response=Conversation,
            examples={"close": {"status": "closed"}, "assign": {"assignee_id": None}},
        ),
        Operation(
            "POST",
            "/v1/conversations/{id}/read",
            mark_read,
            "conversation.read",
            "Mark every message of a conversation read",
            "inbox",
            scope="write",
            response=Conversation,
            audit=False,
        ),
        Operation(
            "GET",
            "/v1/conversations/{id}/messages",
            index_thread,
            "conversation.messages",
            "The thread, newest first",
            "inbox",
            response=list[ConversationMessage],
            listing=True,
        ),
        Operation(
            "POST",
            "/v1/conversations/{id}/messages",
            post_reply,
            "conversation.reply",
            "Reply to the member (sent asynchronously)",
            "inbox",
            scope="write",
            body=ReplyRequest,
            response=ConversationMessage,
            status=202,
            errors=("opted_out", "conflict"),
            description=(
                "Committed before the answer, then sent by the delivery worker like every "
                "text (consent checked again when it is sent). A member who opted out "
                "answers `409 opted_out`; an erased member `409 conflict`."
            ),
            examples={"reply": {"body": "Thanks! See you Sunday."}},
        ),
    ]
