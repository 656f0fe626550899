"""Message templates: a named body with merge fields, reused for broadcasts.

Merge fields are checked when a template is saved (``check_body``), so a
template that can be saved can always be sent. ``segments`` and ``encoding``
describe the body as written; merge fields change the length of each
recipient's text.
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
from storage.domain.segments import count_segments
from storage.pg.database import Conn
from storage.pg.freshness import stale_ok
from storage.pg.pagination import Page, id_page


class Template(msgspec.Struct, frozen=True):
    id: uuid.UUID
    name: str
    body: str
    merge_fields: list[str]
    """The merge fields the body uses, sorted (``first_name``, ...)."""
    segments: int
    encoding: str
    created_at: datetime
    updated_at: datetime


_COLS = "id, name, body, created_at, updated_at"
_TAKEN = "a template with this name already exists"


def _template(row: tuple[Any, ...]) -> Template:
    body: str = row[2]
    info = count_segments(body)
    return Template(
        id=row[0],
        name=row[1],
        body=body,
        merge_fields=sorted(merge_fields.names(body)),
        segments=info.segments,
        encoding=info.encoding,
        created_at=row[3],
        updated_at=row[4],
    )


def body_problems(body: str) -> list[InvalidInput]:
    """Each problem with the merge fields of ``body``, as a ``body`` field error."""
    return [InvalidInput("body", p) for p in merge_fields.problems(body)]


def _clean(name: str) -> str:
    cleaned = name.strip()
    if not cleaned:
        raise InvalidInput("name", "must not be blank")
    return cleaned


def _check(body: str) -> None:
    found = body_problems(body)
    if found:
        raise found[0]


async def create_template(conn: Conn, church_id: uuid.UUID, *, name: str, body: str) -> Template:
    _check(body)
    try:
        cur = await conn.execute(
            "INSERT INTO message_template (church_id, id, name, body) VALUES (%s, %s, %s, %s) "
            f"RETURNING {_COLS}",
            (church_id, uuid7(), _clean(name), body),
        )
    except errors.UniqueViolation as exc:
        raise Conflict(_TAKEN, field="name") from exc
    row = await cur.fetchone()
    assert row is not None
    return _template(row)


async def get_template(conn: Conn, church_id: uuid.UUID, template_id: uuid.UUID) -> Template:
    """The church's template, or NotFound (another church's id included)."""
    cur = await conn.execute(
        f"SELECT {_COLS} FROM message_template WHERE church_id = %s AND id = %s",
        (church_id, template_id),
    )
    row = await cur.fetchone()
    if row is None:
        raise NotFound("template")
    return _template(row)


@stale_ok
async def list_templates(
    conn: Conn, church_id: uuid.UUID, *, limit: int, cursor: str | None
) -> Page[Template]:
    return await id_page(
        conn,
        f"SELECT {_COLS} FROM message_template",
        church_id,
        limit=limit,
        cursor=cursor,
        row=lambda *r: _template(r),
    )


async def update_template(
    conn: Conn,
    church_id: uuid.UUID,
    template_id: uuid.UUID,
    *,
    name: str | None = None,
    body: str | None = None,
) -> Template:
    if body is not None:
        _check(body)
    try:
        cur = await conn.execute(
            "UPDATE message_template SET name = coalesce(%s, name), body = coalesce(%s, body), "
            f"updated_at = now() WHERE church_id = %s AND id = %s RETURNING {_COLS}",
            (_clean(name) if name is not None else None, body, church_id, template_id),
        )
    except errors.UniqueViolation as exc:
        raise Conflict(_TAKEN, field="name") from exc
    row = await cur.fetchone()
    if row is None:
        raise NotFound("template")
    return _template(row)


async def delete_template(conn: Conn, church_id: uuid.UUID, template_id: uuid.UUID) -> Template:
    """Delete a template; broadcasts sent from it keep their own copy of the body."""
    cur = await conn.execute(
        f"DELETE FROM message_template WHERE church_id = %s AND id = %s RETURNING {_COLS}",
        (church_id, template_id),
    )
    row = await cur.fetchone()
    if row is None:
        raise NotFound("template")
    return _template(row)
