"""Churches (tenants), their settings, and their staff users."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, time
from typing import Any

import msgspec
from psycopg import errors

from storage.domain.errors import Conflict, NotFound
from storage.domain.ids import uuid7
from storage.domain.quiet_hours import QuietHours
from storage.pg.database import Conn, Pool


class Church(msgspec.Struct, frozen=True):
    id: uuid.UUID
    name: str
    plan: str
    phone_number: str
    country: str
    timezone: str
    status: str
    created_at: datetime


class StaffUser(msgspec.Struct, frozen=True):
    id: uuid.UUID
    church_id: uuid.UUID
    email: str
    role: str
    created_at: datetime


_CHURCH_COLS = "id, name, plan, phone_number, country, timezone, status, created_at"


async def create_church_with_owner(
    conn: Conn,
    *,
    church_name: str,
    email: str,
    password_hash: str,
    number_prefix: str,
) -> tuple[Church, StaffUser]:
    """Create a church, give it a sending number from the pool, and its owner."""
    church_id = uuid7()
    user_id = uuid7()
    try:
        async with conn.transaction():
            cur = await conn.execute(
                f"INSERT INTO church (id, name, phone_number) "
                f"VALUES (%s, %s, %s || lpad(nextval('sending_number_seq')::text, 7, '0')) "
                f"RETURNING {_CHURCH_COLS}",
                (church_id, church_name, number_prefix),
            )
            row = await cur.fetchone()
            assert row is not None
            church = Church(*row)
            await conn.execute(
                "INSERT INTO church_number_lookup (phone_number, church_id) VALUES (%s, %s)",
                (church.phone_number, church_id),
            )
            cur = await conn.execute(
                "INSERT INTO staff_user (church_id, id, email, password_hash, role) "
                "VALUES (%s, %s, %s, %s, 'owner') RETURNING id, church_id, email, role, created_at",
                (church_id, user_id, email, password_hash),
            )
            urow = await cur.fetchone()
            assert urow is not None
            await claim_staff_email(conn, church_id, user_id, email)
    except errors.UniqueViolation as exc:
        if is_staff_email_taken(exc):
            raise Conflict("an account with this email already exists", field="email") from exc
        raise
    return church, StaffUser(*urow)


async def claim_staff_email(
    conn: Conn, church_id: uuid.UUID, user_id: uuid.UUID, email: str
) -> None:
    """Record a new user's address in the global lookup, in the transaction that makes
    the user: its primary key is what keeps an address to one account across every
    church (``errors.UniqueViolation`` when taken: ``is_staff_email_taken``)."""
    await conn.execute(
        "INSERT INTO staff_email_lookup (email, church_id, user_id) VALUES (lower(%s), %s, %s)",
        (email, church_id, user_id),
    )


def is_staff_email_taken(exc: errors.UniqueViolation) -> bool:
    return exc.diag.constraint_name == "staff_email_lookup_pkey"


async def staff_by_email(conn: Conn, email: str) -> tuple[uuid.UUID, uuid.UUID] | None:
    """(church, user) of the account with this address (any case), from the lookup
    (a reference table under Citus), so that the user's own row is then read by its
    church: one shard, never all of them."""
    cur = await conn.execute(
        "SELECT church_id, user_id FROM staff_email_lookup WHERE email = lower(%s)", (email,)
    )
    row = await cur.fetchone()
    return (row[0], row[1]) if row else None


async def get_church(conn: Conn, church_id: uuid.UUID) -> Church | None:
    cur = await conn.execute(f"SELECT {_CHURCH_COLS} FROM church WHERE id = %s", (church_id,))
    row = await cur.fetchone()
    return Church(*row) if row else None


async def church_by_number(conn: Conn, number: str) -> Church | None:
    """The church whose sending number this is: the lookup first, then the church by
    its id (under Citus one reference read and one single-shard read, where a join
    would ask every shard)."""
    cur = await conn.execute(
        "SELECT church_id FROM church_number_lookup WHERE phone_number = %s", (number,)
    )
    found = await cur.fetchone()
    if found is None:
        return None
    return await get_church(conn, found[0])


async def sending_number(conn: Conn, church_id: uuid.UUID) -> str | None:
    """The number the church's texts go out from; None for an unknown church."""
    cur = await conn.execute("SELECT phone_number FROM church WHERE id = %s", (church_id,))
    row = await cur.fetchone()
    return row[0] if row else None


async def church_plan(conn: Conn, church_id: uuid.UUID) -> tuple[str, int | None] | None:
    """(plan, own requests-per-minute override or None); None for an unknown church."""
    cur = await conn.execute(
        "SELECT plan, rate_limit_per_min FROM church WHERE id = %s", (church_id,)
    )
    row = await cur.fetchone()
    return (row[0], row[1]) if row else None


def plan_loader(pool: Pool) -> Callable[[uuid.UUID], Awaitable[tuple[str, int | None] | None]]:
    """``church_plan`` on a connection of its own, for the request limits in
    storage/redis/rate_limits.py (which hold no pool)."""

    async def load(church_id: uuid.UUID) -> tuple[str, int | None] | None:
        async with pool.connection() as conn:
            return await church_plan(conn, church_id)

    return load


async def user_for_login(conn: Conn, email: str) -> tuple[StaffUser, str] | None:
    found = await staff_by_email(conn, email)
    if found is None:
        return None
    cur = await conn.execute(
        "SELECT id, church_id, email, role, created_at, password_hash FROM staff_user "
        "WHERE church_id = %s AND id = %s",
        found,
    )
    row = await cur.fetchone()
    if row is None:
        return None
    return StaffUser(*row[:5]), row[5]


async def get_user(conn: Conn, church_id: uuid.UUID, user_id: uuid.UUID) -> StaffUser | None:
    cur = await conn.execute(
        "SELECT id, church_id, email, role, created_at FROM staff_user "
        "WHERE church_id = %s AND id = %s",
        (church_id, user_id),
    )
    row = await cur.fetchone()
    return StaffUser(*row) if row else None


# Settings ---------------------------------------------------------------------------


class ChurchSettings(msgspec.Struct, frozen=True):
    """What a church's admins may change, with the fields they cannot (plan, number)."""

    id: uuid.UUID
    name: str
    plan: str
    phone_number: str
    country: str
    timezone: str
    status: str
    help_text: str
    """Answer to HELP / INFO; empty: the built-in text (``keywords.default_help``)."""
    opt_in_text: str
    """Answer to START / UNSTOP / YES; empty: the built-in text."""
    quiet_hours_start: time
    quiet_hours_end: time
    created_at: datetime

    @property
    def quiet_hours(self) -> QuietHours:
        return QuietHours(self.quiet_hours_start, self.quiet_hours_end)


class SettingsChange(msgspec.Struct, frozen=True, kw_only=True):
    """Fields to change; None leaves a field as it is. Validated by the caller."""

    name: str | None = None
    timezone: str | None = None
    country: str | None = None
    help_text: str | None = None
    opt_in_text: str | None = None
    quiet_hours_start: time | None = None
    quiet_hours_end: time | None = None


_SETTINGS_COLS = (
    "id, name, plan, phone_number, country, timezone, status, help_text, opt_in_text, "
    "quiet_hours_start, quiet_hours_end, created_at"
)


async def get_settings(conn: Conn, church_id: uuid.UUID) -> ChurchSettings:
    cur = await conn.execute(f"SELECT {_SETTINGS_COLS} FROM church WHERE id = %s", (church_id,))
    row = await cur.fetchone()
    if row is None:
        raise NotFound("church")
    return ChurchSettings(*row)


async def update_settings(
    conn: Conn, church_id: uuid.UUID, change: SettingsChange
) -> tuple[ChurchSettings, ChurchSettings]:
    """Apply ``change`` under a row lock; returns (before, after). The caller runs
    this inside the transaction that also re-plans held recipients."""
    sets: list[str] = []
    params: list[Any] = []
    for column in (
        "name",
        "timezone",
        "country",
        "help_text",
        "opt_in_text",
        "quiet_hours_start",
        "quiet_hours_end",
    ):
        value = getattr(change, column)
        if value is not None:
            sets.append(f"{column} = %s")
            params.append(value)
    cur = await conn.execute(
        f"SELECT {_SETTINGS_COLS} FROM church WHERE id = %s FOR UPDATE", (church_id,)
    )
    row = await cur.fetchone()
    if row is None:
        raise NotFound("church")
    before = ChurchSettings(*row)
    if not sets:
        return before, before
    cur = await conn.execute(
        f"UPDATE church SET {', '.join(sets)} WHERE id = %s RETURNING {_SETTINGS_COLS}",
        (*params, church_id),
    )
    row = await cur.fetchone()
    assert row is not None
    return before, ChurchSettings(*row)
