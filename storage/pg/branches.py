"""Branches: a church's campuses or sites. Groups and members may belong to one."""

from __future__ import annotations

import uuid
from datetime import datetime

import msgspec
from psycopg import errors

from storage.domain.errors import Conflict, InvalidInput, NotFound
from storage.domain.ids import uuid7
from storage.pg.database import Conn
from storage.pg.freshness import stale_ok
from storage.pg.pagination import Page, id_page


class Branch(msgspec.Struct, frozen=True):
    id: uuid.UUID
    name: str
    created_at: datetime


_TAKEN = "a branch with this name already exists"


def _clean(name: str) -> str:
    cleaned = name.strip()
    if not cleaned:
        raise InvalidInput("name", "must not be blank")
    return cleaned


async def create_branch(conn: Conn, church_id: uuid.UUID, name: str) -> Branch:
    try:
        cur = await conn.execute(
            "INSERT INTO branch (church_id, id, name) VALUES (%s, %s, %s) "
            "RETURNING id, name, created_at",
            (church_id, uuid7(), _clean(name)),
        )
    except errors.UniqueViolation as exc:
        raise Conflict(_TAKEN, field="name") from exc
    row = await cur.fetchone()
    assert row is not None
    return Branch(*row)


async def get_branch(conn: Conn, church_id: uuid.UUID, branch_id: uuid.UUID) -> Branch:
    cur = await conn.execute(
        "SELECT id, name, created_at FROM branch WHERE church_id = %s AND id = %s",
        (church_id, branch_id),
    )
    row = await cur.fetchone()
    if row is None:
        raise NotFound("branch")
    return Branch(*row)


@stale_ok
async def list_branches(
    conn: Conn, church_id: uuid.UUID, *, limit: int, cursor: str | None
) -> Page[Branch]:
    return await id_page(
        conn,
        "SELECT id, name, created_at FROM branch",
        church_id,
        limit=limit,
        cursor=cursor,
        row=Branch,
    )


async def rename_branch(
    conn: Conn, church_id: uuid.UUID, branch_id: uuid.UUID, name: str
) -> Branch:
    try:
        cur = await conn.execute(
            "UPDATE branch SET name = %s WHERE church_id = %s AND id = %s "
            "RETURNING id, name, created_at",
            (_clean(name), church_id, branch_id),
        )
    except errors.UniqueViolation as exc:
        raise Conflict(_TAKEN, field="name") from exc
    row = await cur.fetchone()
    if row is None:
        raise NotFound("branch")
    return Branch(*row)


async def delete_branch(conn: Conn, church_id: uuid.UUID, branch_id: uuid.UUID) -> Branch:
    """Delete a branch no group or member belongs to.

    A branch still in use is refused with ``Conflict`` rather than detached:
    detaching would silently change who a ``branch_ids`` broadcast reaches and
    lose the campus of every member in it, while refusing leaves the choice
    (move the people, or detach them with ``branch_id: null``) to staff.
    Erased members keep no branch, so they never hold one in use.
    """
    async with conn.transaction():
        branch = await get_branch(conn, church_id, branch_id)
        cur = await conn.execute(
            "SELECT (SELECT count(*) FROM member_group WHERE church_id = %s AND branch_id = %s), "
            "(SELECT count(*) FROM member WHERE church_id = %s AND branch_id = %s "
            " AND deleted_at IS NULL)",
            (church_id, branch_id, church_id, branch_id),
        )
        row = await cur.fetchone()
        groups, members = (int(row[0]), int(row[1])) if row else (0, 0)
        if groups or members:
            raise Conflict(
                f"the branch still has {groups} group(s) and {members} member(s); "
                "move them to another branch or set their branch_id to null first",
                field="id",
            )
        try:
            # A group or member saved into the branch meanwhile fails the foreign key.
            await conn.execute(
                "DELETE FROM branch WHERE church_id = %s AND id = %s", (church_id, branch_id)
            )
        except errors.ForeignKeyViolation as exc:
            raise Conflict("the branch is in use", field="id") from exc
    return branch


async def branch_ids_by_name(conn: Conn, church_id: uuid.UUID) -> dict[str, uuid.UUID]:
    """Every branch of the church by lower-cased name (a church has a handful)."""
    cur = await conn.execute(
        "SELECT lower(name), id FROM branch WHERE church_id = %s", (church_id,)
    )
    return {r[0]: r[1] for r in await cur.fetchall()}
