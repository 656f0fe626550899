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

from storage.domain import merge_fields
from storage.domain.segments import count_segments
from storage.pg.database import Conn
from storage.pg.freshness import stale_ok
from storage.pg.named_texts import NamedTexts, body_problems
from storage.pg.pagination import Page

__all__ = ["body_problems"]  # re-exported: the API checks bodies with it


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


_TEMPLATES = NamedTexts("message_template", "template", _template)


async def create_template(conn: Conn, church_id: uuid.UUID, *, name: str, body: str) -> Template:
    return await _TEMPLATES.create(conn, church_id, name=name, body=body)


async def get_template(conn: Conn, church_id: uuid.UUID, template_id: uuid.UUID) -> Template:
    """The church's template, or NotFound (another church's id included)."""
    return await _TEMPLATES.get(conn, church_id, template_id)


@stale_ok
async def list_templates(
    conn: Conn, church_id: uuid.UUID, *, limit: int, cursor: str | None
) -> Page[Template]:
    return await _TEMPLATES.page(conn, church_id, limit=limit, cursor=cursor)


async def update_template(
    conn: Conn,
    church_id: uuid.UUID,
    template_id: uuid.UUID,
    *,
    name: str | None = None,
    body: str | None = None,
) -> Template:
    return await _TEMPLATES.update(conn, church_id, template_id, name=name, body=body)


async def delete_template(conn: Conn, church_id: uuid.UUID, template_id: uuid.UUID) -> Template:
    """Delete a template; broadcasts sent from it keep their own copy of the body."""
    return await _TEMPLATES.delete(conn, church_id, template_id)
