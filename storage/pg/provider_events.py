"""Provider webhook event ids already applied: the dedupe record of inbound webhooks.

A row is written in the transaction that applies the event, so a retried webhook
finds its id and does nothing. Rows are not message data; the scheduler prunes
them after a retention period.
"""

from __future__ import annotations

from datetime import datetime

from storage.pg.database import Conn


async def record_provider_event(conn: Conn, event_id: str, event_type: str) -> bool:
    """Record the event id; False when it was already recorded (a duplicate)."""
    cur = await conn.execute(
        "INSERT INTO provider_event (event_id, event_type) VALUES (%s, %s) ON CONFLICT DO NOTHING",
        (event_id, event_type),
    )
    return cur.rowcount == 1


async def delete_old_provider_events(conn: Conn, received_before: datetime, limit: int) -> int:
    """Delete at most ``limit`` records received before the cutoff, oldest first;
    returns how many. Small batches keep each delete short."""
    cur = await conn.execute(
        "DELETE FROM provider_event WHERE event_id IN (SELECT event_id FROM "
        "provider_event WHERE received_at < %s ORDER BY received_at LIMIT %s)",
        (received_before, limit),
    )
    return cur.rowcount
