"""Conversations: the shared inbox, its threads, and staff replies."""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from api.auth import principal
from api.errors import invalid_body, invalid_query
from api.listing import paged, read, services_of
from api.media import MediaBody, MediaIds, media_problems
from api.operation import Operation, QueryParam
from api.schemas import Body, ConversationPatch
from api.schemas import Request as RequestBody
from api.validation import decode_body, path_id
from storage.domain.envelope import FieldError
from storage.pg.conversation_search import search_conversations
from storage.pg.conversations import (
    Conversation,
    ConversationFilter,
    ConversationMessage,
    accept_reply,
    add_note,
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


class ReplyCreate(RequestBody, frozen=True):
    """The text: ``body``, or a canned reply filled for the member; exactly one, or
    neither (or an empty ``body``) with ``media_ids``."""

    body: MediaBody | msgspec.UnsetType = msgspec.UNSET
    canned_reply_id: uuid.UUID | msgspec.UnsetType = msgspec.UNSET
    media_ids: MediaIds | msgspec.UnsetType = msgspec.UNSET
    """Files from ``POST /v1/media`` sent with the text (MMS), in this order."""


class NoteCreate(RequestBody, frozen=True):
    body: Body


async def post_reply(request: Request) -> Response:
    """Commit the reply (``409 opted_out`` for a member who opted out), then enqueue it."""
    who = await principal(request, "write")
    conversation_id = path_id(request)
    body = await decode_body(request, ReplyCreate)
    text = None if isinstance(body.body, msgspec.UnsetType) else body.body
    canned = None if isinstance(body.canned_reply_id, msgspec.UnsetType) else body.canned_reply_id
    media_ids = [] if isinstance(body.media_ids, msgspec.UnsetType) else body.media_ids
    problems = media_problems(media_ids)
    neither = text is None and canned is None
    if (text is not None and canned is not None) or (neither and not media_ids):
        problems += [
            FieldError(field, "give exactly one of body and canned_reply_id")
            for field in ("body", "canned_reply_id")
        ]
    elif text == "" and not media_ids:
        problems.append(FieldError("body", "must not be empty (unless media_ids are given)"))
    if problems:
        raise invalid_body(*problems)
    if neither:
        text = ""
    services = services_of(request)
    delivery = services.settings.delivery
    async with services.pool.connection() as conn:
        accepted = await accept_reply(
            conn,
            who.church_id,
            conversation_id,
            body=text,
            canned_reply_id=canned,
            sent_by=who.user_id,
            max_attempts=delivery.max_attempts,
            traceparent=tracing.current_traceparent(),
            media_ids=media_ids,
            public_url=services.settings.public_url,
        )
    await hand_over(services.redis, [accepted.batch], delivery.shards)
    return ok(accepted.message, status=202)


async def post_note(request: Request) -> Response:
    """Keep a note in the thread; its author is the staff user (None for an API key)."""
    who = await principal(request, "write")
    conversation_id = path_id(request)
    body = await decode_body(request, NoteCreate)
    async with services_of(request).pool.connection() as conn:
        note = await add_note(
            conn, who.church_id, conversation_id, body=body.body, author_id=who.user_id
        )
    return ok(note, status=201)


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


def _conversation_filter(request: Request) -> tuple[ConversationFilter, str | None]:
    """The list's filters, and the search words ``q`` (None: no search)."""
    query = request.query_params
    problems: list[FieldError] = []
    q = query.get("q")
    if q is not None and (not q.strip() or len(q) > 200 or "\x00" in q):
        problems.append(FieldError("q", "must be 1 to 200 characters, not all blank, no NUL"))
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
    return ConversationFilter(status=status, unread=unread, assignee_id=assignee), q


async def index_conversations(request: Request) -> Response:
    """``?status=open|closed``, ``?unread=true|false``, ``?assignee_id=`` filter the list;
    ``?q=`` searches it (storage/pg/conversation_search.py), with the same filters."""
    where, q = _conversation_filter(request)
    if q is None:
        return await paged(request, list_conversations, where=where)
    return await paged(request, search_conversations, services_of(request).vault, q=q, where=where)


def inbox_operations() -> list[Operation]:
    conversation_filters = (
        QueryParam("status", Literal["open", "closed"], "only open or only closed"),
        QueryParam("unread", bool, "only conversations with (or without) unread messages"),
        QueryParam("assignee_id", uuid.UUID, "only conversations assigned to this staff user"),
        QueryParam(
            "q",
            Annotated[str, msgspec.Meta(min_length=1, max_length=200)],
            "search: the member's name or one live message holding every word (a word "
            "matches words it begins; words with digits match whole words), or the "
            "member's full phone number (E.164 or national)",
        ),
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
            "The thread (texts and notes), newest first",
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
            body=ReplyCreate,
            response=ConversationMessage,
            status=202,
            errors=("opted_out", "conflict"),
            description=(
                "Committed before the answer, then sent by the delivery worker like every "
                "text (consent checked again when it is sent). A member who opted out "
                "answers `409 opted_out`; an erased member `409 conflict`. The text is "
                "`body`, or `canned_reply_id`: the church's canned reply with its merge "
                "fields filled for the member (another church's is `404`); exactly one. "
                "`media_ids` (at most 10, from `POST /v1/media`) make it an MMS and `body` "
                "may then be empty or absent; the thread lists the files as `media`. An "
                "unknown id, or another church's, is `404` and nothing is written."
            ),
            examples={
                "reply": {"body": "Thanks! See you Sunday."},
                "canned": {"canned_reply_id": "01930000-0000-7000-8000-000000000000"},
                "mms": {"body": "The flyer", "media_ids": ["01930000-0000-7000-8000-000000000001"]},
            },
        ),
        Operation(
            "POST",
            "/v1/conversations/{id}/notes",
            post_note,
            "conversation.note",
            "Keep a note for the church in the thread (never texted to the member)",
            "inbox",
            scope="write",
            body=NoteCreate,
            response=ConversationMessage,
            status=201,
            errors=("conflict",),
            description=(
                'Listed in the thread with `direction: "note"` and `author_id` (the staff '
                "user; null when an API key wrote it). Never texted, never unread: the "
                "conversation's status, unread count and last activity stay as they were. "
                'Publishes `conversation.message.created` with `direction: "note"`. An '
                "erased member's conversation answers `409 conflict`."
            ),
            examples={"note": {"body": "Called her back; she'll come on Sunday."}},
        ),
    ]
