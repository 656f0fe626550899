"""The audit log: who (a staff user, an API key, the system) did what, to which row.

Rows hold ids and non-personal facts only, so erasing a member never has to
rewrite history. Every successful REST write is recorded by the operation guard
(``api/guard.py``); actions that happen outside a request (a keyword opt-out)
call ``record`` directly.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import msgspec
from psycopg.types.json import Jsonb

from storage.domain.ids import uuid7
from storage.pg.database import Conn
from storage.pg.freshness import stale_ok
from storage.pg.pagination import Page, decode_cursor, page_of


class AuditEntry(msgspec.Struct, frozen=True):
    id: uuid.UUID
    actor_type: str
    """``user``, ``api_key`` or ``system``."""
    actor_id: uuid.UUID | None
    action: str
    target_type: str
    target_id: str | None
    details: dict[str, Any]
    request_id: str | None
    ip: str | None
    created_at: datetime


async def record(
    conn: Conn,
    church_id: uuid.UUID,
    *,
    actor_type: str,
    actor_id: uuid.UUID | None,
    action: str,
    target_type: str = "",
    target_id: str | None = None,
    details: dict[str, Any] | None = None,
    request_id: str | None = None,
    ip: str | None = None,
) -> None:
    await conn.execute(
        "INSERT INTO audit_log (church_id, id, actor_type, actor_id, action, target_type, "
        "target_id, details, request_id, ip) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (
            church_id,
            uuid7(),
            actor_type,
            actor_id,
            action,
            target_type,
            target_id,
            Jsonb(details or {}),
            request_id,
            ip,
        ),
    )


@stale_ok
async def list_entries(
    conn: Conn,
    church_id: uuid.UUID,
    *,
    limit: int,
    cursor: str | None,
    action: str | None = None,
    actor_id: uuid.UUID | None = None,
) -> Page[AuditEntry]:
    """Newest first; ``action`` matches exactly or, ending in ``.*``, by prefix."""
    before = decode_cursor(cursor).id if cursor else None
    pattern = None
    if action:
        pattern = (
            action[:-1].replace("%", r"\%").replace("_", r"\_") + "%"
            if (action.endswith(".*"))
            else action.replace("%", r"\%").replace("_", r"\_")
        )
    cur = await conn.execute(
        "SELECT id, actor_type, actor_id, action, target_type, target_id, details, request_id, "
        "ip, created_at FROM audit_log WHERE church_id = %s "
        "AND (%s::uuid IS NULL OR id < %s) "
        "AND (%s::text IS NULL OR action LIKE %s) "
        "AND (%s::uuid IS NULL OR actor_id = %s) "
        "ORDER BY id DESC LIMIT %s",
        (church_id, before, before, pattern, pattern, actor_id, actor_id, limit + 1),
    )
    rows = [AuditEntry(*r) for r in await cur.fetchall()]
    return page_of(rows, limit, lambda e: (None, e.id))
