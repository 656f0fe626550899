"""Groups of members and their memberships.

A group's ``member_count`` counts its memberships (erased members have none).
The API serves groups through the ``groups`` cache topic; every write that
changes a group or a membership is followed by ``invalidate(church, "groups")``
once its transaction has committed.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import msgspec
from psycopg import errors

from storage.domain.errors import NotFound
from storage.domain.ids import uuid7
from storage.pg.database import Conn
from storage.pg.freshness import stale_ok
from storage.pg.pagination import Page, id_page

CACHE_TOPIC = "groups"


class Group(msgspec.Struct, frozen=True):
    id: uuid.UUID
    name: str
    member_count: int
    created_at: datetime
    branch_id: uuid.UUID | None = None


_COLS = (
    "g.id, g.name, (SELECT count(*) FROM group_membership gm "
    "  WHERE gm.church_id = g.church_id AND gm.group_id = g.id), g.created_at, g.branch_id"
)


def _group(row: tuple[Any, ...]) -> Group:
    return Group(row[0], row[1], int(row[2]), row[3], row[4])


async def create_group(
    conn: Conn, church_id: uuid.UUID, name: str, *, branch_id: uuid.UUID | None = None
) -> Group:
    try:
        cur = await conn.execute(
            "INSERT INTO member_group (church_id, id, name, branch_id) VALUES (%s, %s, %s, %s) "
            "RETURNING id, name, 0, created_at, branch_id",
            (church_id, uuid7(), name, branch_id),
        )
    except errors.ForeignKeyViolation as exc:
        raise NotFound("branch") from exc
    row = await cur.fetchone()
    assert row is not None
    return _group(row)


async def get_group(conn: Conn, church_id: uuid.UUID, group_id: uuid.UUID) -> Group:
    cur = await conn.execute(
        f"SELECT {_COLS} FROM member_group g WHERE g.church_id = %s AND g.id = %s",
        (church_id, group_id),
    )
    row = await cur.fetchone()
    if row is None:
        raise NotFound("group")
    return _group(row)


@stale_ok
async def list_groups(
    conn: Conn, church_id: uuid.UUID, *, limit: int, cursor: str | None
) -> Page[Group]:
    return await id_page(
        conn,
        f"SELECT {_COLS} FROM member_group g",
        church_id,
        limit=limit,
        cursor=cursor,
        row=lambda *r: _group(r),
        alias="g",
    )


async def update_group(
    conn: Conn,
    church_id: uuid.UUID,
    group_id: uuid.UUID,
    *,
    name: str | None = None,
    branch_id: uuid.UUID | msgspec.UnsetType | None = msgspec.UNSET,
) -> Group:
    sets = ["name = coalesce(%s, name)"]
    params: list[Any] = [name]
    if not isinstance(branch_id, msgspec.UnsetType):
        sets.append("branch_id = %s")
        params.append(branch_id)
    try:
        cur = await conn.execute(
            f"UPDATE member_group SET {', '.join(sets)} WHERE church_id = %s AND id = %s",
            (*params, church_id, group_id),
        )
    except errors.ForeignKeyViolation as exc:
        raise NotFound("branch") from exc
    if cur.rowcount != 1:
        raise NotFound("group")
    return await get_group(conn, church_id, group_id)


async def delete_group(conn: Conn, church_id: uuid.UUID, group_id: uuid.UUID) -> Group:
    """Delete a group and its memberships (the members stay). Broadcasts already
    accepted keep their recipient count and recipients; their stored target
    still names the group's id."""
    async with conn.transaction():
        group = await get_group(conn, church_id, group_id)
        await conn.execute(
            "DELETE FROM member_group WHERE church_id = %s AND id = %s", (church_id, group_id)
        )
    return group


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


async def add_memberships(
    conn: Conn, church_id: uuid.UUID, pairs: list[tuple[uuid.UUID, uuid.UUID]]
) -> None:
    """Add (group id, member id) pairs in one statement; existing ones stay."""
    if not pairs:
        return
    await conn.execute(
        "INSERT INTO group_membership (church_id, group_id, member_id) "
        "SELECT %s, p.g, p.m FROM unnest(%s::uuid[], %s::uuid[]) AS p(g, m) "
        "ON CONFLICT DO NOTHING",
        (church_id, [g for g, _ in pairs], [m for _, m in pairs]),
    )


async def remove_member(
    conn: Conn, church_id: uuid.UUID, group_id: uuid.UUID, member_id: uuid.UUID
) -> bool:
    cur = await conn.execute(
        "DELETE FROM group_membership WHERE church_id = %s AND group_id = %s AND member_id = %s",
        (church_id, group_id, member_id),
    )
    return cur.rowcount == 1


async def group_ids_for_names(
    conn: Conn, church_id: uuid.UUID, names: Iterable[str]
) -> dict[str, uuid.UUID]:
    """The id of the group named each of ``names`` (case-insensitively), creating
    the missing ones; keys are the lower-cased names. Call inside a transaction:
    a transaction-scoped advisory lock per name keeps two concurrent imports from
    creating the same group twice."""
    wanted: dict[str, str] = {}
    for name in names:
        if name.strip():
            wanted.setdefault(name.strip().lower(), name.strip())  # the first spelling wins
    if not wanted:
        return {}
    found = await _groups_named(conn, church_id, list(wanted))
    for lowered, name in wanted.items():
        if lowered in found:
            continue
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
            (f"group-name:{church_id}:{lowered}",),
        )
        again = await _groups_named(conn, church_id, [lowered])
        if lowered in again:
            found[lowered] = again[lowered]
            continue
        found[lowered] = (await create_group(conn, church_id, name)).id
    return found


async def _groups_named(
    conn: Conn, church_id: uuid.UUID, lowered: list[str]
) -> dict[str, uuid.UUID]:
    cur = await conn.execute(
        "SELECT DISTINCT ON (lower(name)) lower(name), id FROM member_group "
        "WHERE church_id = %s AND lower(name) = ANY(%s) ORDER BY lower(name), id",
        (church_id, lowered),
    )
    return {r[0]: r[1] for r in await cur.fetchall()}
