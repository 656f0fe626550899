"""Staff of a church: people and roles, invitations, password resets.

Roles rank ``staff < admin < owner``. Who may change whom is decided here, in
pure functions (``role_change_refusal``, ``removal_refusal``,
``invitation_refusal``), and applied inside the transaction that makes the
change, with the rows involved locked, so two owners demoting each other at
once cannot leave a church without an owner:

- an owner may do anything, except remove themself or leave the church with no owner;
- an admin may invite staff and admins and grant the staff or admin role, but
  only an owner grants or invites ``owner`` and only an owner changes or removes
  someone who already is an admin or an owner;
- staff manage nobody.

Invitation and reset tokens are random (256 bits) and stored only as SHA-256;
an invitation lives 7 days, a reset 1 hour, and each is used once.

Errors: ``NotFound`` (not in this church), ``Conflict`` (the last owner, an email
that already has an account, yourself), ``InvalidInput`` on ``token`` (unknown,
used or expired), ``NotPermitted`` (the caller's role does not allow it).
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from datetime import datetime, timedelta

import msgspec
from psycopg import errors

from storage.domain.errors import Conflict, InvalidInput, NotFound, StorageError
from storage.domain.ids import uuid7
from storage.pg.churches import StaffUser, claim_staff_email, is_staff_email_taken, staff_by_email
from storage.pg.database import Conn
from storage.pg.pagination import Page, id_page

ROLES: tuple[str, ...] = ("staff", "admin", "owner")
INVITATION_TTL = timedelta(days=7)
RESET_TTL = timedelta(hours=1)


class NotPermitted(StorageError):
    """The caller's role does not allow this change (the edge answers ``forbidden``)."""


class StaffMember(msgspec.Struct, frozen=True):
    id: uuid.UUID
    church_id: uuid.UUID
    email: str
    name: str
    role: str
    created_at: datetime
    last_login_at: datetime | None


class Invitation(msgspec.Struct, frozen=True):
    id: uuid.UUID
    email: str
    role: str
    status: str
    """``pending``, ``accepted``, ``revoked`` or ``expired``."""
    invited_by: uuid.UUID | None
    created_at: datetime
    expires_at: datetime
    accepted_at: datetime | None
    revoked_at: datetime | None


_MEMBER_COLS = "id, church_id, email, name, role, created_at, last_login_at"
_USER_COLS = "id, church_id, email, role, created_at"
_INVITATION_COLS = (
    "id, email, role, CASE WHEN accepted_at IS NOT NULL THEN 'accepted' "
    "WHEN revoked_at IS NOT NULL THEN 'revoked' WHEN expires_at <= now() THEN 'expired' "
    "ELSE 'pending' END, invited_by, created_at, expires_at, accepted_at, revoked_at"
)


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def new_token() -> str:
    return secrets.token_urlsafe(32)


# -- who may do what ----------------------------------------------------------


def role_change_refusal(actor_role: str, current: str, new: str) -> str | None:
    """Why ``actor_role`` may not move someone from ``current`` to ``new`` (None: it may)."""
    if actor_role == "owner":
        return None
    if actor_role != "admin":
        return "only an admin or owner can change roles"
    if new == "owner" or current == "owner":
        return "only an owner can grant or take away the owner role"
    if current == "admin" and new != "admin":
        return "only an owner can change an admin's role"
    return None


def removal_refusal(actor_role: str, target_role: str) -> str | None:
    if actor_role == "owner":
        return None
    if actor_role != "admin":
        return "only an admin or owner can remove staff"
    if target_role in ("admin", "owner"):
        return "only an owner can remove an admin or owner"
    return None


def invitation_refusal(actor_role: str, role: str) -> str | None:
    if actor_role == "owner":
        return None
    if actor_role != "admin":
        return "only an admin or owner can invite staff"
    if role == "owner":
        return "only an owner can invite an owner"
    return None


# -- staff users -----------------------------------------------------------------


async def list_staff(
    conn: Conn, church_id: uuid.UUID, *, limit: int, cursor: str | None
) -> Page[StaffMember]:
    return await id_page(
        conn,
        f"SELECT {_MEMBER_COLS} FROM staff_user",
        church_id,
        limit=limit,
        cursor=cursor,
        row=StaffMember,
    )


async def get_staff(conn: Conn, church_id: uuid.UUID, user_id: uuid.UUID) -> StaffMember:
    cur = await conn.execute(
        f"SELECT {_MEMBER_COLS} FROM staff_user WHERE church_id = %s AND id = %s",
        (church_id, user_id),
    )
    row = await cur.fetchone()
    if row is None:
        raise NotFound("staff user")
    return StaffMember(*row)


async def _lock_owners_and(
    conn: Conn, church_id: uuid.UUID, user_id: uuid.UUID
) -> dict[uuid.UUID, str]:
    """Lock the church's owners and the target, always in id order (no deadlocks
    between two changes); returns their roles by id."""
    cur = await conn.execute(
        "SELECT id, role FROM staff_user WHERE church_id = %s AND (role = 'owner' OR id = %s) "
        "ORDER BY id FOR UPDATE",
        (church_id, user_id),
    )
    return {row[0]: row[1] for row in await cur.fetchall()}


def _keeps_an_owner(roles: dict[uuid.UUID, str], user_id: uuid.UUID) -> bool:
    return any(role == "owner" for uid, role in roles.items() if uid != user_id)


async def change_role(
    conn: Conn, church_id: uuid.UUID, user_id: uuid.UUID, role: str, *, actor_role: str
) -> tuple[StaffMember, str]:
    """Give a user another role; returns the user and the role they had."""
    if role not in ROLES:
        raise InvalidInput("role", f"must be one of {', '.join(ROLES)}")
    async with conn.transaction():
        roles = await _lock_owners_and(conn, church_id, user_id)
        current = roles.get(user_id)
        if current is None:
            raise NotFound("staff user")
        refusal = role_change_refusal(actor_role, current, role)
        if refusal:
            raise NotPermitted(refusal)
        if current == "owner" and role != "owner" and not _keeps_an_owner(roles, user_id):
            raise Conflict(
                "the last owner cannot be demoted; make someone else owner first", "role"
            )
        cur = await conn.execute(
            f"UPDATE staff_user SET role = %s WHERE church_id = %s AND id = %s "
            f"RETURNING {_MEMBER_COLS}",
            (role, church_id, user_id),
        )
        row = await cur.fetchone()
    assert row is not None
    return StaffMember(*row), current


async def remove_staff(
    conn: Conn,
    church_id: uuid.UUID,
    user_id: uuid.UUID,
    *,
    actor_id: uuid.UUID | None,
    actor_role: str,
) -> StaffMember:
    """Delete a user of this church (their reset tokens go with them; the caller
    ends their sessions)."""
    async with conn.transaction():
        roles = await _lock_owners_and(conn, church_id, user_id)
        current = roles.get(user_id)
        if current is None:
            raise NotFound("staff user")
        if user_id == actor_id:
            raise Conflict("you cannot remove yourself")
        refusal = removal_refusal(actor_role, current)
        if refusal:
            raise NotPermitted(refusal)
        if current == "owner" and not _keeps_an_owner(roles, user_id):
            raise Conflict("the last owner cannot be removed")
        cur = await conn.execute(
            f"DELETE FROM staff_user WHERE church_id = %s AND id = %s RETURNING {_MEMBER_COLS}",
            (church_id, user_id),
        )
        row = await cur.fetchone()
        # The address is free again: it may be invited or sign up anew.
        await conn.execute(
            "DELETE FROM staff_email_lookup WHERE church_id = %s AND user_id = %s",
            (church_id, user_id),
        )
    assert row is not None
    return StaffMember(*row)


async def set_name(conn: Conn, church_id: uuid.UUID, user_id: uuid.UUID, name: str) -> StaffMember:
    cur = await conn.execute(
        "UPDATE staff_user SET name = %s WHERE church_id = %s AND id = %s "
        f"RETURNING {_MEMBER_COLS}",
        (name, church_id, user_id),
    )
    row = await cur.fetchone()
    if row is None:
        raise NotFound("staff user")
    return StaffMember(*row)


async def record_login(conn: Conn, church_id: uuid.UUID, user_id: uuid.UUID) -> None:
    await conn.execute(
        "UPDATE staff_user SET last_login_at = now() WHERE church_id = %s AND id = %s",
        (church_id, user_id),
    )


async def password_hash_of(conn: Conn, church_id: uuid.UUID, user_id: uuid.UUID) -> str:
    cur = await conn.execute(
        "SELECT password_hash FROM staff_user WHERE church_id = %s AND id = %s",
        (church_id, user_id),
    )
    row = await cur.fetchone()
    if row is None:
        raise NotFound("staff user")
    return str(row[0])


async def set_password(
    conn: Conn, church_id: uuid.UUID, user_id: uuid.UUID, password_hash: str
) -> None:
    """Store a new password hash; reset links the user still holds stop working."""
    async with conn.transaction():
        await _set_password(conn, church_id, user_id, password_hash)


async def _set_password(
    conn: Conn, church_id: uuid.UUID, user_id: uuid.UUID, password_hash: str
) -> None:
    cur = await conn.execute(
        "UPDATE staff_user SET password_hash = %s, password_changed_at = now() "
        "WHERE church_id = %s AND id = %s",
        (password_hash, church_id, user_id),
    )
    if cur.rowcount == 0:
        raise NotFound("staff user")
    await conn.execute(
        "UPDATE password_reset SET used_at = now() "
        "WHERE church_id = %s AND user_id = %s AND used_at IS NULL",
        (church_id, user_id),
    )


# -- invitations -----------------------------------------------------------------


async def create_invitation(
    conn: Conn,
    church_id: uuid.UUID,
    *,
    email: str,
    role: str,
    invited_by: uuid.UUID | None,
    actor_role: str,
) -> tuple[Invitation, str]:
    """Invite ``email`` with ``role``; returns the invitation and its token (never
    stored). Inviting an address again replaces its pending invitation."""
    if role not in ROLES:
        raise InvalidInput("role", f"must be one of {', '.join(ROLES)}")
    refusal = invitation_refusal(actor_role, role)
    if refusal:
        raise NotPermitted(refusal)
    token = new_token()
    async with conn.transaction():
        if await staff_by_email(conn, email) is not None:
            raise Conflict("an account with this email already exists", field="email")
        await conn.execute(
            "UPDATE staff_invitation SET revoked_at = now() WHERE church_id = %s "
            "AND lower(email) = lower(%s) AND accepted_at IS NULL AND revoked_at IS NULL",
            (church_id, email),
        )
        cur = await conn.execute(
            "INSERT INTO staff_invitation (church_id, id, email, role, token_hash, invited_by, "
            "expires_at) VALUES (%s, %s, %s, %s, %s, %s, now() + %s) "
            f"RETURNING {_INVITATION_COLS}",
            (church_id, uuid7(), email, role, token_digest(token), invited_by, INVITATION_TTL),
        )
        row = await cur.fetchone()
    assert row is not None
    return Invitation(*row), token


async def list_invitations(
    conn: Conn, church_id: uuid.UUID, *, limit: int, cursor: str | None
) -> Page[Invitation]:
    """Pending invitations: not accepted, not revoked, not expired."""
    return await id_page(
        conn,
        f"SELECT {_INVITATION_COLS} FROM staff_invitation",
        church_id,
        limit=limit,
        cursor=cursor,
        row=Invitation,
        where="AND accepted_at IS NULL AND revoked_at IS NULL AND expires_at > now()",
    )


async def revoke_invitation(
    conn: Conn, church_id: uuid.UUID, invitation_id: uuid.UUID, *, actor_role: str
) -> Invitation:
    """Revoke an invitation (idempotent); an accepted one is a conflict."""
    async with conn.transaction():
        cur = await conn.execute(
            "SELECT role, accepted_at IS NOT NULL FROM staff_invitation "
            "WHERE church_id = %s AND id = %s FOR UPDATE",
            (church_id, invitation_id),
        )
        found = await cur.fetchone()
        if found is None:
            raise NotFound("invitation")
        refusal = invitation_refusal(actor_role, found[0])
        if refusal:
            raise NotPermitted(refusal)
        if found[1]:
            raise Conflict("this invitation was already accepted; remove the user instead")
        cur = await conn.execute(
            "UPDATE staff_invitation SET revoked_at = coalesce(revoked_at, now()) "
            f"WHERE church_id = %s AND id = %s RETURNING {_INVITATION_COLS}",
            (church_id, invitation_id),
        )
        row = await cur.fetchone()
    assert row is not None
    return Invitation(*row)


async def accept_invitation(conn: Conn, token: str, *, password_hash: str, name: str) -> StaffUser:
    """Use an invitation: the user it names joins its church with its role."""
    user_id = uuid7()
    try:
        async with conn.transaction():
            cur = await conn.execute(
                "UPDATE staff_invitation SET accepted_at = now(), accepted_user_id = %s "
                "WHERE token_hash = %s AND accepted_at IS NULL AND revoked_at IS NULL "
                "AND expires_at > now() RETURNING church_id, email, role",
                (user_id, token_digest(token)),
            )
            found = await cur.fetchone()
            if found is None:
                raise InvalidInput("token", "this invitation is unknown, used, revoked or expired")
            church_id, email, role = found
            cur = await conn.execute(
                "INSERT INTO staff_user (church_id, id, email, password_hash, role, name, "
                "last_login_at) VALUES (%s, %s, %s, %s, %s, %s, now()) "
                f"RETURNING {_USER_COLS}",
                (church_id, user_id, email, password_hash, role, name),
            )
            row = await cur.fetchone()
            await claim_staff_email(conn, church_id, user_id, email)
    except errors.UniqueViolation as exc:
        if is_staff_email_taken(exc):
            raise Conflict("an account with this email already exists", field="email") from exc
        raise
    assert row is not None
    return StaffUser(*row)


# -- password resets ---------------------------------------------------------------


class ResetTicket(msgspec.Struct, frozen=True):
    church_id: uuid.UUID
    user_id: uuid.UUID
    email: str
    token: str


async def create_password_reset(conn: Conn, email: str) -> ResetTicket | None:
    """A reset token for the account with ``email``, or None when there is none."""
    account = await staff_by_email(conn, email)
    if account is None:
        return None
    cur = await conn.execute(
        "SELECT church_id, id, email FROM staff_user WHERE church_id = %s AND id = %s", account
    )
    found = await cur.fetchone()
    if found is None:
        return None
    token = new_token()
    await conn.execute(
        "INSERT INTO password_reset (church_id, id, user_id, token_hash, expires_at) "
        "VALUES (%s, %s, %s, %s, now() + %s)",
        (found[0], uuid7(), found[1], token_digest(token), RESET_TTL),
    )
    return ResetTicket(church_id=found[0], user_id=found[1], email=found[2], token=token)


async def confirm_password_reset(
    conn: Conn, token: str, password_hash: str
) -> tuple[uuid.UUID, uuid.UUID]:
    """Use a reset token to set a new password; returns (church id, user id). Every
    other reset token of that user stops working too."""
    async with conn.transaction():
        cur = await conn.execute(
            "UPDATE password_reset SET used_at = now() WHERE token_hash = %s "
            "AND used_at IS NULL AND expires_at > now() RETURNING church_id, user_id",
            (token_digest(token),),
        )
        found = await cur.fetchone()
        if found is None:
            raise InvalidInput("token", "this reset link is unknown, used or expired")
        await _set_password(conn, found[0], found[1], password_hash)
    return found[0], found[1]
