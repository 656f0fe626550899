"""A church's named texts with merge fields: message templates (broadcasts) and
canned replies (the inbox) are the same kind of row in two tables, each listed where
it is chosen from. One store serves both.

Merge fields are checked when a text is saved (``body_problems``), so a text that
can be saved can always be sent.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

from psycopg import errors

from storage.domain import merge_fields
from storage.domain.errors import Conflict, InvalidInput, NotFound
from storage.domain.ids import uuid7
from storage.pg.database import Conn
from storage.pg.pagination import Page, id_page


class _Named(Protocol):
    @property
    def id(self) -> uuid.UUID: ...


T = TypeVar("T", bound=_Named)

_COLS = "id, name, body, created_at, updated_at"


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


class NamedTexts(Generic[T]):
    """The rows of ``table`` (church_id, id, name unique per church, body,
    created_at, updated_at) as ``T``, built by ``make`` from ``(id, name, body,
    created_at, updated_at)``; ``noun`` names one in errors."""

    def __init__(self, table: str, noun: str, make: Callable[[tuple[Any, ...]], T]) -> None:
        self._table = table  # a constant of this code, never input
        self._noun = noun
        self._make = make
        self._taken = f"a {noun} with this name already exists"

    def _sql(self, text: str) -> str:
        return text.format(table=self._table, cols=_COLS)

    async def _one(self, conn: Conn, query: str, params: tuple[Any, ...]) -> T:
        try:
            cur = await conn.execute(query, params)
        except errors.UniqueViolation as exc:
            raise Conflict(self._taken, field="name") from exc
        row = await cur.fetchone()
        if row is None:
            raise NotFound(self._noun)
        return self._make(row)

    async def create(self, conn: Conn, church_id: uuid.UUID, *, name: str, body: str) -> T:
        _check(body)
        return await self._one(
            conn,
            self._sql(
                "INSERT INTO {table} (church_id, id, name, body) VALUES (%s, %s, %s, %s) "
                "RETURNING {cols}"
            ),
            (church_id, uuid7(), _clean(name), body),
        )

    async def get(self, conn: Conn, church_id: uuid.UUID, text_id: uuid.UUID) -> T:
        """The church's row, or NotFound (another church's id included)."""
        return await self._one(
            conn,
            self._sql("SELECT {cols} FROM {table} WHERE church_id = %s AND id = %s"),
            (church_id, text_id),
        )

    async def page(
        self, conn: Conn, church_id: uuid.UUID, *, limit: int, cursor: str | None
    ) -> Page[T]:
        return await id_page(
            conn,
            self._sql("SELECT {cols} FROM {table}"),
            church_id,
            limit=limit,
            cursor=cursor,
            row=lambda *r: self._make(r),
        )

    async def update(
        self,
        conn: Conn,
        church_id: uuid.UUID,
        text_id: uuid.UUID,
        *,
        name: str | None = None,
        body: str | None = None,
    ) -> T:
        if body is not None:
            _check(body)
        return await self._one(
            conn,
            self._sql(
                "UPDATE {table} SET name = coalesce(%s, name), body = coalesce(%s, body), "
                "updated_at = now() WHERE church_id = %s AND id = %s RETURNING {cols}"
            ),
            (_clean(name) if name is not None else None, body, church_id, text_id),
        )

    async def delete(self, conn: Conn, church_id: uuid.UUID, text_id: uuid.UUID) -> T:
        return await self._one(
            conn,
            self._sql("DELETE FROM {table} WHERE church_id = %s AND id = %s RETURNING {cols}"),
            (church_id, text_id),
        )
