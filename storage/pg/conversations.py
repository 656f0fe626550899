"""Conversations (one per church and member) and their messages.

Inbound texts are stored here as they arrive. Outbound ones (staff replies, our
automatic answers) are accepted here as messages of one recipient and sent by the
delivery worker exactly as a broadcast's recipients are (``accept_reply``). Notes
(``add_note``) are staff's words about the conversation, kept in its thread and
never texted.
"""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import Any

import msgspec
from psycopg.types.json import Jsonb

from storage.domain import merge_fields
from storage.domain.errors import Conflict, InvalidInput, NotFound, OptedOut
from storage.domain.events import (
    ConversationChanged,
    ConversationCreatedEvent,
    ConversationMessageCreated,
    ConversationMessageCreatedEvent,
    ConversationUpdatedEvent,
    MediaItem,
)
from storage.domain.ids import created_at_of, uuid7
from storage.domain.media_links import content_url
from storage.domain.segments import count_segments
from storage.pg.canned_replies import get_canned_reply
from storage.pg.database import Conn
from storage.pg.event_log import append
from storage.pg.freshness import stale_ok
from storage.pg.media import media_by_ids
from storage.pg.messages import merge_values
from storage.pg.pagination import Page, decode_cursor, page_of
from storage.pg.recipients import recipient_id
from storage.redis.queue import SendBatch


class Conversation(msgspec.Struct, frozen=True):
    id: uuid.UUID
    member_id: uuid.UUID
    status: str
    unread_count: int
    assignee_id: uuid.UUID | None
    last_message_at: datetime
    created_at: datetime


class ConversationMessage(msgspec.Struct, frozen=True):
    id: uuid.UUID
    conversation_id: uuid.UUID
    direction: str
    body: str
    status: str
    provider_message_id: str | None
    created_at: datetime
    author_id: uuid.UUID | None = None
    """Who wrote a note: the staff user, or None when an API key did (and for texts)."""
    media: list[MediaItem] = []
    """MMS files, as stored when the message was (their ``url`` included)."""
    archived: bool = False
    """Read from the archive (storage/archive/reader.py): its month has left the
    database."""


_CONV = "id, member_id, status, unread_count, assignee_id, last_message_at, created_at"
_C_CONV = ", ".join(f"c.{column}" for column in _CONV.split(", "))
_MSG = (
    "id, conversation_id, direction, body, status, provider_message_id, created_at, author_id, "
    "media"
)
# An outbound text's status lives on its recipient row (same id as its message):
# the thread reads it there, so there is one truth and nothing to keep in step.
_THREAD = (
    "cm.id, cm.conversation_id, cm.direction, cm.body, coalesce(r.status, cm.status), "
    "coalesce(r.provider_message_id, cm.provider_message_id), cm.created_at, cm.author_id, "
    "cm.media"
)
_THREAD_JOIN = (
    "LEFT JOIN message_recipient r ON cm.direction = 'outbound' "
    "AND r.church_id = cm.church_id AND r.message_id = cm.id AND r.created_at = cm.created_at"
)


def _message(row: tuple[Any, ...]) -> ConversationMessage:
    media = msgspec.convert(row[8], list[MediaItem]) if row[8] else []
    cid, conversation_id, direction, body, status, provider_id, created_at, author = row[:8]
    return ConversationMessage(
        cid, conversation_id, direction, body, status, provider_id, created_at, author, media
    )


def media_json(media: list[MediaItem]) -> Jsonb:
    return Jsonb(msgspec.to_builtins(media))


async def record_inbound(
    conn: Conn,
    church_id: uuid.UUID,
    member_id: uuid.UUID,
    *,
    body: str,
    provider_message_id: str,
    media: list[MediaItem] | None = None,
) -> tuple[Conversation, ConversationMessage, bool]:
    """Upsert the member's conversation (reopened, one more unread) and store the
    inbound message; returns (conversation, message, conversation was created)."""
    message_id = uuid7()
    created_at = created_at_of(message_id)
    cur = await conn.execute(
        "INSERT INTO conversation (church_id, id, member_id, unread_count, last_message_at) "
        "VALUES (%s, %s, %s, 1, %s) ON CONFLICT (church_id, member_id) DO UPDATE "
        "SET unread_count = conversation.unread_count + 1, status = 'open', "
        "last_message_at = excluded.last_message_at "
        f"RETURNING {_CONV}, (xmax = 0)",
        (church_id, uuid7(), member_id, created_at),
    )
    row = await cur.fetchone()
    assert row is not None
    conversation = Conversation(*row[:7])
    cur = await conn.execute(
        "INSERT INTO conversation_message (church_id, id, created_at, conversation_id, "
        "direction, body, status, provider_message_id, media) "
        "VALUES (%s, %s, %s, %s, 'inbound', %s, 'received', %s, %s) "
        f"RETURNING {_MSG}",
        (
            church_id,
            message_id,
            created_at,
            conversation.id,
            body,
            provider_message_id,
            media_json(media or []),
        ),
    )
    mrow = await cur.fetchone()
    assert mrow is not None
    message, created = _message(mrow), bool(row[7])
    await append(
        conn,
        [
            (church_id, channels_of(conversation.id), changed_event(conversation, created=created)),
            (church_id, channels_of(conversation.id), posted_event(conversation, message)),
        ],
    )
    return conversation, message, created


class ReplyKind(enum.StrEnum):
    REPLY = "reply"
    """Written by staff (or an integrator): the conversation counts as read."""
    ANSWER = "answer"
    """Ours, automatic (a keyword's answer): the member's texts stay unread."""


class AcceptedReply(msgspec.Struct, frozen=True):
    conversation: Conversation
    message: ConversationMessage
    batch: SendBatch
    """What to enqueue once the transaction commits (the reconciler covers a lost one)."""


async def accept_reply(
    conn: Conn,
    church_id: uuid.UUID,
    conversation_id: uuid.UUID,
    *,
    body: str | None = None,
    canned_reply_id: uuid.UUID | None = None,
    sent_by: uuid.UUID | None,
    kind: ReplyKind = ReplyKind.REPLY,
    consent_exempt: bool = False,
    max_attempts: int = 5,
    traceparent: str = "",
    media_ids: list[uuid.UUID] | None = None,
    public_url: str = "",
) -> AcceptedReply:
    """Commit one text to the conversation's member, on the broadcasts' pipeline.

    The text is a message of one recipient (migration 0008): its ``message`` row and
    its outbound ``conversation_message`` share one id, its ``message_recipient`` row
    carries the status. Consent is checked here (``OptedOut`` for a member who opted
    out, unless ``consent_exempt``) and again when it is sent, like every text.
    ``traceparent``: the accepting request's trace context, stored on the message and
    carried by its batch (storage/process/tracing.py); empty when tracing is off.

    The text is ``body``, or the church's canned reply ``canned_reply_id`` filled for
    the member (``NotFound`` for another church's): exactly one of the two; with
    ``media_ids`` (the church's files, ``NotFound`` for any other) ``body`` may be
    empty. The thread shows the files as ``media`` with their staff links
    (``content_url`` under ``public_url``); the message row keeps their ids, which
    the worker turns into the provider's links when it sends.
    """
    if (body is None) == (canned_reply_id is None):
        raise InvalidInput("body", "give either body or canned_reply_id")
    message_id = uuid7()
    created_at = created_at_of(message_id)
    async with conn.transaction():
        cur = await conn.execute(
            "SELECT c.member_id, m.opted_in, m.deleted_at IS NOT NULL, ch.phone_number "
            "FROM conversation c JOIN member m ON m.church_id = c.church_id AND m.id = c.member_id "
            "JOIN church ch ON ch.id = c.church_id WHERE c.church_id = %s AND c.id = %s",
            (church_id, conversation_id),
        )
        found = await cur.fetchone()
        if found is None:
            raise NotFound("conversation")
        member_id, opted_in, erased, from_number = found
        text = (
            body
            if canned_reply_id is None
            else await _filled(conn, church_id, canned_reply_id, member_id)
        )
        assert text is not None  # one of the two, checked above
        if erased:
            raise Conflict("the member was erased: there is no number to text", field="id")
        if not opted_in and not consent_exempt:
            raise OptedOut()
        files = await media_by_ids(conn, church_id, media_ids or [])
        media = [
            MediaItem(
                id=f.id, content_type=f.content_type, size=f.size, url=content_url(public_url, f.id)
            )
            for f in files
        ]
        info = count_segments(text)
        read = ", unread_count = 0" if kind is ReplyKind.REPLY else ""
        cur = await conn.execute(
            f"UPDATE conversation SET last_message_at = %s{read} "
            f"WHERE church_id = %s AND id = %s RETURNING {_CONV}",
            (created_at, church_id, conversation_id),
        )
        row = await cur.fetchone()
        assert row is not None
        cur = await conn.execute(
            "INSERT INTO conversation_message (church_id, id, created_at, conversation_id, "
            "direction, body, status, sent_by, media) VALUES (%s, %s, %s, %s, 'outbound', %s, "
            f"'queued', %s, %s) RETURNING {_MSG}",
            (church_id, message_id, created_at, conversation_id, text, sent_by, media_json(media)),
        )
        mrow = await cur.fetchone()
        assert mrow is not None
        await conn.execute(
            "INSERT INTO message (church_id, id, created_at, body, target, status, "
            "recipient_count, segments, encoding, from_number, created_by, materialized_at, "
            "kind, conversation_id, consent_exempt, traceparent, media_ids) "
            "VALUES (%s, %s, %s, %s, %s, 'sending', 1, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (
                church_id,
                message_id,
                created_at,
                text,
                Jsonb({"member_ids": [str(member_id)]}),
                info.segments,
                info.encoding,
                from_number,
                sent_by,
                created_at,
                kind.value,
                conversation_id,
                consent_exempt,
                traceparent or None,
                [f.id for f in files],
            ),
        )
        recipient = recipient_id(message_id, 1)
        await conn.execute(
            "INSERT INTO message_recipient (church_id, message_id, id, created_at, member_id, "
            "status, segments) VALUES (%s, %s, %s, %s, %s, 'queued', %s)",
            (church_id, message_id, recipient, created_at, member_id, info.segments),
        )
        conversation, message = Conversation(*row), _message(mrow)
        await append(
            conn, [(church_id, channels_of(conversation_id), posted_event(conversation, message))]
        )
    batch = SendBatch(
        church_id=church_id,
        message_id=message_id,
        created_at=created_at,
        recipient_ids=[recipient],
        from_number=from_number,
        max_attempts=max_attempts,
        conversation_id=conversation_id,
        traceparent=traceparent,
    )
    return AcceptedReply(conversation=conversation, message=message, batch=batch)


async def _filled(
    conn: Conn, church_id: uuid.UUID, canned_reply_id: uuid.UUID, member_id: uuid.UUID
) -> str:
    """The canned reply's body with the member's merge fields, as the worker fills a
    broadcast's (storage/domain/merge_fields.py): filled here, so the thread shows the
    very text the member gets."""
    canned = await get_canned_reply(conn, church_id, canned_reply_id)
    values = await merge_values(conn, church_id, [member_id])
    text = merge_fields.render(canned.body, values.get(member_id, {}))
    if not text:
        raise InvalidInput("canned_reply_id", "fills to an empty text for this member")
    return text


async def add_note(
    conn: Conn,
    church_id: uuid.UUID,
    conversation_id: uuid.UUID,
    *,
    body: str,
    author_id: uuid.UUID | None,
) -> ConversationMessage:
    """Keep a note in the thread: never texted, and the conversation stays as it was
    (not reopened, unread count and last activity unchanged: no one wrote to the
    church). An erased member's conversation takes no notes (``Conflict``): erasure
    blanked its text, and a note is text about that member."""
    message_id = uuid7()
    created_at = created_at_of(message_id)
    async with conn.transaction():
        cur = await conn.execute(
            f"SELECT {_C_CONV}, m.deleted_at IS NOT NULL FROM conversation c "
            "JOIN member m ON m.church_id = c.church_id AND m.id = c.member_id "
            "WHERE c.church_id = %s AND c.id = %s",
            (church_id, conversation_id),
        )
        found = await cur.fetchone()
        if found is None:
            raise NotFound("conversation")
        if found[7]:
            raise Conflict("the member was erased: their conversation takes no notes", field="id")
        cur = await conn.execute(
            "INSERT INTO conversation_message (church_id, id, created_at, conversation_id, "
            "direction, body, status, author_id) VALUES (%s, %s, %s, %s, 'note', %s, 'saved', %s) "
            f"RETURNING {_MSG}",
            (church_id, message_id, created_at, conversation_id, body, author_id),
        )
        row = await cur.fetchone()
        assert row is not None
        conversation, note = Conversation(*found[:7]), _message(row)
        await append(
            conn, [(church_id, channels_of(conversation_id), posted_event(conversation, note))]
        )
    return note


def changed_event(
    conversation: Conversation, *, created: bool = False
) -> ConversationCreatedEvent | ConversationUpdatedEvent:
    """``conversation.created`` or ``conversation.updated`` for its current state."""
    data = _changed(conversation)
    return ConversationCreatedEvent.new(data) if created else ConversationUpdatedEvent.new(data)


def _changed(conversation: Conversation) -> ConversationChanged:
    return ConversationChanged(
        conversation_id=conversation.id,
        member_id=conversation.member_id,
        status=conversation.status,
        unread_count=conversation.unread_count,
        assignee_id=conversation.assignee_id,
        last_message_at=conversation.last_message_at,
    )


def channels_of(conversation_id: uuid.UUID) -> tuple[str, str]:
    """Where a conversation's events go: the whole inbox, and the thread itself."""
    return ("inbox", f"conversation:{conversation_id}")


def posted_event(
    conversation: Conversation, message: ConversationMessage
) -> ConversationMessageCreatedEvent:
    """``conversation.message.created`` for a message of the conversation."""
    return ConversationMessageCreatedEvent.new(posted(conversation, message))


def posted(conversation: Conversation, message: ConversationMessage) -> ConversationMessageCreated:
    return ConversationMessageCreated(
        conversation_id=conversation.id,
        message_id=message.id,
        member_id=conversation.member_id,
        direction=message.direction,
        body=message.body,
        created_at=message.created_at,
        media=message.media,
    )


async def update_conversation(
    conn: Conn,
    church_id: uuid.UUID,
    conversation_id: uuid.UUID,
    *,
    status: str | None = None,
    assignee_id: uuid.UUID | msgspec.UnsetType | None = msgspec.UNSET,
    mark_read: bool = False,
) -> Conversation:
    """Change status, assignee or read state; the assignee must be staff of the church."""
    if not isinstance(assignee_id, msgspec.UnsetType) and assignee_id is not None:
        cur = await conn.execute(
            "SELECT 1 FROM staff_user WHERE church_id = %s AND id = %s", (church_id, assignee_id)
        )
        if await cur.fetchone() is None:
            raise InvalidInput("assignee_id", "is not a staff user of this church")
    sets = ["status = coalesce(%s, status)"]
    params: list[Any] = [status]
    if not isinstance(assignee_id, msgspec.UnsetType):
        sets.append("assignee_id = %s")
        params.append(assignee_id)
    if mark_read:
        sets.append("unread_count = 0")
    cur = await conn.execute(
        f"UPDATE conversation SET {', '.join(sets)} WHERE church_id = %s AND id = %s "
        f"RETURNING {_CONV}",
        (*params, church_id, conversation_id),
    )
    row = await cur.fetchone()
    if row is None:
        raise NotFound("conversation")
    conversation = Conversation(*row)
    await append(conn, [(church_id, channels_of(conversation.id), changed_event(conversation))])
    return conversation


@stale_ok
async def get_conversation(
    conn: Conn, church_id: uuid.UUID, conversation_id: uuid.UUID
) -> Conversation:
    cur = await conn.execute(
        f"SELECT {_CONV} FROM conversation WHERE church_id = %s AND id = %s",
        (church_id, conversation_id),
    )
    row = await cur.fetchone()
    if row is None:
        raise NotFound("conversation")
    return Conversation(*row)


async def conversation_exists(conn: Conn, church_id: uuid.UUID, conversation_id: uuid.UUID) -> bool:
    cur = await conn.execute(
        "SELECT 1 FROM conversation WHERE church_id = %s AND id = %s",
        (church_id, conversation_id),
    )
    return await cur.fetchone() is not None


class ConversationFilter(msgspec.Struct, frozen=True):
    status: str | None = None
    unread: bool | None = None
    assignee_id: uuid.UUID | None = None


def list_conversations_sql(
    church_id: uuid.UUID,
    *,
    limit: int,
    cursor: str | None,
    where: ConversationFilter | None = None,
) -> tuple[str, list[Any]]:
    """The statement of ``list_conversations`` and its parameters (``bench/rest.py``'s
    reference server runs the very same)."""
    params: list[Any] = [church_id]
    clauses = ["church_id = %s"]
    if cursor:
        c = decode_cursor(cursor)
        clauses.append("(last_message_at, id) < (%s, %s)")
        params += [c.at, c.id]
    if where is not None:
        if where.status is not None:
            clauses.append("status = %s")
            params.append(where.status)
        if where.unread is not None:
            clauses.append("unread_count > 0" if where.unread else "unread_count = 0")
        if where.assignee_id is not None:
            clauses.append("assignee_id = %s")
            params.append(where.assignee_id)
    params.append(limit + 1)
    sql = (
        f"SELECT {_CONV} FROM conversation WHERE {' AND '.join(clauses)} "
        "ORDER BY last_message_at DESC, id DESC LIMIT %s"
    )
    return sql, params


@stale_ok
async def list_conversations(
    conn: Conn,
    church_id: uuid.UUID,
    *,
    limit: int,
    cursor: str | None,
    where: ConversationFilter | None = None,
) -> Page[Conversation]:
    """Most recent activity first."""
    sql, params = list_conversations_sql(church_id, limit=limit, cursor=cursor, where=where)
    cur = await conn.execute(sql, params)
    rows = [Conversation(*r) for r in await cur.fetchall()]
    return page_of(rows, limit, lambda r: (r.last_message_at, r.id))


@stale_ok
async def list_conversation_messages(
    conn: Conn, church_id: uuid.UUID, conversation_id: uuid.UUID, *, limit: int, cursor: str | None
) -> Page[ConversationMessage]:
    await get_conversation(conn, church_id, conversation_id)
    params: list[Any] = [church_id, conversation_id]
    where = "cm.church_id = %s AND cm.conversation_id = %s"
    if cursor:
        c = decode_cursor(cursor)
        where += " AND (cm.created_at, cm.id) < (%s, %s)"
        params += [c.at, c.id]
    params.append(limit + 1)
    cur = await conn.execute(
        f"SELECT {_THREAD} FROM conversation_message cm {_THREAD_JOIN} WHERE {where} "
        "ORDER BY cm.created_at DESC, cm.id DESC LIMIT %s",
        params,
    )
    rows = [_message(r) for r in await cur.fetchall()]
    return page_of(rows, limit, lambda r: (r.created_at, r.id))
