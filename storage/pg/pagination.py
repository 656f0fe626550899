"""Opaque keyset cursors.

A cursor is the sort key of the last row of a page, msgpack-encoded and
base64url'd; it is opaque to clients and carries no tenant data of its own
(every query is scoped by the caller's church before the cursor applies).
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any, Generic, Protocol, TypeVar

import msgspec
from psycopg import AsyncConnection

from storage.domain.errors import InvalidInput


class Cursor(msgspec.Struct, frozen=True, array_like=True):
    at: datetime | None
    id: uuid.UUID


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Cursor)


def encode_cursor(at: datetime | None, id_: uuid.UUID) -> str:
    return base64.urlsafe_b64encode(_encoder.encode(Cursor(at, id_))).decode().rstrip("=")


def decode_cursor(raw: str) -> Cursor:
    try:
        return _decoder.decode(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
    except (ValueError, msgspec.DecodeError) as exc:
        raise InvalidInput("cursor", "not a cursor this API issued") from exc


T = TypeVar("T")


class Page(msgspec.Struct, Generic[T], frozen=True):
    items: list[T]
    next_cursor: str | None


def page_of(
    rows: list[T], limit: int, key: Callable[[T], tuple[datetime | None, uuid.UUID]]
) -> Page[T]:
    """A page from ``limit + 1`` fetched rows: the extra row only says there is more."""
    more = len(rows) > limit
    items = rows[:limit]
    cursor = encode_cursor(*key(items[-1])) if more and items else None
    return Page(items=items, next_cursor=cursor)


class _HasId(Protocol):
    @property
    def id(self) -> uuid.UUID: ...


R = TypeVar("R", bound=_HasId)


async def id_page(
    conn: AsyncConnection[Any],
    select: str,
    church_id: uuid.UUID,
    *,
    limit: int,
    cursor: str | None,
    row: Callable[..., R],
    where: str = "",
    alias: str = "",
) -> Page[R]:
    """One page of a church's rows in id order (UUIDv7: creation order).

    ``select`` is ``SELECT <columns> FROM <table> [alias]`` with no WHERE; ``where``
    adds conditions (``AND ...``) with no parameters; ``row`` builds an item from
    a row's columns.
    """
    qualified = f"{alias}." if alias else ""
    after = decode_cursor(cursor).id if cursor else None
    cur = await conn.execute(
        f"{select} WHERE {qualified}church_id = %s {where} "
        f"AND (%s::uuid IS NULL OR {qualified}id > %s) ORDER BY {qualified}id LIMIT %s",
        (church_id, after, after, limit + 1),
    )
    rows = [row(*r) for r in await cur.fetchall()]
    return page_of(rows, limit, lambda item: (None, item.id))
