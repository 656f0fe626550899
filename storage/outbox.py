"""Events for outgoing webhooks, recorded in Postgres.

INTERFACE OWNED BY THE WEBHOOKS WORK (being written now): callers record an event
in the same transaction as the change it describes; delivery to endpoints happens
elsewhere. Until that lands this records nothing.
"""

from __future__ import annotations

import uuid
from typing import Any

from storage.database import Conn


async def record_event(
    conn: Conn, church_id: uuid.UUID, event_type: str, data: dict[str, Any]
) -> None:
    """Record ``event_type`` with ``data`` (the PROTOCOL.md event payload) for the
    church's webhook endpoints whose filters match."""
    del conn, church_id, event_type, data
