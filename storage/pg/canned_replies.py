"""Canned replies: named bodies staff pick in the inbox, filled for the member.

Their own table, not the templates': templates are broadcasts' texts and canned
replies the inbox's, each list chosen from in its own place (a picker of dozens of
short answers should not fill with newsletters). They share the templates' merge
fields and checks (storage/domain/merge_fields.py, ``templates.body_problems``), so a
canned reply that can be saved can always be sent; ``accept_reply``
(storage/pg/conversations.py) fills it for the conversation's member.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import msgspec
from psycopg import errors

from storage.domain import merge_fields
from storage.domain.errors import Conflict, InvalidInput, NotFound
from storage.domain.ids import uuid7
from storage.pg.database import Conn
from storage.pg.freshness import stale_ok
from storage.pg.pagination import Page, id_page
from storage.pg.templates import body_problems


class CannedReply(msgspec.Struct, frozen=True):
    id: uuid.UUID
    name: str
    body: str
    merge_fields: list[str]
    """The merge fields the body uses, sorted (``first_name``, ...)."""
    created_at: datetime
    updated_at: datetime


_COLS = "id, name, body, created_at, updated_at"
_TAKEN = "a canned reply with this name already exists"


def _canned(row: tuple[Any, ...]) -> CannedReply:
    return CannedReply(
        id=row[0],
        name=row[1],
        body=row[2],
        merge_fields=sorted(merge_fields.names(row[2])),
        created_at=row[3],
        updated_at=row[4],
    )


def _clean(name: str) -> str:
    cleaned = name.strip()
    if not cleaned:
        raise InvalidInput("name", "must not be blank")
    return cleaned


def _check(body: str) -> None:
    found = body_problems(body)
    if found:
        raise found[0]


async def create_canned_reply(
    conn: Conn, church_id: uuid.UUID, *, name: str, body: str
) -> CannedReply:
    _check(body)
    try:
        cur = await conn.execute(
            "INSERT INTO canned_reply (church_id, id, name, body) VALUES (%s, %s, %s, %s) "
            f"RETURNING {_COLS}",
            (church_id, uuid7(), _clean(name), body),
        )
    except errors.UniqueViolation as exc:
        raise Conflict(_TAKEN, field="name") from exc
    row = await cur.fetchone()
    assert row is not None
    return _canned(row)


async def get_canned_reply(
    conn: Conn, church_id: uuid.UUID, canned_reply_id: uuid.UUID
) -> CannedReply:
    """The church's canned reply, or NotFound (another church's id included)."""
    cur = await conn.execute(
        f"SELECT {_COLS} FROM canned_reply WHERE church_id = %s AND id = %s",
        (church_id, canned_reply_id),
    )
    row = await cur.fetchone()
    if row is None:
        raise NotFound("canned reply")
    return _canned(row)


@stale_ok
async def list_canned_replies(
    conn: Conn, church_id: uuid.UUID, *, limit: int, cursor: str | None
) -> Page[CannedReply]:
    return await id_page(
        conn,
        f"SELECT {_COLS} FROM canned_reply",
        church_id,
        limit=limit,
        cursor=cursor,
        row=lambda *r: _canned(r),
    )


async def update_canned_reply(
    conn: Conn,
    church_id: uuid.UUID,
    canned_reply_id: uuid.UUID,
    *,
    name: str | None = None,
    body: str | None = None,
) -> CannedReply:
    if body is not None:
        _check(body)
    try:
        cur = await conn.execute(
            "UPDATE canned_reply SET name = coalesce(%s, name), body = coalesce(%s, body), "
            f"updated_at = now() WHERE church_id = %s AND id = %s RETURNING {_COLS}",
            (_clean(name) if name is not None else None, body, church_id, canned_reply_id),
        )
    except errors.UniqueViolation as exc:
        raise Conflict(_TAKEN, field="name") from exc
    row = await cur.fetchone()
    if row is None:
        raise NotFound("canned reply")
    return _canned(row)


async def delete_canned_reply(
    conn: Conn, church_id: uuid.UUID, canned_reply_id: uuid.UUID
) -> CannedReply:
    """Delete a canned reply; replies sent from it keep their own text."""
    cur = await conn.execute(
        f"DELETE FROM canned_reply WHERE church_id = %s AND id = %s RETURNING {_COLS}",
        (church_id, canned_reply_id),
    )
    row = await cur.fetchone()
    if row is None:
        raise NotFound("canned reply")
    return _canned(row)
