"""Integrators' webhook endpoints and their attempt logs (delivery of events to them
is the delivery package's; the outbox rows are ``storage/pg/webhook_outbox.py``'s).

Secrets are Standard Webhooks secrets (``whsec_`` + base64 of 32 random bytes),
shown once at creation and rotation. A rotated-out secret keeps signing beside
the new one for an overlap, so receivers can switch without losing a delivery.
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import os
import uuid
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import msgspec

from storage.domain.errors import NotFound
from storage.domain.ids import uuid7
from storage.pg.database import Conn
from storage.pg.freshness import stale_ok
from storage.pg.pagination import Page, decode_cursor, id_page, page_of
from storage.pg.webhook_outbox import (
    VALID_FILTERS,
    disable_endpoint,
    event_id_text,
    resume_deliveries,
)

log = logging.getLogger("koinonia.storage.webhook_endpoints")


class WebhookEndpoint(msgspec.Struct, frozen=True):
    id: uuid.UUID
    url: str
    description: str
    events: list[str]
    enabled: bool
    disabled_reason: str | None
    """``manual``, ``gone`` (the endpoint answered 410) or ``persistent_failure``."""
    created_at: datetime
    updated_at: datetime


class WebhookAttempt(msgspec.Struct, frozen=True):
    id: uuid.UUID
    event_id: str
    """The ``webhook-id`` the receiver saw."""
    event_type: str
    attempt: int
    trigger: str
    """``scheduled`` (the first send and its retries) or ``manual`` (replay, test)."""
    status_code: int | None
    latency_ms: int
    response_excerpt: str | None
    """The first KiB of the response body."""
    error: str | None
    """Why no response came (timeout, connection refused, destination refused)."""
    created_at: datetime


_COLUMNS = "id, url, description, events, enabled, disabled_reason, created_at, updated_at"
NOT_FOUND = "webhook endpoint"


def new_secret() -> str:
    """A Standard Webhooks secret: ``whsec_`` + base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


def filter_problem(events: list[str]) -> str | None:
    for name in events:
        if name not in VALID_FILTERS:
            return f"unknown event type or prefix: {name}"
    return None


def is_public_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Globally routable unicast: not private, loopback, link-local, shared,
    reserved, multicast or unspecified (IPv4-mapped IPv6 judged as the IPv4)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


def url_problem(url: str, *, allow_private: bool) -> str | None:
    """Why ``url`` cannot be a webhook endpoint, checked when it is saved: an
    absolute http(s) URL, and unless private destinations are allowed, no literal
    non-public address or localhost name (names are resolved and checked again at
    every send)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError:
        return "must be an absolute http or https URL"
    if parts.scheme not in ("http", "https") or not host:
        return "must be an absolute http or https URL"
    if parts.username is not None or parts.password is not None:
        return "must not carry credentials (put a token in the path or query instead)"
    if allow_private:
        return None
    name = host.rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return "must not point at a private or loopback address"
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return None
    if not is_public_address(address):
        return "must not point at a private or loopback address"
    return None


async def create_endpoint(
    conn: Conn,
    church_id: uuid.UUID,
    *,
    url: str,
    events: list[str],
    description: str = "",
    enabled: bool = True,
) -> tuple[WebhookEndpoint, str]:
    secret = new_secret()
    cur = await conn.execute(
        "INSERT INTO webhook_endpoint (church_id, id, url, secret, events, description, "
        "enabled, disabled_reason) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
        f"RETURNING {_COLUMNS}",
        (
            church_id,
            uuid7(),
            url,
            secret,
            events,
            description,
            enabled,
            None if enabled else "manual",
        ),
    )
    row = await cur.fetchone()
    assert row is not None
    return WebhookEndpoint(*row), secret


@stale_ok
async def list_endpoints(
    conn: Conn, church_id: uuid.UUID, *, limit: int, cursor: str | None
) -> Page[WebhookEndpoint]:
    return await id_page(
        conn,
        f"SELECT {_COLUMNS} FROM webhook_endpoint",
        church_id,
        limit=limit,
        cursor=cursor,
        row=WebhookEndpoint,
    )


async def get_endpoint(conn: Conn, church_id: uuid.UUID, endpoint_id: uuid.UUID) -> WebhookEndpoint:
    cur = await conn.execute(
        f"SELECT {_COLUMNS} FROM webhook_endpoint WHERE church_id = %s AND id = %s",
        (church_id, endpoint_id),
    )
    row = await cur.fetchone()
    if row is None:
        raise NotFound(NOT_FOUND)
    return WebhookEndpoint(*row)


async def update_endpoint(
    conn: Conn,
    church_id: uuid.UUID,
    endpoint_id: uuid.UUID,
    *,
    url: str | None = None,
    events: list[str] | None = None,
    description: str | None = None,
    enabled: bool | None = None,
) -> WebhookEndpoint:
    """Change what is given. Disabling pauses pending deliveries; enabling clears
    the failure record and sends what waited."""
    async with conn.transaction():
        cur = await conn.execute(
            "SELECT enabled FROM webhook_endpoint WHERE church_id = %s AND id = %s FOR UPDATE",
            (church_id, endpoint_id),
        )
        row = await cur.fetchone()
        if row is None:
            raise NotFound(NOT_FOUND)
        was_enabled = bool(row[0])
        if enabled is False and was_enabled:
            await disable_endpoint(conn, church_id, endpoint_id, "manual")
        elif enabled is True and not was_enabled:
            await conn.execute(
                "UPDATE webhook_endpoint SET enabled = true, disabled_reason = NULL, "
                "disabled_at = NULL, failing_since = NULL, failed_deliveries = 0 "
                "WHERE church_id = %s AND id = %s",
                (church_id, endpoint_id),
            )
            await resume_deliveries(conn, church_id, endpoint_id)
        sets: list[str] = ["updated_at = now()"]
        params: list[Any] = []
        for column, value in (("url", url), ("events", events), ("description", description)):
            if value is not None:
                sets.append(f"{column} = %s")
                params.append(value)
        cur = await conn.execute(
            f"UPDATE webhook_endpoint SET {', '.join(sets)} WHERE church_id = %s AND id = %s "
            f"RETURNING {_COLUMNS}",
            (*params, church_id, endpoint_id),
        )
        updated = await cur.fetchone()
        assert updated is not None
    return WebhookEndpoint(*updated)


async def delete_endpoint(
    conn: Conn, church_id: uuid.UUID, endpoint_id: uuid.UUID
) -> WebhookEndpoint:
    """Delete an endpoint with its pending deliveries and attempt log."""
    cur = await conn.execute(
        f"DELETE FROM webhook_endpoint WHERE church_id = %s AND id = %s RETURNING {_COLUMNS}",
        (church_id, endpoint_id),
    )
    row = await cur.fetchone()
    if row is None:
        raise NotFound(NOT_FOUND)
    return WebhookEndpoint(*row)


async def rotate_secret(
    conn: Conn, church_id: uuid.UUID, endpoint_id: uuid.UUID, *, overlap_s: int
) -> tuple[WebhookEndpoint, str]:
    """A new secret; the current one keeps signing beside it for ``overlap_s``."""
    secret = new_secret()
    cur = await conn.execute(
        "UPDATE webhook_endpoint SET previous_secret = secret, "
        "previous_expires_at = now() + make_interval(secs => %s), secret = %s, "
        "updated_at = now() WHERE church_id = %s AND id = %s "
        f"RETURNING {_COLUMNS}",
        (overlap_s, secret, church_id, endpoint_id),
    )
    row = await cur.fetchone()
    if row is None:
        raise NotFound(NOT_FOUND)
    return WebhookEndpoint(*row), secret


@stale_ok
async def list_attempts(
    conn: Conn, church_id: uuid.UUID, endpoint_id: uuid.UUID, *, limit: int, cursor: str | None
) -> Page[WebhookAttempt]:
    """Newest first."""
    await get_endpoint(conn, church_id, endpoint_id)
    before = decode_cursor(cursor).id if cursor else None
    cur = await conn.execute(
        "SELECT id, event_id, event_type, attempt, trigger, status_code, latency_ms, "
        "response_excerpt, error, created_at FROM webhook_attempt "
        "WHERE church_id = %s AND endpoint_id = %s AND (%s::uuid IS NULL OR id < %s) "
        "ORDER BY id DESC LIMIT %s",
        (church_id, endpoint_id, before, before, limit + 1),
    )
    rows = [WebhookAttempt(r[0], event_id_text(r[1]), *r[2:]) for r in await cur.fetchall()]
    return page_of(rows, limit, lambda r: (None, r.id))
