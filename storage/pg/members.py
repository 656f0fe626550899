"""Members: people a church texts. Phones are encrypted; lookups use the keyed hash.

Opt-in state is consent: ``opted_in`` with the ``opt_source`` that set it
(``keyword`` for STOP/START texts, ``staff`` and ``api`` for the REST API by a
session or an API key, ``import`` for CSV imports, ``inbound`` for people who
texted first) and ``opt_changed_at``. Every state is also kept in
``member_opt_event`` (written by a trigger), which the data export shows.

Every change records its webhook event (``member.created``, ``member.updated``,
``member.opted_out``, ``member.opted_in``) in the same transaction.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

import msgspec
from psycopg import errors

from storage.domain.errors import Conflict, NotFound
from storage.domain.events import (
    MemberChanged,
    MemberCreatedEvent,
    MemberEvent,
    MemberOptChanged,
    MemberOptedInEvent,
    MemberOptedOutEvent,
    MemberUpdatedEvent,
)
from storage.domain.ids import uuid7
from storage.domain.phones import PhoneVault
from storage.pg.archive_index import record_erasure
from storage.pg.database import Conn
from storage.pg.event_log import append
from storage.pg.freshness import stale_ok
from storage.pg.groups import add_members
from storage.pg.pagination import Page, decode_cursor, page_of

OptSource = Literal["keyword", "staff", "api", "import"]


class Member(msgspec.Struct, frozen=True):
    id: uuid.UUID
    first_name: str
    last_name: str
    phone: str
    email: str | None
    opted_in: bool
    opt_source: str
    """keyword | staff | api | import (inbound: texted first, never opted in or out)."""
    opt_changed_at: datetime
    group_ids: list[uuid.UUID]
    created_at: datetime
    branch_id: uuid.UUID | None = None


_COLS = (
    "m.id, m.first_name, m.last_name, m.phone_cipher, m.email, m.opted_in, m.opt_source, "
    "m.opt_changed_at, coalesce((SELECT array_agg(gm.group_id ORDER BY gm.group_id) "
    "  FROM group_membership gm WHERE gm.church_id = m.church_id AND gm.member_id = m.id), "
    "'{}'), m.created_at, m.branch_id"
)


def _member(vault: PhoneVault, church_id: uuid.UUID, row: tuple[Any, ...]) -> Member:
    phone = vault.decrypt(church_id, bytes(row[3]))
    return Member(
        row[0],
        row[1],
        row[2],
        phone,
        row[4],
        row[5],
        row[6],
        row[7],
        list(row[8]),
        row[9],
        row[10],
    )


async def member_event(conn: Conn, church_id: uuid.UUID, event: MemberEvent) -> None:
    """Log a ``member.*`` event (created, updated, opted_out, opted_in) for webhooks."""
    await append(conn, [(church_id, (), event)])


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
    branch_id: uuid.UUID | None = None,
    opt_source: str = "staff",
) -> Member:
    member_id = uuid7()
    try:
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO member (church_id, id, first_name, last_name, email, "
                "phone_cipher, phone_hash, branch_id, opt_source) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    church_id,
                    member_id,
                    first_name,
                    last_name,
                    email,
                    vault.encrypt(church_id, phone_e164),
                    vault.lookup_hash(phone_e164),
                    branch_id,
                    opt_source,
                ),
            )
            if group_ids:
                await add_members(conn, church_id, group_ids, member_id)
            await member_event(conn, church_id, MemberCreatedEvent.new(MemberChanged(member_id)))
    except errors.UniqueViolation as exc:
        raise Conflict("a member with this phone already exists", field="phone") from exc
    except errors.ForeignKeyViolation as exc:
        raise NotFound("branch" if branch_id else "group") from exc
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


class MemberFilter(msgspec.Struct, frozen=True):
    name: str | None = None
    """Case-insensitive substring of the first, last or full name."""
    phone_hash: bytes | None = None
    """Exact phone, by its lookup hash."""
    group_id: uuid.UUID | None = None
    branch_id: uuid.UUID | None = None
    opted_in: bool | None = None


def _like(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


@stale_ok
async def list_members(
    conn: Conn,
    vault: PhoneVault,
    church_id: uuid.UUID,
    *,
    limit: int,
    cursor: str | None,
    where: MemberFilter | None = None,
) -> Page[Member]:
    """Members in id order (UUIDv7: creation order), keyset-paged: a member
    created while a client pages gets a larger id, so no page skips or repeats
    anyone. Name search scans the church's members (no trigram index in the
    embedded Postgres); phone search is one index lookup."""
    f = where or MemberFilter()
    after = decode_cursor(cursor).id if cursor else None
    clauses = ["m.church_id = %s", "m.deleted_at IS NULL"]
    params: list[Any] = [church_id]
    if after is not None:
        clauses.append("m.id > %s")
        params.append(after)
    if f.phone_hash is not None:
        clauses.append("m.phone_hash = %s")
        params.append(f.phone_hash)
    if f.name:
        clauses.append(
            "(m.first_name ILIKE %s OR m.last_name ILIKE %s "
            "OR (m.first_name || ' ' || m.last_name) ILIKE %s)"
        )
        params += [_like(f.name)] * 3
    if f.group_id is not None:
        clauses.append(
            "EXISTS (SELECT 1 FROM group_membership gm WHERE gm.church_id = m.church_id "
            "AND gm.group_id = %s AND gm.member_id = m.id)"
        )
        params.append(f.group_id)
    if f.branch_id is not None:
        clauses.append("m.branch_id = %s")
        params.append(f.branch_id)
    if f.opted_in is not None:
        clauses.append("m.opted_in = %s")
        params.append(f.opted_in)
    cur = await conn.execute(
        f"SELECT {_COLS} FROM member m WHERE {' AND '.join(clauses)} ORDER BY m.id LIMIT %s",
        (*params, limit + 1),
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


async def create_inbound_member(
    conn: Conn, vault: PhoneVault, church_id: uuid.UUID, phone: str
) -> uuid.UUID:
    """The member for someone who texted first: no name, unverified, opt source
    ``inbound`` (never opted in or out); returns the new id. Runs in the caller's
    transaction, the one that stores the inbound text."""
    member_id = uuid7()
    await conn.execute(
        "INSERT INTO member (church_id, id, first_name, phone_cipher, phone_hash, "
        "verified, opt_source) VALUES (%s, %s, '', %s, %s, false, 'inbound')",
        (church_id, member_id, vault.encrypt(church_id, phone), vault.lookup_hash(phone)),
    )
    return member_id


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
    branch_id: uuid.UUID | msgspec.UnsetType | None = msgspec.UNSET,
) -> Member:
    sets = ["first_name = coalesce(%s, first_name)", "last_name = coalesce(%s, last_name)"]
    params: list[Any] = [first_name, last_name]
    if not isinstance(email, msgspec.UnsetType):
        sets.append("email = %s")
        params.append(email)
    if phone_e164 is not None:
        sets += ["phone_cipher = %s", "phone_hash = %s"]
        params += [vault.encrypt(church_id, phone_e164), vault.lookup_hash(phone_e164)]
    if not isinstance(branch_id, msgspec.UnsetType):
        sets.append("branch_id = %s")
        params.append(branch_id)
    try:
        async with conn.transaction():
            cur = await conn.execute(
                f"UPDATE member SET {', '.join(sets)} WHERE church_id = %s AND id = %s "
                "AND deleted_at IS NULL",
                (*params, church_id, member_id),
            )
            if cur.rowcount != 1:
                raise NotFound("member")
            await member_event(conn, church_id, MemberUpdatedEvent.new(MemberChanged(member_id)))
    except errors.UniqueViolation as exc:
        raise Conflict("a member with this phone already exists", field="phone") from exc
    except errors.ForeignKeyViolation as exc:
        raise NotFound("branch") from exc
    return await get_member(conn, vault, church_id, member_id)


async def set_opt_in(
    conn: Conn,
    vault: PhoneVault,
    church_id: uuid.UUID,
    member_id: uuid.UUID,
    *,
    opted_in: bool,
    source: str,
) -> Member:
    """Opt a member in or out. Already in that state: nothing changes (no event,
    the recorded source and time stay those of the consent that set it).

    Someone who texted STOP can only opt back in themselves (START, UNSTOP, YES):
    carriers and the TCPA treat a keyword opt-out as binding on the sender, so a
    staff or API opt-in of such a member is a ``Conflict``.
    """
    async with conn.transaction():
        if opted_in and source != "keyword":
            cur = await conn.execute(
                "SELECT opted_in, opt_source FROM member "
                "WHERE church_id = %s AND id = %s AND deleted_at IS NULL FOR UPDATE",
                (church_id, member_id),
            )
            row = await cur.fetchone()
            if row is not None and not row[0] and row[1] == "keyword":
                raise Conflict(
                    "this member opted out by text; only they can opt back in, by texting START",
                    field="opted_in",
                )
        cur = await conn.execute(
            "UPDATE member SET opted_in = %s, opt_source = %s, opt_changed_at = now() "
            "WHERE church_id = %s AND id = %s AND deleted_at IS NULL AND opted_in <> %s",
            (opted_in, source, church_id, member_id, opted_in),
        )
        if cur.rowcount == 1:
            data = MemberOptChanged(member_id=member_id, source=source)
            event = MemberOptedInEvent.new(data) if opted_in else MemberOptedOutEvent.new(data)
            await member_event(conn, church_id, event)
    return await get_member(conn, vault, church_id, member_id)


async def erase_member(conn: Conn, church_id: uuid.UUID, member_id: uuid.UUID) -> None:
    """Delete a member: their personal data is erased (name, email, phone, branch,
    time zone, group memberships, consent history, the text of their conversation
    messages) while the row stays, so past broadcasts keep their recipient counts
    and conversations keep their thread. The phone hash becomes random, so the
    number can join again as a new member."""
    async with conn.transaction():
        cur = await conn.execute(
            "UPDATE member SET first_name = '', last_name = '', email = NULL, "
            "phone_cipher = '\\x', "
            "phone_hash = sha256(convert_to(gen_random_uuid()::text, 'UTF8')), opted_in = false, "
            "opt_source = 'erased', opt_changed_at = now(), deleted_at = now(), "
            "branch_id = NULL, timezone = NULL "
            "WHERE church_id = %s AND id = %s AND deleted_at IS NULL",
            (church_id, member_id),
        )
        if cur.rowcount != 1:
            raise NotFound("member")
        for sql in (
            "DELETE FROM group_membership WHERE church_id = %s AND member_id = %s",
            "DELETE FROM member_opt_event WHERE church_id = %s AND member_id = %s",
            # The files they texted in go with their texts: without its row a file is
            # unreadable through the API (its object is left unreferenced).
            "DELETE FROM media md USING conversation c, conversation_message cm, "
            "jsonb_array_elements(cm.media) AS item "
            "WHERE c.church_id = %s AND c.member_id = %s AND cm.church_id = c.church_id "
            "AND cm.conversation_id = c.id AND cm.direction = 'inbound' "
            "AND md.church_id = c.church_id AND md.id = (item->>'id')::uuid",
            "UPDATE conversation_message cm SET body = '', media = '[]' FROM conversation c "
            "WHERE c.church_id = %s AND c.member_id = %s AND cm.church_id = c.church_id "
            "AND cm.conversation_id = c.id",
            # Replies and answers to them keep a copy of their text as a message.
            "UPDATE message m SET body = '' FROM conversation c "
            "WHERE c.church_id = %s AND c.member_id = %s AND m.church_id = c.church_id "
            "AND m.conversation_id = c.id",
        ):
            await conn.execute(sql, (church_id, member_id))
        await record_erasure(conn, church_id, member_id)


# The data-subject export ----------------------------------------------------------


class MemberProfile(msgspec.Struct, frozen=True):
    id: uuid.UUID
    first_name: str
    last_name: str
    phone: str
    email: str | None
    branch_id: uuid.UUID | None
    timezone: str | None
    verified: bool
    opted_in: bool
    opt_source: str
    opt_changed_at: datetime
    created_at: datetime


class GroupMembership(msgspec.Struct, frozen=True):
    group_id: uuid.UUID
    name: str
    joined_at: datetime


class OptEvent(msgspec.Struct, frozen=True):
    opted_in: bool
    source: str
    changed_at: datetime


class ExportedConversationMessage(msgspec.Struct, frozen=True):
    id: uuid.UUID
    direction: str
    body: str
    media: Any
    status: str
    created_at: datetime


class ExportedConversation(msgspec.Struct, frozen=True):
    id: uuid.UUID
    status: str
    created_at: datetime
    messages: list[ExportedConversationMessage]


class ExportedRecipient(msgspec.Struct, frozen=True):
    message_id: uuid.UUID
    recipient_id: uuid.UUID
    body: str
    status: str
    error_code: str | None
    provider_message_id: str | None
    created_at: datetime
    updated_at: datetime


class MemberExport(msgspec.Struct, frozen=True):
    """Everything held about one member, for a data-subject access request."""

    member: MemberProfile
    groups: list[GroupMembership]
    opt_history: list[OptEvent]
    conversations: list[ExportedConversation]
    broadcasts: list[ExportedRecipient]
    exported_at: datetime


@stale_ok
async def export_member(
    conn: Conn, vault: PhoneVault, church_id: uuid.UUID, member_id: uuid.UUID
) -> MemberExport:
    """All personal data held about a member. Recipient rows are found by a scan of
    the church's recipients (no member index on that hot table): a rare request."""
    async with conn.transaction(), conn.cursor() as cur:
        await cur.execute(
            "SELECT id, first_name, last_name, phone_cipher, email, branch_id, timezone, "
            "verified, opted_in, opt_source, opt_changed_at, created_at, now() FROM member "
            "WHERE church_id = %s AND id = %s AND deleted_at IS NULL",
            (church_id, member_id),
        )
        row = await cur.fetchone()
        if row is None:
            raise NotFound("member")
        phone = vault.decrypt(church_id, bytes(row[3]))
        profile = MemberProfile(row[0], row[1], row[2], phone, *row[4:12])
        exported_at: datetime = row[12]
        await cur.execute(
            "SELECT g.id, g.name, gm.created_at FROM group_membership gm "
            "JOIN member_group g ON g.church_id = gm.church_id AND g.id = gm.group_id "
            "WHERE gm.church_id = %s AND gm.member_id = %s ORDER BY gm.created_at, g.id",
            (church_id, member_id),
        )
        groups = [GroupMembership(*r) for r in await cur.fetchall()]
        await cur.execute(
            "SELECT opted_in, source, changed_at FROM member_opt_event "
            "WHERE church_id = %s AND member_id = %s ORDER BY id",
            (church_id, member_id),
        )
        history = [OptEvent(*r) for r in await cur.fetchall()]
        await cur.execute(
            "SELECT c.id, c.status, c.created_at, cm.id, cm.direction, cm.body, cm.media, "
            "coalesce(r.status, cm.status), cm.created_at FROM conversation c "
            "LEFT JOIN conversation_message cm "
            "ON cm.church_id = c.church_id AND cm.conversation_id = c.id "
            "LEFT JOIN message_recipient r ON cm.direction = 'outbound' "
            "AND r.church_id = cm.church_id AND r.message_id = cm.id "
            "AND r.created_at = cm.created_at "
            "WHERE c.church_id = %s AND c.member_id = %s ORDER BY c.id, cm.created_at, cm.id",
            (church_id, member_id),
        )
        conversations: dict[uuid.UUID, ExportedConversation] = {}
        for r in await cur.fetchall():
            conv = conversations.setdefault(r[0], ExportedConversation(r[0], r[1], r[2], []))
            if r[3] is not None:
                conv.messages.append(ExportedConversationMessage(*r[3:9]))
        await cur.execute(
            "SELECT r.message_id, r.id, m.body, r.status, r.error_code, r.provider_message_id, "
            "r.created_at, r.updated_at FROM message_recipient r "
            "JOIN message m ON m.church_id = r.church_id AND m.id = r.message_id "
            "AND m.created_at = r.created_at "
            "WHERE r.church_id = %s AND r.member_id = %s AND m.kind = 'broadcast' "
            "ORDER BY r.created_at, r.message_id",
            (church_id, member_id),
        )
        broadcasts = [ExportedRecipient(*r) for r in await cur.fetchall()]
    return MemberExport(
        member=profile,
        groups=groups,
        opt_history=history,
        conversations=list(conversations.values()),
        broadcasts=broadcasts,
        exported_at=exported_at,
    )
