"""Conversations: the shared inbox, its threads, and staff replies."""

from __future__ import annotations

import uuid

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from api.auth import principal
from api.errors import invalid_query
from api.listing import paged, services_of
from api.operation import Operation
from api.schemas import ConversationPatch, ReplyRequest
from api.validation import decode_body, path_id
from storage.conversations import (
    Conversation,
    ConversationFilter,
    changed_event,
    get_conversation,
    list_conversation_messages,
    list_conversations,
    record_outbound,
    update_conversation,
)
from storage.envelope import FieldError, ok
from storage.events import ConversationMessageCreated, new_event
from storage.queue import ConversationSend, enqueue_sends


async def show_conversation(request: Request) -> Response:
    who = await principal(request, "read")
    conversation_id = path_id(request)
    async with services_of(request).pool.connection() as conn:
        conversation = await get_conversation(conn, who.church_id, conversation_id)
    return ok(conversation)


async def index_thread(request: Request) -> Response:
    conversation_id = path_id(request)
    return await paged(
        request,
        lambda conn, church, limit, cursor: list_conversation_messages(
            conn, church, conversation_id, limit=limit, cursor=cursor
        ),
    )


async def post_reply(request: Request) -> Response:
    who = await principal(request, "write")
    conversation_id = path_id(request)
    body = await decode_body(request, ReplyRequest)
    services = services_of(request)
    async with services.pool.connection() as conn:
        conversation, message = await record_outbound(
            conn, who.church_id, conversation_id, body=body.body, sent_by=who.user_id
        )
    await enqueue_sends(
        services.redis,
        [
            ConversationSend(
                church_id=who.church_id,
                conversation_id=conversation.id,
                message_id=message.id,
                max_attempts=services.settings.delivery.max_attempts,
            )
        ],
        services.settings.delivery.shards,
    )
    event = new_event(
        "conversation.message.created",
        ConversationMessageCreated(
            conversation_id=conversation.id,
            message_id=message.id,
            member_id=conversation.member_id,
            direction="outbound",
            body=message.body,
            created_at=message.created_at,
        ),
    )
    await services.publisher.publish_many(
        who.church_id, [("inbox", event), (f"conversation:{conversation.id}", event)]
    )
    return ok(message, status=202)


async def _changed(request: Request, church_id: uuid.UUID, conversation: Conversation) -> Response:
    """Tell the inbox and the thread, then answer with the new state."""
    event = changed_event(conversation)
    await services_of(request).publisher.publish_many(
        church_id, [("inbox", event), (f"conversation:{conversation.id}", event)]
    )
    return ok(conversation)


async def patch_conversation(request: Request) -> Response:
    """Close, reopen or (un)assign a conversation."""
    who = await principal(request, "write")
    conversation_id = path_id(request)
    body = await decode_body(request, ConversationPatch)
    async with services_of(request).pool.connection() as conn:
        conversation = await update_conversation(
            conn, who.church_id, conversation_id, status=body.status, assignee_id=body.assignee_id
        )
    return await _changed(request, who.church_id, conversation)


async def mark_read(request: Request) -> Response:
    who = await principal(request, "write")
    conversation_id = path_id(request)
    async with services_of(request).pool.connection() as conn:
        conversation = await update_conversation(
            conn, who.church_id, conversation_id, mark_read=True
        )
    return await _changed(request, who.church_id, conversation)


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
        lambda conn, church, limit, cursor: list_conversations(
            conn, church, limit=limit, cursor=cursor, where=where
        ),
    )


def inbox_routes() -> list[BaseRoute]:
    return [
        Route("/v1/conversations", index_conversations, methods=["GET"]),
        Route("/v1/conversations/{id}", show_conversation, methods=["GET"]),
        Route("/v1/conversations/{id}", patch_conversation, methods=["PATCH"]),
        Route("/v1/conversations/{id}/read", mark_read, methods=["POST"]),
        Route("/v1/conversations/{id}/messages", index_thread, methods=["GET"]),
        Route("/v1/conversations/{id}/messages", post_reply, methods=["POST"]),
    ]


def inbox_operations() -> list[Operation]:
    return []
