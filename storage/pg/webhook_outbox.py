"""The webhook outbox: a copy of each event for the endpoints that want it, and one
delivery row per subscribed endpoint.

Events reach it through the event log (storage/pg/event_log.py): producers log them
in the transaction of their change, and the relay calls ``record_encoded``, which
stores the event, under its own id, and its deliveries in one statement, and only
when an enabled endpoint of the church matches the event's type, so a church
without endpoints stores nothing. The match is made in SQL every time: an endpoint
created a moment ago gets every event logged after it. ``record_events`` remains
for the outbox's own events (``webhook_endpoint.disabled``) and tests; the test
event (``record_test_event``) is made from its type too, so every stored payload
is one of storage/domain/events.py's, and the delivery body is built from it.

Delivery workers (``delivery/webhooks.py``) claim due rows with ``FOR UPDATE
SKIP LOCKED``; a claim moves ``next_attempt_at`` forward by a lease, so a worker
that dies mid-request leaves the row to be retried once the lease runs out.
``record_outcome`` logs the attempt and decides: done, retry later, failed, or
the endpoint disabled (a 410 at once; persistent failure after a threshold).

Event filters: an exact type, a dotted prefix ending in ``.*`` (``message.*``,
``message.recipient.*``), or ``*``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

import msgspec

from storage.domain.events import (
    WEBHOOK_EVENT_TYPES,
    AnyEvent,
    WebhookEndpointDisabled,
    WebhookEndpointDisabledEvent,
    WebhookEndpointTest,
    WebhookEndpointTestEvent,
    encode,
)
from storage.domain.ids import uuid7
from storage.pg.database import Conn
from storage.process.settings import WebhookSettings

EVENT_TYPES = WEBHOOK_EVENT_TYPES
"""What integrators can subscribe to (docs/protocol.md "Events"; typing is realtime
only), read from the event union."""

EVENT_ID_PREFIX = "msg_"


def patterns_of(event_type: str) -> tuple[str, ...]:
    """Every filter that selects ``event_type``: ``*``, each dotted prefix, itself."""
    parts = event_type.split(".")
    prefixes = tuple(".".join(parts[:n]) + ".*" for n in range(1, len(parts)))
    return ("*", *prefixes, event_type)


VALID_FILTERS = frozenset(p for t in EVENT_TYPES for p in patterns_of(t))


def matches(filters: Iterable[str], event_type: str) -> bool:
    wanted = set(patterns_of(event_type))
    return any(f in wanted for f in filters)


def event_id_text(event_id: uuid.UUID) -> str:
    """The ``webhook-id`` of an event: stable across every attempt and replay."""
    return EVENT_ID_PREFIX + event_id.hex


# The same rule as ``matches``, in SQL: e is the endpoint, i.type the event type.
_MATCH = (
    "('*' = ANY(e.events) OR i.type = ANY(e.events) OR EXISTS ("
    "SELECT 1 FROM unnest(e.events) AS f(p) "
    "WHERE right(f.p, 2) = '.*' AND starts_with(i.type, left(f.p, -1))))"
)

_encoder = msgspec.json.Encoder()


async def record_event(conn: Conn, church_id: uuid.UUID, event: AnyEvent) -> None:
    """Record ``event`` for the church's webhook endpoints whose filters match;
    nothing when none do."""
    await record_events(conn, church_id, [event])


async def record_events(conn: Conn, church_id: uuid.UUID, events: Sequence[AnyEvent]) -> int:
    """Several events of one church in one statement, each under its own id and time;
    returns the deliveries made."""
    return await record_encoded(conn, church_id, [_encoded(e) for e in events])


def _encoded(event: AnyEvent) -> tuple[str, str, str, str]:
    return (event.id, event.type, encode(event.data).decode(), event.occurred_at)


_RECORD_ENCODED = f"""
WITH input AS (
    SELECT * FROM unnest(%(ids)s::uuid[], %(types)s::text[], %(data)s::text[],
        %(at)s::timestamptz[]) AS i(id, type, data, at)
), matched AS (
    SELECT i.id AS event_id, e.id AS endpoint_id
    FROM input i JOIN webhook_endpoint e ON e.church_id = %(church)s AND e.enabled AND {_MATCH}
), stored AS (
    INSERT INTO webhook_event (church_id, id, type, data, occurred_at)
    SELECT %(church)s, i.id, i.type, i.data::jsonb, i.at FROM input i
    WHERE i.id IN (SELECT event_id FROM matched)
    ON CONFLICT DO NOTHING
    RETURNING id
)
INSERT INTO webhook_delivery (church_id, event_id, endpoint_id)
SELECT %(church)s, m.event_id, m.endpoint_id FROM matched m
WHERE m.event_id IN (SELECT id FROM stored)
"""


async def record_encoded(
    conn: Conn, church_id: uuid.UUID, events: Sequence[tuple[str, str, str, str]]
) -> int:
    """Webhook copies of logged events (storage/pg/event_log.py), each keeping its own id
    and time: (id, type, data JSON, occurred_at). An event recorded before (a relay
    that died before its commit is repeated) is not recorded twice."""
    if not events:
        return 0
    cur = await conn.execute(
        _RECORD_ENCODED,
        {
            "ids": [uuid.UUID(e[0]) for e in events],
            "types": [e[1] for e in events],
            "data": [e[2] for e in events],
            "at": [datetime.fromisoformat(e[3]) for e in events],
            "church": church_id,
        },
    )
    return cur.rowcount


# -- deliveries ---------------------------------------------------------------


class DueDelivery(msgspec.Struct, frozen=True):
    """A claimed delivery with what its request needs."""

    church_id: uuid.UUID
    endpoint_id: uuid.UUID
    event_id: uuid.UUID
    attempts: int
    """Attempts made before this one."""
    manual: bool
    """A replay or a test: does not count towards disabling the endpoint."""
    url: str
    secrets: list[str]
    """The current secret, then a rotated-out one still inside its overlap."""
    event_type: str
    occurred_at: datetime
    data: str
    """The event's ``data`` as JSON text."""

    def body(self) -> bytes:
        """Standard Webhooks payload ``{"type","timestamp","data"}``, the same bytes
        on every attempt."""
        stamp = self.occurred_at.astimezone(UTC).isoformat(timespec="milliseconds")
        return (
            b'{"type":'
            + _encoder.encode(self.event_type)
            + b',"timestamp":'
            + _encoder.encode(stamp.replace("+00:00", "Z"))
            + b',"data":'
            + self.data.encode()
            + b"}"
        )


_CLAIM = """
WITH due AS (
    SELECT church_id, event_id, endpoint_id FROM webhook_delivery
    WHERE status = 'pending' AND next_attempt_at <= now()
      AND NOT (endpoint_id = ANY(%(skip)s::uuid[]))
    ORDER BY next_attempt_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE webhook_delivery d SET next_attempt_at = now() + make_interval(secs => %(lease)s)
    FROM due
    WHERE d.church_id = due.church_id AND d.event_id = due.event_id
      AND d.endpoint_id = due.endpoint_id
    RETURNING d.church_id, d.endpoint_id, d.event_id, d.attempts, d.manual
)
SELECT c.church_id, c.endpoint_id, c.event_id, c.attempts, c.manual, e.url, e.secret,
       CASE WHEN e.previous_expires_at > now() THEN e.previous_secret END,
       v.type, v.occurred_at, v.data::text
FROM claimed c
JOIN webhook_endpoint e ON e.church_id = c.church_id AND e.id = c.endpoint_id
JOIN webhook_event v ON v.church_id = c.church_id AND v.id = c.event_id
"""


async def claim_due(
    conn: Conn, *, limit: int, lease_s: float, skip_endpoints: Sequence[uuid.UUID] = ()
) -> list[DueDelivery]:
    """Up to ``limit`` due deliveries, oldest due first, leased for ``lease_s``;
    deliveries to ``skip_endpoints`` (busy in this worker) wait for another turn."""
    if limit <= 0:
        return []
    cur = await conn.execute(
        _CLAIM, {"skip": list(skip_endpoints), "limit": limit, "lease": lease_s}
    )
    return [
        DueDelivery(
            church_id=r[0],
            endpoint_id=r[1],
            event_id=r[2],
            attempts=r[3],
            manual=r[4],
            url=r[5],
            secrets=[r[6], r[7]] if r[7] else [r[6]],
            event_type=r[8],
            occurred_at=r[9],
            data=r[10],
        )
        for r in await cur.fetchall()
    ]


async def due_backlog(conn: Conn, cap: int = 100_000) -> int:
    """Deliveries due now and not claimed (leased ones are due later), counted up to
    ``cap`` over the partial index of pending deliveries (the worker's metrics)."""
    cur = await conn.execute(
        "SELECT count(*) FROM (SELECT 1 FROM webhook_delivery "
        "WHERE status = 'pending' AND next_attempt_at <= now() LIMIT %s) AS due",
        (cap,),
    )
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def release(conn: Conn, deliveries: Sequence[DueDelivery]) -> None:
    """Give claimed rows back at once (the claiming worker cannot start them now)."""
    async with conn.cursor() as cur:
        await cur.executemany(
            "UPDATE webhook_delivery SET next_attempt_at = now() WHERE church_id = %s "
            "AND event_id = %s AND endpoint_id = %s AND status = 'pending'",
            [(d.church_id, d.event_id, d.endpoint_id) for d in deliveries],
        )


class Outcome(msgspec.Struct, frozen=True):
    status_code: int | None
    latency_ms: int
    response_excerpt: str | None = None
    error: str | None = None

    @property
    def succeeded(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300

    @property
    def gone(self) -> bool:
        return self.status_code == 410


class Recorded(msgspec.Struct, frozen=True):
    attempt_id: uuid.UUID
    status: str
    """The delivery's status now: succeeded, pending (a retry is due), paused, failed."""
    disabled: str | None = None
    """The reason, when this outcome disabled the endpoint."""


async def record_outcome(
    conn: Conn, due: DueDelivery, outcome: Outcome, policy: WebhookSettings
) -> Recorded | None:
    """Log the attempt and move the delivery on; None when the endpoint was deleted
    meanwhile. Bumps the endpoints' version (after the commit) when it disabled one."""
    attempt = due.attempts + 1
    attempt_id = uuid7()
    disabled: str | None = None
    async with conn.transaction():
        cur = await conn.execute(
            "INSERT INTO webhook_attempt (church_id, id, endpoint_id, event_id, event_type, "
            "attempt, trigger, status_code, latency_ms, response_excerpt, error) "
            "SELECT %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s WHERE EXISTS ("
            "SELECT 1 FROM webhook_endpoint WHERE church_id = %s AND id = %s)",
            (
                due.church_id,
                attempt_id,
                due.endpoint_id,
                due.event_id,
                due.event_type,
                attempt,
                "manual" if due.manual else "scheduled",
                outcome.status_code,
                outcome.latency_ms,
                outcome.response_excerpt,
                outcome.error,
                due.church_id,
                due.endpoint_id,
            ),
        )
        if cur.rowcount == 0:
            return None
        next_at: float | None = None
        if outcome.succeeded:
            status = "succeeded"
            await conn.execute(
                "UPDATE webhook_endpoint SET failing_since = NULL, failed_deliveries = 0 "
                "WHERE church_id = %s AND id = %s "
                "AND (failing_since IS NOT NULL OR failed_deliveries <> 0)",
                (due.church_id, due.endpoint_id),
            )
        elif outcome.gone:
            status = "failed"
            if await disable_endpoint(conn, due.church_id, due.endpoint_id, "gone"):
                disabled = "gone"
        else:
            delay = policy.retry_delay_s(attempt)
            final = delay is None
            status, disabled = await _after_failure(conn, due, final=final, policy=policy)
            if status == "pending":
                next_at = delay
        await conn.execute(
            "UPDATE webhook_delivery SET status = %s, attempts = %s, manual = false, "
            "next_attempt_at = now() + make_interval(secs => %s) "
            "WHERE church_id = %s AND event_id = %s AND endpoint_id = %s",
            (status, attempt, next_at or 0.0, due.church_id, due.event_id, due.endpoint_id),
        )
    return Recorded(attempt_id=attempt_id, status=status, disabled=disabled)


_ONE_ENDPOINT = "church_id = %(church)s AND id = %(endpoint)s"


async def _after_failure(
    conn: Conn, due: DueDelivery, *, final: bool, policy: WebhookSettings
) -> tuple[str, str | None]:
    """The delivery's next status after a failed attempt, and whether the endpoint's
    persistent failure disabled it. Only scheduled attempts count towards that."""
    persistent_sql = (
        "(failed_deliveries >= %(threshold)s "
        "OR failing_since <= now() - make_interval(secs => %(after)s))"
    )
    if due.manual:
        sql = f"SELECT enabled, false FROM webhook_endpoint WHERE {_ONE_ENDPOINT}"
    else:
        # The endpoint row is written only when something changes (the first failure
        # of a streak, or a delivery that used up its retries), not on every failed
        # attempt: a failing busy endpoint would otherwise be a hot row.
        sql = (
            "WITH touched AS (UPDATE webhook_endpoint SET "
            "failing_since = coalesce(failing_since, now()), "
            "failed_deliveries = failed_deliveries + %(final)s "
            f"WHERE {_ONE_ENDPOINT} AND (failing_since IS NULL OR %(final)s = 1) "
            f"RETURNING enabled, {persistent_sql}) "
            "SELECT * FROM touched UNION ALL "
            f"SELECT enabled, {persistent_sql} FROM webhook_endpoint "
            f"WHERE {_ONE_ENDPOINT} AND NOT EXISTS (SELECT 1 FROM touched)"
        )
    cur = await conn.execute(
        sql,
        {
            "church": due.church_id,
            "endpoint": due.endpoint_id,
            "final": 1 if final else 0,
            "threshold": policy.failure_threshold,
            "after": policy.disable_after_s,
        },
    )
    row = await cur.fetchone()
    enabled, persistent = (bool(row[0]), bool(row[1])) if row else (False, False)
    disabled: str | None = None
    if enabled and persistent:
        if await disable_endpoint(conn, due.church_id, due.endpoint_id, "persistent_failure"):
            disabled = "persistent_failure"
        enabled = False
    if final:
        return "failed", disabled
    return ("pending" if enabled else "paused"), disabled


async def disable_endpoint(
    conn: Conn, church_id: uuid.UUID, endpoint_id: uuid.UUID, reason: str
) -> bool:
    """Disable an enabled endpoint and pause its pending deliveries; automatic
    disables (any reason but ``manual``) record ``webhook_endpoint.disabled`` for
    the church's other endpoints. False when it was not enabled. The caller bumps
    the version after its transaction commits."""
    cur = await conn.execute(
        "UPDATE webhook_endpoint SET enabled = false, disabled_reason = %s, "
        "disabled_at = now(), updated_at = now() "
        "WHERE church_id = %s AND id = %s AND enabled",
        (reason, church_id, endpoint_id),
    )
    if cur.rowcount == 0:
        return False
    await conn.execute(
        "UPDATE webhook_delivery SET status = 'paused' "
        "WHERE church_id = %s AND endpoint_id = %s AND status = 'pending'",
        (church_id, endpoint_id),
    )
    if reason != "manual":
        disabled = WebhookEndpointDisabled(endpoint_id=endpoint_id, reason=reason)
        await record_event(conn, church_id, WebhookEndpointDisabledEvent.new(disabled))
    return True


async def resume_deliveries(conn: Conn, church_id: uuid.UUID, endpoint_id: uuid.UUID) -> None:
    """A re-enabled endpoint gets what waited while it was disabled, now."""
    await conn.execute(
        "UPDATE webhook_delivery SET status = 'pending', next_attempt_at = now() "
        "WHERE church_id = %s AND endpoint_id = %s AND status = 'paused'",
        (church_id, endpoint_id),
    )


async def replay(
    conn: Conn, church_id: uuid.UUID, endpoint_id: uuid.UUID, attempt_id: uuid.UUID
) -> uuid.UUID | None:
    """Send the delivery that ``attempt_id`` belongs to again, now; its event id, or
    None when no such attempt (or its delivery is no longer kept)."""
    cur = await conn.execute(
        "UPDATE webhook_delivery d SET status = 'pending', next_attempt_at = now(), "
        "manual = true FROM webhook_attempt a "
        "WHERE a.church_id = %s AND a.id = %s AND a.endpoint_id = %s "
        "AND d.church_id = a.church_id AND d.event_id = a.event_id "
        "AND d.endpoint_id = a.endpoint_id RETURNING d.event_id",
        (church_id, attempt_id, endpoint_id),
    )
    row = await cur.fetchone()
    return row[0] if row else None


async def record_test_event(conn: Conn, church_id: uuid.UUID, endpoint_id: uuid.UUID) -> uuid.UUID:
    """A ``webhook_endpoint.test`` event for this one endpoint, due now."""
    event = WebhookEndpointTestEvent.new(WebhookEndpointTest(endpoint_id=endpoint_id))
    event_id = uuid.UUID(event.id)
    _, event_type, data, occurred_at = _encoded(event)
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO webhook_event (church_id, id, type, data, occurred_at) "
            "VALUES (%s, %s, %s, %s, %s)",
            (church_id, event_id, event_type, data, datetime.fromisoformat(occurred_at)),
        )
        await conn.execute(
            "INSERT INTO webhook_delivery (church_id, event_id, endpoint_id, manual) "
            "VALUES (%s, %s, %s, true)",
            (church_id, event_id, endpoint_id),
        )
    return event_id


async def forget_old(conn: Conn, retention_days: int, batch: int = 1000) -> int:
    """Delete events (with their deliveries) and attempts past retention, a batch at
    a time; returns the rows deleted."""
    deleted = 0
    for table, column in (("webhook_event", "occurred_at"), ("webhook_attempt", "created_at")):
        cur = await conn.execute(
            f"DELETE FROM {table} WHERE (church_id, id) IN ("
            f"SELECT church_id, id FROM {table} "
            f"WHERE {column} < now() - make_interval(days => %s) LIMIT %s)",
            (retention_days, batch),
        )
        deleted += cur.rowcount
    return deleted
