"""Media rows: what a church may reference by id (docs/protocol.md "Media (MMS)").

The bytes live in the object store (storage/media/library.py writes them first, then
this row), so a row always names an object that exists; an object without a row
(a crash between the two) is never referenced and is harmless.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import msgspec

from storage.domain.errors import NotFound
from storage.pg.database import Conn
from storage.pg.freshness import stale_ok


class Media(msgspec.Struct, frozen=True):
    id: uuid.UUID
    church_id: uuid.UUID
    content_type: str
    size: int
    object_key: str
    sha256: str
    source: str
    """``upload`` (staff or an API key) or ``inbound`` (copied from a member's MMS)."""
    created_at: datetime


_COLS = "id, church_id, content_type, size, object_key, sha256, source, created_at"


def _media(row: tuple[Any, ...]) -> Media:
    return Media(*row)


async def insert_media(
    conn: Conn,
    church_id: uuid.UUID,
    media_id: uuid.UUID,
    *,
    content_type: str,
    size: int,
    object_key: str,
    sha256: str,
    source: str,
    created_by: uuid.UUID | None,
) -> Media:
    cur = await conn.execute(
        f"""
        INSERT INTO media (church_id, id, content_type, size, object_key, sha256, source,
                           created_by)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
        RETURNING {_COLS}
        """,
        (church_id, media_id, content_type, size, object_key, sha256, source, created_by),
    )
    row = await cur.fetchone()
    assert row is not None
    return _media(row)


@stale_ok
async def get_media(conn: Conn, church_id: uuid.UUID, media_id: uuid.UUID) -> Media:
    """The church's file, or NotFound (another church's id included)."""
    cur = await conn.execute(
        f"SELECT {_COLS} FROM media WHERE church_id = %s AND id = %s", (church_id, media_id)
    )
    row = await cur.fetchone()
    if row is None:
        raise NotFound("media")
    return _media(row)


async def media_by_ids(conn: Conn, church_id: uuid.UUID, ids: list[uuid.UUID]) -> list[Media]:
    """The church's files in the order of ``ids``; NotFound when any is missing or
    another church's (a message never goes out with fewer files than it named)."""
    if not ids:
        return []
    cur = await conn.execute(
        f"SELECT {_COLS} FROM media WHERE church_id = %s AND id = ANY(%s)", (church_id, ids)
    )
    found = {m.id: m for m in map(_media, await cur.fetchall())}
    if any(i not in found for i in ids):
        raise NotFound("media")
    return [found[i] for i in ids]
