"""Integrators' webhook endpoints (delivery of events to them is the delivery package's)."""

from __future__ import annotations

import base64
import os
import uuid
from datetime import datetime

import msgspec

from storage.database import Conn
from storage.ids import uuid7
from storage.pagination import Page, decode_cursor, page_of


class WebhookEndpoint(msgspec.Struct, frozen=True):
    id: uuid.UUID
    url: str
    events: list[str]
    enabled: bool
    created_at: datetime


def new_secret() -> str:
    """A Standard Webhooks secret: ``whsec_`` + base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


async def create_endpoint(
    conn: Conn, church_id: uuid.UUID, *, url: str, events: list[str]
) -> tuple[WebhookEndpoint, str]:
    secret = new_secret()
    cur = await conn.execute(
        "INSERT INTO webhook_endpoint (church_id, id, url, secret, events) "
        "VALUES (%s, %s, %s, %s, %s) RETURNING id, url, events, enabled, created_at",
        (church_id, uuid7(), url, secret, events),
    )
    row = await cur.fetchone()
    assert row is not None
    return WebhookEndpoint(*row), secret


async def list_endpoints(
    conn: Conn, church_id: uuid.UUID, *, limit: int, cursor: str | None
) -> Page[WebhookEndpoint]:
    after = decode_cursor(cursor).id if cursor else None
    cur = await conn.execute(
        "SELECT id, url, events, enabled, created_at FROM webhook_endpoint "
        "WHERE church_id = %s AND (%s::uuid IS NULL OR id > %s) ORDER BY id LIMIT %s",
        (church_id, after, after, limit + 1),
    )
    rows = [WebhookEndpoint(*r) for r in await cur.fetchall()]
    return page_of(rows, limit, lambda r: (None, r.id))
