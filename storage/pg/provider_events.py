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


RECENT_CAP = 300_000
"""At most this many events are counted per call (5,000 a second over a minute):
the count stays one bounded index range scan however busy the provider is."""


async def recent_provider_events(
    conn: Conn, window_s: int, cap: int = RECENT_CAP
) -> dict[str, int]:
    """Provider events recorded in the last ``window_s`` seconds (by the database's
    clock), by event type (``message.sent``, ``message.finalized``,
    ``message.received``): the whole deployment's, for the operations figures. A
    range scan of ``provider_event_received``, counted up to ``cap`` rows."""
    cur = await conn.execute(
        "SELECT event_type, count(*) FROM (SELECT event_type FROM provider_event "
        "WHERE received_at > now() - %s * interval '1 second' LIMIT %s) recent "
        "GROUP BY event_type",
        (window_s, cap),
    )
    return {str(r[0]): int(r[1]) for r in await cur.fetchall()}
