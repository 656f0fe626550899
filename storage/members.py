"""Members: people a church texts. Phones are encrypted; lookups use the keyed hash."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import msgspec
from psycopg import errors

from storage.database import Conn
from storage.errors import Conflict, NotFound
from storage.groups import add_members
from storage.ids import uuid7
from storage.pagination import Page, decode_cursor, page_of
from storage.phones import PhoneVault


class Member(msgspec.Struct, frozen=True):
    id: uuid.UUID
    first_name: str
    last_name: str
    phone: str
    email: str | None
    opted_in: bool
    opt_source: str
    opt_changed_at: datetime
    group_ids: list[uuid.UUID]
    created_at: datetime


_COLS = (
    "m.id, m.first_name, m.last_name, m.phone_cipher, m.email, m.opted_in, m.opt_source, "
    "m.opt_changed_at, coalesce((SELECT array_agg(gm.group_id) FROM group_membership gm "
    "  WHERE gm.church_id = m.church_id AND gm.member_id = m.id), '{}'), m.created_at"
)


def _member(vault: PhoneVault, church_id: uuid.UUID, row: tuple[Any, ...]) -> Member:
    phone = vault.decrypt(church_id, bytes(row[3]))
    return Member(
        row[0], row[1], row[2], phone, row[4], row[5], row[6], row[7], list(row[8]), row[9]
    )


async def create_member(
    conn: Conn,
    vault: PhoneVault,
    church_id: uuid.UUID,
    *,
    first_name: str,
    last_name: str,
    phone_e164: str,
    email: str | None,
    group_ids: list[uuid.UUID],
) -> Member:
    member_id = uuid7()
    try:
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO member (church_id, id, first_name, last_name, email, "
                "phone_cipher, phone_hash) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                (
                    church_id,
                    member_id,
                    first_name,
                    last_name,
                    email,
                    vault.encrypt(church_id, phone_e164),
                    vault.lookup_hash(phone_e164),
                ),
            )
            if group_ids:
                await add_members(conn, church_id, group_ids, member_id)
    except errors.UniqueViolation as exc:
        raise Conflict("a member with this phone already exists", field="phone") from exc
    return await get_member(conn, vault, church_id, member_id)


async def get_member(
    conn: Conn, vault: PhoneVault, church_id: uuid.UUID, member_id: uuid.UUID
) -> Member:
    cur = await conn.execute(
        f"SELECT {_COLS} FROM member m WHERE m.church_id = %s AND m.id = %s "
        "AND m.deleted_at IS NULL",
        (church_id, member_id),
    )
    row = await cur.fetchone()
    if row is None:
        raise NotFound("member")
    return _member(vault, church_id, row)


async def list_members(
    conn: Conn, vault: PhoneVault, church_id: uuid.UUID, *, limit: int, cursor: str | None
) -> Page[Member]:
    after = decode_cursor(cursor).id if cursor else None
    cur = await conn.execute(
        f"SELECT {_COLS} FROM member m WHERE m.church_id = %s AND m.deleted_at IS NULL "
        "AND (%s::uuid IS NULL OR m.id > %s) ORDER BY m.id LIMIT %s",
        (church_id, after, after, limit + 1),
    )
    rows = [_member(vault, church_id, r) for r in await cur.fetchall()]
    return page_of(rows, limit, lambda r: (None, r.id))


async def member_by_phone_hash(
    conn: Conn, church_id: uuid.UUID, phone_hash: bytes
) -> tuple[uuid.UUID, bool] | None:
    """(member id, opted in) of the member with this phone, if any."""
    cur = await conn.execute(
        "SELECT id, opted_in FROM member WHERE church_id = %s AND phone_hash = %s "
        "AND deleted_at IS NULL",
        (church_id, phone_hash),
    )
    row = await cur.fetchone()
    return (row[0], row[1]) if row else None


async def update_member(
    conn: Conn,
    vault: PhoneVault,
    church_id: uuid.UUID,
    member_id: uuid.UUID,
    *,
    first_name: str | None = None,
    last_name: str | None = None,
    email: str | msgspec.UnsetType | None = msgspec.UNSET,
    phone_e164: str | None = None,
) -> Member:
    sets = ["first_name = coalesce(%s, first_name)", "last_name = coalesce(%s, last_name)"]
    params: list[Any] = [first_name, last_name]
    if not isinstance(email, msgspec.UnsetType):
        sets.append("email = %s")
        params.append(email)
    if phone_e164 is not None:
        sets += ["phone_cipher = %s", "phone_hash = %s"]
        params += [vault.encrypt(church_id, phone_e164), vault.lookup_hash(phone_e164)]
    try:
        cur = await conn.execute(
            f"UPDATE member SET {', '.join(sets)} WHERE church_id = %s AND id = %s "
            "AND deleted_at IS NULL",
            (*params, church_id, member_id),
        )
    except errors.UniqueViolation as exc:
        raise Conflict("a member with this phone already exists", field="phone") from exc
    if cur.rowcount != 1:
        raise NotFound("member")
    return await get_member(conn, vault, church_id, member_id)


async def erase_member(conn: Conn, church_id: uuid.UUID, member_id: uuid.UUID) -> None:
    """Delete a member: their personal data is erased (name, email, phone, group
    memberships) while the row stays, so past broadcasts keep their recipient
    counts and conversations keep their thread. The phone hash becomes random, so
    the number can join again as a new member."""
    async with conn.transaction():
        cur = await conn.execute(
            "UPDATE member SET first_name = '', last_name = '', email = NULL, "
            "phone_cipher = '\\x', "
            "phone_hash = sha256(convert_to(gen_random_uuid()::text, 'UTF8')), opted_in = false, "
            "opt_source = 'erased', opt_changed_at = now(), deleted_at = now() "
            "WHERE church_id = %s AND id = %s AND deleted_at IS NULL",
            (church_id, member_id),
        )
        if cur.rowcount != 1:
            raise NotFound("member")
        await conn.execute(
            "DELETE FROM group_membership WHERE church_id = %s AND member_id = %s",
            (church_id, member_id),
        )
