"""The broadcasts a member received: the inbox's contact panel.

A member's recipient rows, newest first, through the ``message_recipient_member``
index (migration 0016), each with its broadcast's body as it was sent: the text as
written, merge fields un-rendered (the rendered text of each recipient is never
stored). Only broadcasts: staff replies and automatic answers are one-recipient
messages too (migration 0008, ``kind`` 'reply' and 'answer'), but they are already
in the member's conversation thread. Live months only: archived months are not
read here.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import msgspec

from storage.domain.errors import InvalidInput, NotFound
from storage.pg.database import Conn
from storage.pg.freshness import stale_ok
from storage.pg.pagination import Page, decode_cursor, page_of


class MemberMessage(msgspec.Struct, frozen=True):
    message_id: uuid.UUID
    body: str
    """The broadcast's text as written (merge fields un-rendered)."""
    status: str
    """This member's recipient status."""
    created_at: datetime
    """When the broadcast was accepted."""
    updated_at: datetime
    """When this member's status last changed."""
    error_code: str | None


@stale_ok
async def list_member_messages(
    conn: Conn,
    church_id: uuid.UUID,
    member_id: uuid.UUID,
    *,
    limit: int,
    cursor: str | None,
) -> Page[MemberMessage]:
    """The broadcasts ``member_id`` was a recipient of, newest first; ``NotFound``
    for a member the church does not have (or has erased)."""
    cur = await conn.execute(
        "SELECT 1 FROM member WHERE church_id = %s AND id = %s AND deleted_at IS NULL",
        (church_id, member_id),
    )
    if await cur.fetchone() is None:
        raise NotFound("member")
    after = ""
    params: list[Any] = [church_id, member_id]
    if cursor:
        c = decode_cursor(cursor)
        if c.at is None:
            raise InvalidInput("cursor", "not a cursor of this list")
        # A row comparison on the index's own columns: the scan starts at the cursor.
        after = "AND (r.created_at, r.message_id) < (%s, %s) "
        params += [c.at, c.id]
    params.append(limit + 1)
    cur = await conn.execute(
        "SELECT r.message_id, m.body, r.status, r.created_at, r.updated_at, r.error_code "
        "FROM message_recipient r JOIN message m ON m.church_id = r.church_id "
        "AND m.id = r.message_id AND m.created_at = r.created_at "
        f"WHERE r.church_id = %s AND r.member_id = %s AND m.kind = 'broadcast' {after}"
        "ORDER BY r.created_at DESC, r.message_id DESC LIMIT %s",
        params,
    )
    rows = [MemberMessage(*r) for r in await cur.fetchall()]
    return page_of(rows, limit, lambda r: (r.created_at, r.message_id))
