"""Conversations: the shared inbox, its threads, and staff replies."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from api.auth import principal
from api.schemas import ReplyRequest
from api.validation import decode_body, page_params, path_id
from storage.conversations import (
    get_conversation,
    list_conversation_messages,
    list_conversations,
    record_outbound,
)
from storage.envelope import ok
from storage.events import ConversationMessageCreated, new_event
from storage.queue import ConversationSend, enqueue_sends
from storage.services import Services


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


async def index_conversations(request: Request) -> Response:
    who = await principal(request, "read")
    limit, cursor = page_params(request)
    async with _services(request).pool.connection() as conn:
        page = await list_conversations(conn, who.church_id, limit=limit, cursor=cursor)
    return ok(page.items, next_cursor=page.next_cursor)


async def show_conversation(request: Request) -> Response:
    who = await principal(request, "read")
    conversation_id = path_id(request)
    async with _services(request).pool.connection() as conn:
        conversation = await get_conversation(conn, who.church_id, conversation_id)
    return ok(conversation)


async def index_thread(request: Request) -> Response:
    who = await principal(request, "read")
    conversation_id = path_id(request)
    limit, cursor = page_params(request)
    async with _services(request).pool.connection() as conn:
        page = await list_conversation_messages(
            conn, who.church_id, conversation_id, limit=limit, cursor=cursor
        )
    return ok(page.items, next_cursor=page.next_cursor)


async def post_reply(request: Request) -> Response:
    who = await principal(request, "write")
    conversation_id = path_id(request)
    body = await decode_body(request, ReplyRequest)
    services = _services(request)
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


def inbox_routes() -> list[BaseRoute]:
    return [
        Route("/v1/conversations", index_conversations, methods=["GET"]),
        Route("/v1/conversations/{id}", show_conversation, methods=["GET"]),
        Route("/v1/conversations/{id}/messages", index_thread, methods=["GET"]),
        Route("/v1/conversations/{id}/messages", post_reply, methods=["POST"]),
    ]
