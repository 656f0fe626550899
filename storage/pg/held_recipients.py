"""Recipients held by quiet hours, in Postgres (the rules are ``storage/domain/quiet_hours.py``).

A recipient materialized outside its window is ``queued`` with ``not_before``,
the instant its window opens. Claiming leaves it alone until then, the
reconciler does not count it as lost, and the scheduler's ``release_held``
clears the column and enqueues it when the time comes; ``replan_held`` works the
instants out again when a church changes its window or time zone.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from storage.domain.quiet_hours import HoldPlan, QuietHours, plan_holds
from storage.pg.database import Conn


async def hold_plan(conn: Conn, church_id: uuid.UUID, now: datetime) -> HoldPlan:
    """The church's quiet-hours holds for a send at ``now``, per zone its members use."""
    cur = await conn.execute(
        "SELECT timezone, quiet_hours_start, quiet_hours_end FROM church WHERE id = %s",
        (church_id,),
    )
    church = await cur.fetchone()
    if church is None:
        return HoldPlan(church_hold=None, zone_holds={})
    cur = await conn.execute(
        "SELECT DISTINCT timezone FROM member WHERE church_id = %s AND timezone IS NOT NULL "
        "AND deleted_at IS NULL",
        (church_id,),
    )
    zones = [r[0] for r in await cur.fetchall()]
    return plan_holds(QuietHours(church[1], church[2]), church[0], zones, now)


def hold_sql(plan: HoldPlan | None, church_id: uuid.UUID) -> tuple[str, list[Any], str, list[Any]]:
    """(hold expression, its parameters, joins, their parameters) for an audience
    row ``a``: a constant when every zone has the same hold (no join at all, the
    usual case), else a lookup of the member's zone."""
    if plan is None or not plan.holds_anyone:
        return "NULL::timestamptz", [], "", []
    if plan.uniform:
        return "%s::timestamptz", [plan.church_hold], "", []
    names, holds = _zone_arrays(plan)
    return (
        _BY_ZONE,
        [plan.church_hold],
        " JOIN member hm ON hm.church_id = %s AND hm.id = a.id " + _ZONES_JOIN,
        [church_id, names, holds],
    )


_BY_ZONE = "CASE WHEN hz.tz IS NULL THEN %s::timestamptz ELSE hz.hold::timestamptz END"
_ZONES_JOIN = "LEFT JOIN unnest(%s::text[], %s::text[]) AS hz(tz, hold) ON hz.tz = hm.timezone"


def _zone_arrays(plan: HoldPlan) -> tuple[list[str], list[str | None]]:
    names = sorted(plan.zone_holds)
    holds = [plan.zone_holds[n] for n in names]
    return names, [h.isoformat() if h is not None else None for h in holds]


async def replan_held(conn: Conn, church_id: uuid.UUID, now: datetime | None = None) -> int:
    """Work out again when the church's held recipients may go (its window or time
    zone changed). Rows whose window is open now get ``not_before = now``, so the
    scheduler's next ``release_held`` sends them; returns how many rows changed."""
    at = now or datetime.now(UTC)
    plan = await hold_plan(conn, church_id, at)
    if plan.uniform:
        cur = await conn.execute(
            "UPDATE message_recipient SET not_before = coalesce(%s::timestamptz, %s) "
            "WHERE not_before IS NOT NULL AND church_id = %s AND status = 'queued'",
            (plan.church_hold, at, church_id),
        )
        return cur.rowcount
    names, holds = _zone_arrays(plan)
    cur = await conn.execute(
        f"UPDATE message_recipient r SET not_before = coalesce({_BY_ZONE}, %s) "
        f"FROM member hm {_ZONES_JOIN} "
        "WHERE hm.church_id = r.church_id AND hm.id = r.member_id "
        "AND r.not_before IS NOT NULL AND r.church_id = %s AND r.status = 'queued'",
        (plan.church_hold, at, names, holds, church_id),
    )
    return cur.rowcount


async def release_held(
    conn: Conn, now: datetime, limit: int = 5000
) -> list[tuple[uuid.UUID, uuid.UUID, uuid.UUID]]:
    """(church, message, recipient) of held recipients whose window has opened, taken
    once across any number of schedulers (``FOR UPDATE SKIP LOCKED``): the hold is
    cleared in the same statement; the caller enqueues them after the commit (the
    reconciler covers a lost enqueue: they are now ordinary queued rows)."""
    cur = await conn.execute(
        "WITH due AS (SELECT church_id, message_id, id, created_at FROM message_recipient "
        "  WHERE not_before IS NOT NULL AND not_before <= %s ORDER BY not_before LIMIT %s "
        "  FOR UPDATE SKIP LOCKED) "
        "UPDATE message_recipient r SET not_before = NULL, updated_at = now() FROM due "
        "WHERE r.church_id = due.church_id AND r.message_id = due.message_id "
        "AND r.id = due.id AND r.created_at = due.created_at "
        "RETURNING r.church_id, r.message_id, r.id, r.status",
        (now, limit),
    )
    return [(r[0], r[1], r[2]) for r in await cur.fetchall() if r[3] == "queued"]
