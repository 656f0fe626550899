"""Groups of members and their memberships."""

from __future__ import annotations

import uuid
from datetime import datetime

import msgspec

from storage.database import Conn
from storage.errors import NotFound
from storage.ids import uuid7
from storage.pagination import Page, decode_cursor, page_of


class Group(msgspec.Struct, frozen=True):
    id: uuid.UUID
    name: str
    member_count: int
    created_at: datetime


async def create_group(conn: Conn, church_id: uuid.UUID, name: str) -> Group:
    cur = await conn.execute(
        "INSERT INTO member_group (church_id, id, name) VALUES (%s, %s, %s) "
        "RETURNING id, name, 0, created_at",
        (church_id, uuid7(), name),
    )
    row = await cur.fetchone()
    assert row is not None
    return Group(*row)


async def get_group(conn: Conn, church_id: uuid.UUID, group_id: uuid.UUID) -> Group:
    cur = await conn.execute(
        "SELECT g.id, g.name, (SELECT count(*) FROM group_membership gm "
        "  WHERE gm.church_id = g.church_id AND gm.group_id = g.id), g.created_at "
        "FROM member_group g WHERE g.church_id = %s AND g.id = %s",
        (church_id, group_id),
    )
    row = await cur.fetchone()
    if row is None:
        raise NotFound("group")
    return Group(*row)


async def list_groups(
    conn: Conn, church_id: uuid.UUID, *, limit: int, cursor: str | None
) -> Page[Group]:
    after = decode_cursor(cursor).id if cursor else None
    cur = await conn.execute(
        "SELECT g.id, g.name, (SELECT count(*) FROM group_membership gm "
        "  WHERE gm.church_id = g.church_id AND gm.group_id = g.id), g.created_at "
        "FROM member_group g WHERE g.church_id = %s AND (%s::uuid IS NULL OR g.id > %s) "
        "ORDER BY g.id LIMIT %s",
        (church_id, after, after, limit + 1),
    )
    rows = [Group(*r) for r in await cur.fetchall()]
    return page_of(rows, limit, lambda g: (None, g.id))


async def existing_ids(
    conn: Conn, church_id: uuid.UUID, table: str, ids: list[uuid.UUID]
) -> set[uuid.UUID]:
    """Which of ``ids`` exist in the church (``table`` is a trusted constant)."""
    if table not in {"member_group", "member", "branch"}:
        raise ValueError(table)
    extra = " AND deleted_at IS NULL" if table == "member" else ""
    cur = await conn.execute(
        f"SELECT id FROM {table} WHERE church_id = %s AND id = ANY(%s){extra}",
        (church_id, ids),
    )
    return {r[0] for r in await cur.fetchall()}


async def add_members(
    conn: Conn, church_id: uuid.UUID, group_ids: list[uuid.UUID], member_id: uuid.UUID
) -> None:
    await conn.execute(
        "INSERT INTO group_membership (church_id, group_id, member_id) "
        "SELECT %s, g, %s FROM unnest(%s::uuid[]) AS g ON CONFLICT DO NOTHING",
        (church_id, member_id, group_ids),
    )


async def remove_member(
    conn: Conn, church_id: uuid.UUID, group_id: uuid.UUID, member_id: uuid.UUID
) -> bool:
    cur = await conn.execute(
        "DELETE FROM group_membership WHERE church_id = %s AND group_id = %s AND member_id = %s",
        (church_id, group_id, member_id),
    )
    return cur.rowcount == 1
