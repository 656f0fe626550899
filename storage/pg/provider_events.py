"""Provider webhook event ids already applied: the dedupe record of inbound webhooks.

A row is written in the transaction that applies the event, so a retried webhook
finds its id and does nothing. Rows are not message data; the scheduler prunes
them after a retention period.

Every receipt writes a row, so the record is keyed by church (``(church_id,
event_id)``), like the rows the event changes, not a global table: under Citus it
lives on the shard of the church it is applied to (deploy/citus.sql). The church
is known before the record is written: a receipt's reference names it, an inbound
text's number finds it. An event no church of ours is found for changes nothing and
is recorded under ``NO_CHURCH``.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from storage.pg.database import Conn

NO_CHURCH = uuid.UUID(int=0)
"""The church of events that belong to none of ours (an unknown number or provider
message id), and of the records made before the dedupe was keyed by church."""


async def record_provider_event(
    conn: Conn, church_id: uuid.UUID, event_id: str, event_type: str
) -> bool:
    """Record the event id for its church; False when it was already recorded (a
    duplicate)."""
    cur = await conn.execute(
        "INSERT INTO provider_event (church_id, event_id, event_type) VALUES (%s, %s, %s) "
        "ON CONFLICT DO NOTHING",
        (church_id, event_id, event_type),
    )
    return cur.rowcount == 1


async def delete_old_provider_events(conn: Conn, received_before: datetime, limit: int) -> int:
    """Delete at most ``limit`` records received before the cutoff, oldest first;
    returns how many. Small batches keep each delete short."""
    cur = await conn.execute(
        "DELETE FROM provider_event WHERE (church_id, event_id) IN (SELECT church_id, "
        "event_id FROM provider_event WHERE received_at < %s ORDER BY received_at LIMIT %s)",
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
