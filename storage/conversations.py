"""Conversations (one per church and member) and their messages."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import msgspec

from storage.database import Conn
from storage.errors import InvalidInput, NotFound
from storage.events import (
    ConversationChanged,
    ConversationMessageCreated,
    ConversationMessageStatus,
    Event,
    new_event,
)
from storage.ids import created_at_of, uuid7
from storage.outbox import record_event, record_events
from storage.pagination import Page, decode_cursor, page_of


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


_CONV = "id, member_id, status, unread_count, assignee_id, last_message_at, created_at"
_MSG = "id, conversation_id, direction, body, status, provider_message_id, created_at"


async def record_inbound(
    conn: Conn,
    church_id: uuid.UUID,
    member_id: uuid.UUID,
    *,
    body: str,
    provider_message_id: str,
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
        "direction, body, status, provider_message_id) "
        "VALUES (%s, %s, %s, %s, 'inbound', %s, 'received', %s) "
        f"RETURNING {_MSG}",
        (church_id, message_id, created_at, conversation.id, body, provider_message_id),
    )
    mrow = await cur.fetchone()
    assert mrow is not None
    message, created = ConversationMessage(*mrow), bool(row[7])
    await record_events(
        conn,
        church_id,
        [
            ("conversation.created" if created else "conversation.updated", _changed(conversation)),
            ("conversation.message.created", _posted(conversation, message)),
        ],
    )
    return conversation, message, created


async def record_outbound(
    conn: Conn,
    church_id: uuid.UUID,
    conversation_id: uuid.UUID,
    *,
    body: str,
    sent_by: uuid.UUID | None,
) -> tuple[Conversation, ConversationMessage]:
    message_id = uuid7()
    created_at = created_at_of(message_id)
    cur = await conn.execute(
        "UPDATE conversation SET last_message_at = %s, unread_count = 0 "
        f"WHERE church_id = %s AND id = %s RETURNING {_CONV}",
        (created_at, church_id, conversation_id),
    )
    row = await cur.fetchone()
    if row is None:
        raise NotFound("conversation")
    cur = await conn.execute(
        "INSERT INTO conversation_message (church_id, id, created_at, conversation_id, "
        "direction, body, status, sent_by) VALUES (%s, %s, %s, %s, 'outbound', %s, 'queued', %s) "
        f"RETURNING {_MSG}",
        (church_id, message_id, created_at, conversation_id, body, sent_by),
    )
    mrow = await cur.fetchone()
    assert mrow is not None
    conversation, message = Conversation(*row), ConversationMessage(*mrow)
    await record_event(
        conn, church_id, "conversation.message.created", _posted(conversation, message)
    )
    return conversation, message


def changed_event(conversation: Conversation, *, created: bool = False) -> Event:
    """``conversation.created`` or ``conversation.updated`` for its current state."""
    return new_event(
        "conversation.created" if created else "conversation.updated", _changed(conversation)
    )


def _changed(conversation: Conversation) -> ConversationChanged:
    return ConversationChanged(
        conversation_id=conversation.id,
        member_id=conversation.member_id,
        status=conversation.status,
        unread_count=conversation.unread_count,
        assignee_id=conversation.assignee_id,
        last_message_at=conversation.last_message_at,
    )


def _posted(conversation: Conversation, message: ConversationMessage) -> ConversationMessageCreated:
    return ConversationMessageCreated(
        conversation_id=conversation.id,
        message_id=message.id,
        member_id=conversation.member_id,
        direction=message.direction,
        body=message.body,
        created_at=message.created_at,
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
    await record_event(conn, church_id, "conversation.updated", _changed(conversation))
    return conversation


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


class ConversationFilter(msgspec.Struct, frozen=True):
    status: str | None = None
    unread: bool | None = None
    assignee_id: uuid.UUID | None = None


async def list_conversations(
    conn: Conn,
    church_id: uuid.UUID,
    *,
    limit: int,
    cursor: str | None,
    where: ConversationFilter | None = None,
) -> Page[Conversation]:
    """Most recent activity first."""
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
    cur = await conn.execute(
        f"SELECT {_CONV} FROM conversation WHERE {' AND '.join(clauses)} "
        "ORDER BY last_message_at DESC, id DESC LIMIT %s",
        params,
    )
    rows = [Conversation(*r) for r in await cur.fetchall()]
    return page_of(rows, limit, lambda r: (r.last_message_at, r.id))


async def list_conversation_messages(
    conn: Conn, church_id: uuid.UUID, conversation_id: uuid.UUID, *, limit: int, cursor: str | None
) -> Page[ConversationMessage]:
    await get_conversation(conn, church_id, conversation_id)
    params: list[Any] = [church_id, conversation_id]
    where = "church_id = %s AND conversation_id = %s"
    if cursor:
        c = decode_cursor(cursor)
        where += " AND (created_at, id) < (%s, %s)"
        params += [c.at, c.id]
    params.append(limit + 1)
    cur = await conn.execute(
        f"SELECT {_MSG} FROM conversation_message WHERE {where} "
        "ORDER BY created_at DESC, id DESC LIMIT %s",
        params,
    )
    rows = [ConversationMessage(*r) for r in await cur.fetchall()]
    return page_of(rows, limit, lambda r: (r.created_at, r.id))


async def set_outbound_status(
    conn: Conn,
    church_id: uuid.UUID,
    message_id: uuid.UUID,
    status: str,
    provider_message_id: str | None,
    allowed: list[str],
) -> ConversationMessage | None:
    cur = await conn.execute(
        "UPDATE conversation_message SET status = %s, "
        "provider_message_id = coalesce(provider_message_id, %s) "
        "WHERE church_id = %s AND id = %s AND created_at = %s AND status = ANY(%s) "
        f"RETURNING {_MSG}",
        (status, provider_message_id, church_id, message_id, created_at_of(message_id), allowed),
    )
    row = await cur.fetchone()
    if row is None:
        return None
    changed = ConversationMessage(*row)
    await record_event(
        conn,
        church_id,
        "conversation.message.status",
        ConversationMessageStatus(
            conversation_id=changed.conversation_id, message_id=changed.id, status=changed.status
        ),
    )
    return changed
