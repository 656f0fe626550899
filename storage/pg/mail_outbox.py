"""The mail outbox: one row per mail to staff, sent by SMTP or stored for development.

Rows of mail that went through SMTP (``sent``, or ``failed`` with the error) keep
the envelope only, never the body, which may carry a live reset or invitation
token; the caller (storage/process/mail.py) passes ``body`` for ``stored`` mail only.
"""

from __future__ import annotations

import uuid
from datetime import datetime

import msgspec

from storage.domain.ids import uuid7
from storage.pg.database import Conn


class OutboxEntry(msgspec.Struct, frozen=True):
    id: uuid.UUID
    church_id: uuid.UUID
    recipient: str
    subject: str
    body: str | None
    """Kept for ``stored`` mail only."""
    kind: str
    status: str
    """``stored`` (development outbox), ``sent`` or ``failed`` (SMTP)."""
    error: str | None
    created_at: datetime


_COLUMNS = "id, church_id, recipient, subject, body, kind, status, error, created_at"


async def record_mail(
    conn: Conn,
    church_id: uuid.UUID,
    *,
    recipient: str,
    subject: str,
    body: str | None,
    kind: str,
    status: str,
    error: str | None,
) -> OutboxEntry:
    cur = await conn.execute(
        "INSERT INTO mail_outbox (church_id, id, recipient, subject, body, kind, status, "
        f"error) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING {_COLUMNS}",
        (church_id, uuid7(), recipient, subject, body, kind, status, error),
    )
    row = await cur.fetchone()
    assert row is not None
    return OutboxEntry(*row)


async def list_outbox(conn: Conn, *, limit: int = 20, to: str | None = None) -> list[OutboxEntry]:
    """The latest mail first, of every church (an operator's view of the outbox)."""
    cur = await conn.execute(
        f"SELECT {_COLUMNS} FROM mail_outbox "
        "WHERE (%s::text IS NULL OR lower(recipient) = lower(%s)) "
        "ORDER BY created_at DESC, id DESC LIMIT %s",
        (to, to, limit),
    )
    return [OutboxEntry(*row) for row in await cur.fetchall()]
