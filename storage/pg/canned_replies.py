"""Canned replies: named bodies staff pick in the inbox, filled for the member.

Their own table, not the templates': templates are broadcasts' texts and canned
replies the inbox's, each list chosen from in its own place (a picker of dozens of
short answers should not fill with newsletters). They share the templates' merge
fields and checks (storage/domain/merge_fields.py, ``named_texts.body_problems``), so a
canned reply that can be saved can always be sent; ``accept_reply``
(storage/pg/conversations.py) fills it for the conversation's member.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import msgspec

from storage.domain import merge_fields
from storage.pg.database import Conn
from storage.pg.freshness import stale_ok
from storage.pg.named_texts import NamedTexts
from storage.pg.pagination import Page


class CannedReply(msgspec.Struct, frozen=True):
    id: uuid.UUID
    name: str
    body: str
    merge_fields: list[str]
    """The merge fields the body uses, sorted (``first_name``, ...)."""
    created_at: datetime
    updated_at: datetime


def _canned(row: tuple[Any, ...]) -> CannedReply:
    return CannedReply(
        id=row[0],
        name=row[1],
        body=row[2],
        merge_fields=sorted(merge_fields.names(row[2])),
        created_at=row[3],
        updated_at=row[4],
    )


_CANNED = NamedTexts("canned_reply", "canned reply", _canned)


async def create_canned_reply(
    conn: Conn, church_id: uuid.UUID, *, name: str, body: str
) -> CannedReply:
    return await _CANNED.create(conn, church_id, name=name, body=body)


async def get_canned_reply(
    conn: Conn, church_id: uuid.UUID, canned_reply_id: uuid.UUID
) -> CannedReply:
    """The church's canned reply, or NotFound (another church's id included)."""
    return await _CANNED.get(conn, church_id, canned_reply_id)


@stale_ok
async def list_canned_replies(
    conn: Conn, church_id: uuid.UUID, *, limit: int, cursor: str | None
) -> Page[CannedReply]:
    return await _CANNED.page(conn, church_id, limit=limit, cursor=cursor)


async def update_canned_reply(
    conn: Conn,
    church_id: uuid.UUID,
    canned_reply_id: uuid.UUID,
    *,
    name: str | None = None,
    body: str | None = None,
) -> CannedReply:
    return await _CANNED.update(conn, church_id, canned_reply_id, name=name, body=body)


async def delete_canned_reply(
    conn: Conn, church_id: uuid.UUID, canned_reply_id: uuid.UUID
) -> CannedReply:
    """Delete a canned reply; replies sent from it keep their own text."""
    return await _CANNED.delete(conn, church_id, canned_reply_id)
