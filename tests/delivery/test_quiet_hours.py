"""Quiet hours: the window arithmetic across time zones and daylight-saving changes
(no I/O), then scheduled and recurring sends held and released on the real stack."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from datetime import time as clock
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest

from deploy.stack import Stack
from storage.domain.quiet_hours import QuietHours, format_hhmm, is_zone, parse_hhmm, plan_holds
from tests.conftest import Church, texts_sent, unique_phone
from tests.conftest import wait_until as _wait

NEW_YORK = ZoneInfo("America/New_York")
DAY = QuietHours()  # 08:00-21:00


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


# -- the window (pure) -------------------------------------------------------------------------


def test_default_window_and_its_edges() -> None:
    assert (DAY.start, DAY.end) == (clock(8), clock(21))
    assert DAY.allows(clock(8, 0))
    assert DAY.allows(clock(20, 59))
    assert not DAY.allows(clock(21, 0))
    assert not DAY.allows(clock(7, 59))
    assert not DAY.allows(clock(0, 0))


def test_a_window_across_midnight_and_no_window() -> None:
    night = QuietHours(clock(22), clock(6))
    assert night.allows(clock(23))
    assert night.allows(clock(5, 59))
    assert night.allows(clock(22))
    assert not night.allows(clock(6))
    assert not night.allows(clock(12))
    assert night.next_open(ZoneInfo("UTC"), utc("2026-06-01T12:00")) == utc("2026-06-01T22:00")
    always = QuietHours(clock(9), clock(9))
    assert always.always_open
    assert always.next_open(NEW_YORK, utc("2026-06-01T04:00")) is None


@pytest.mark.parametrize(
    ("now", "opens"),
    [
        ("2026-06-01T14:00", None),  # 10:00 EDT: open
        ("2026-06-01T11:00", "2026-06-01T12:00"),  # 07:00 EDT: at 08:00 today
        ("2026-06-02T01:30", "2026-06-02T12:00"),  # 21:30 EDT: at 08:00 tomorrow
        ("2026-06-02T00:59", None),  # 20:59 EDT: still open
        ("2026-06-02T01:00", "2026-06-02T12:00"),  # 21:00 EDT: closed
        ("2026-01-15T02:00", "2026-01-15T13:00"),  # 21:00 EST: 08:00 is 13:00 UTC in winter
    ],
)
def test_new_york_summer_and_winter(now: str, opens: str | None) -> None:
    assert DAY.next_open(NEW_YORK, utc(now)) == (utc(opens) if opens else None)


def test_spring_forward_opens_at_eight_local() -> None:
    # 2026-03-08 02:00 EST → 03:00 EDT. The evening before, 22:00 EST (03:00 UTC):
    # the window opens at 08:00 EDT, 12:00 UTC, not 13:00 as the evening's offset says.
    assert DAY.next_open(NEW_YORK, utc("2026-03-08T03:00")) == utc("2026-03-08T12:00")
    assert DAY.next_open(NEW_YORK, utc("2026-03-08T06:30")) == utc("2026-03-08T12:00")


def test_fall_back_opens_at_eight_local() -> None:
    # 2026-11-01 02:00 EDT → 01:00 EST: 08:00 EST is 13:00 UTC.
    assert DAY.next_open(NEW_YORK, utc("2026-11-01T05:30")) == utc("2026-11-01T13:00")
    assert DAY.next_open(NEW_YORK, utc("2026-11-01T02:00")) == utc("2026-11-01T13:00")


def test_a_start_the_clock_skips_opens_at_the_jump() -> None:
    # 02:30 does not happen on 2026-03-08 in New York: the window opens when the
    # clock jumps from 02:00 EST to 03:00 EDT, 07:00 UTC.
    early = QuietHours(clock(2, 30), clock(21))
    assert early.next_open(NEW_YORK, utc("2026-03-08T06:00")) == utc("2026-03-08T07:00")
    # The next day it opens at 02:30 EDT again.
    assert early.next_open(NEW_YORK, utc("2026-03-09T04:00")) == utc("2026-03-09T06:30")


def test_a_start_the_clock_repeats_opens_at_the_next_occurrence() -> None:
    # 01:30 happens twice on 2026-11-01 in New York: 05:30 UTC (EDT) and 06:30 (EST).
    late = QuietHours(clock(1, 30), clock(21))
    assert late.next_open(NEW_YORK, utc("2026-11-01T04:00")) == utc("2026-11-01T05:30")
    # Between the two (01:10 EST, after the clock went back): the second one.
    assert late.next_open(NEW_YORK, utc("2026-11-01T06:10")) == utc("2026-11-01T06:30")


@pytest.mark.parametrize(
    ("zone", "now", "opens"),
    [
        ("Asia/Kathmandu", "2026-06-01T00:00", "2026-06-01T02:15"),  # UTC+5:45
        ("Asia/Tokyo", "2026-06-01T13:00", "2026-06-01T23:00"),  # 22:00 JST
        ("Europe/London", "2026-03-29T00:30", "2026-03-29T07:00"),  # BST starts at 01:00 UTC
        ("Australia/Sydney", "2026-10-03T12:00", "2026-10-03T21:00"),  # AEST → AEDT overnight
        ("Australia/Lord_Howe", "2026-10-03T12:00", "2026-10-03T21:00"),  # a 30-minute change
        ("America/Los_Angeles", "2026-06-01T14:00", "2026-06-01T15:00"),  # 07:00 PDT
    ],
)
def test_other_zones(zone: str, now: str, opens: str) -> None:
    assert DAY.next_open(ZoneInfo(zone), utc(now)) == utc(opens)


def test_the_hold_is_always_ahead_and_inside_the_window() -> None:
    zones = ["America/New_York", "Europe/Berlin", "Australia/Lord_Howe", "Asia/Kolkata"]
    windows = [DAY, QuietHours(clock(2, 30), clock(3)), QuietHours(clock(22), clock(6))]
    start = utc("2026-03-01T00:00")
    for zone_name in zones:
        zone = ZoneInfo(zone_name)
        for window in windows:
            for step in range(0, 24 * 70, 7):  # every 7 hours over ten weeks, two DST changes
                now = start + timedelta(hours=step, minutes=step % 60)
                opens = window.next_open(zone, now)
                if opens is None:
                    assert window.is_open(zone, now)
                    continue
                assert opens > now
                assert window.is_open(zone, opens), (zone_name, window, now, opens)
                assert not window.is_open(zone, opens - timedelta(seconds=1)), (zone_name, now)


def test_hold_plan_per_zone() -> None:
    now = utc("2026-06-01T03:00")  # 23:00 EDT, 20:00 PDT, 12:00 JST
    plan = plan_holds(DAY, "America/New_York", ["America/Los_Angeles", "Asia/Tokyo", "Nope/X"], now)
    assert plan.church_hold == utc("2026-06-01T12:00")
    assert plan.zone_holds["America/Los_Angeles"] is None
    assert plan.zone_holds["Asia/Tokyo"] is None
    assert plan.zone_holds["Nope/X"] == plan.church_hold  # an unknown zone: the church's
    assert plan.holds_anyone
    assert not plan.uniform
    same = plan_holds(DAY, "America/New_York", ["America/Toronto"], now)
    assert same.uniform
    daytime = plan_holds(DAY, "America/New_York", [], utc("2026-06-01T16:00"))
    assert not daytime.holds_anyone


def test_clock_texts_and_zone_names() -> None:
    assert parse_hhmm("08:00") == clock(8)
    assert parse_hhmm("23:59") == clock(23, 59)
    assert format_hhmm(clock(7, 5)) == "07:05"
    for bad in ("8:00", "24:00", "12:60", "noon", "12:00:00", ""):
        with pytest.raises(ValueError, match="HH:MM"):
            parse_hhmm(bad)
    assert is_zone("America/Chicago")
    assert is_zone("UTC")
    assert not is_zone("Mars/Olympus")
    assert not is_zone("../etc/passwd")
    assert not is_zone("")


# -- on the stack ------------------------------------------------------------------------------


def _sql(stack: Stack, statement: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    with psycopg.connect(stack.env["DATABASE_URL"], autocommit=True) as conn:
        cur = conn.execute(statement, params)
        return cur.fetchall() if cur.description else []


def _closed_window(now: datetime) -> dict[str, str]:
    """A one-hour UTC window starting three hours from now: closed now."""
    start = now + timedelta(hours=3)
    return {
        "timezone": "UTC",
        "quiet_hours_start": start.strftime("%H:%M"),
        "quiet_hours_end": (start + timedelta(hours=1)).strftime("%H:%M"),
    }


def _message(church: Church, message_id: str) -> dict[str, Any]:
    found: dict[str, Any] = church.api.get(f"/v1/messages/{message_id}").json()["data"]
    return found


def test_scheduled_and_recurring_sends_wait_for_the_window(
    church: Church, stack: Stack, sim_url: str
) -> None:
    now = datetime.now(UTC)
    closed = _closed_window(now)
    answer = church.session.patch("/v1/church", json=closed)
    assert answer.status_code == 200, answer.text
    assert answer.json()["data"]["quiet_hours_start"] == closed["quiet_hours_start"]

    held_phones = [unique_phone(), unique_phone()]
    away_phone = unique_phone()
    group = church.group()
    held = [church.member(p, [group]) for p in held_phones]
    away = church.member(away_phone, [group])
    # This member lives three hours ahead (UTC+3): for them the window is open now.
    _sql(
        stack,
        "UPDATE member SET timezone = 'Etc/GMT-3' WHERE church_id = %s AND id = %s",
        (uuid.UUID(church.id), uuid.UUID(away)),
    )
    recurring_phone = unique_phone()
    recurring_member = church.member(recurring_phone)

    send_at = (now + timedelta(seconds=1)).isoformat()
    scheduled = church.api.post(
        "/v1/messages",
        json={"body": "Sunday at ten", "target": {"group_ids": [group]}, "send_at": send_at},
    )
    assert scheduled.status_code == 202, scheduled.text
    message_id = scheduled.json()["data"]["id"]
    recurring = church.api.post(
        "/v1/recurring-messages",
        json={
            "name": "daily",
            "body": "Daily word",
            "target": {"member_ids": [recurring_member]},
            "rule": {"frequency": "daily", "time": "06:00"},
        },
    )
    assert recurring.status_code == 201, recurring.text
    recurring_id = recurring.json()["data"]["id"]
    _sql(
        stack,
        "UPDATE recurring_message SET next_run_at = now() WHERE church_id = %s AND id = %s",
        (uuid.UUID(church.id), uuid.UUID(recurring_id)),
    )
    # An immediate broadcast is never held.
    immediate = church.broadcast(group, "Right now")

    counts = church.counts_when(message_id, lambda c: c["delivered"] == 1)
    assert (counts["delivered"], counts["queued"]) == (1, 2), counts
    done = church.counts_when(immediate, lambda c: c["delivered"] == 3)
    assert done["delivered"] == 3, done

    def occurrence_message() -> str | None:
        found = church.api.get(f"/v1/recurring-messages/{recurring_id}/occurrences").json()
        made = [o["message_id"] for o in found["data"] if o["message_id"]]
        return made[0] if made else None

    _wait(lambda: occurrence_message() is not None, what="recurring occurrence made")
    recurring_message = occurrence_message()
    assert recurring_message is not None
    _wait(lambda: _message(church, recurring_message)["status"] == "sending", what="materialized")

    time.sleep(3.0)  # several scheduler ticks and a reconcile pass (5 s in the suite)
    assert texts_sent(sim_url, held_phones) == [1, 1]  # the immediate broadcast only
    assert texts_sent(sim_url, [away_phone, recurring_phone]) == [2, 0]
    assert _message(church, message_id)["status"] == "sending"
    assert _message(church, message_id)["counts"]["queued"] == 2
    assert _message(church, recurring_message)["counts"]["queued"] == 1
    holds = _sql(
        stack,
        "SELECT member_id, not_before FROM message_recipient WHERE church_id = %s "
        "AND message_id = ANY(%s) AND status = 'queued'",
        (uuid.UUID(church.id), [uuid.UUID(message_id), uuid.UUID(recurring_message)]),
    )
    assert {str(m) for m, _ in holds} == {*held, recurring_member}
    opens = (now + timedelta(hours=3)).replace(second=0, microsecond=0)
    assert all(nb == opens for _, nb in holds), (holds, opens)

    # Open the window: the held recipients go out, once, and the messages complete.
    opened = church.session.patch(
        "/v1/church", json={"quiet_hours_start": "00:00", "quiet_hours_end": "00:00"}
    )
    assert opened.status_code == 200, opened.text
    counts = church.counts_when(message_id, lambda c: c["delivered"] == 3)
    assert (counts["delivered"], counts["queued"]) == (3, 0), counts
    recurring_counts = church.counts_when(recurring_message, lambda c: c["delivered"] == 1)
    assert recurring_counts["delivered"] == 1, recurring_counts
    _wait(lambda: _message(church, message_id)["status"] == "completed", what="completed")
    time.sleep(1.5)
    assert texts_sent(sim_url, held_phones) == [2, 2]
    assert texts_sent(sim_url, [away_phone, recurring_phone]) == [2, 1]


def test_a_later_window_moves_the_hold(church: Church, stack: Stack) -> None:
    """Changing the window or the zone while recipients wait works out their time again,
    for members in the church's zone and in their own."""
    now = datetime.now(UTC)
    church.session.patch("/v1/church", json=_closed_window(now)).raise_for_status()
    home = church.member(unique_phone())
    away = church.member(unique_phone())
    # Five hours behind UTC: the closed window [now+3h, now+4h) is closed there too.
    _sql(
        stack,
        "UPDATE member SET timezone = 'Etc/GMT+5' WHERE church_id = %s AND id = %s",
        (uuid.UUID(church.id), uuid.UUID(away)),
    )
    message_id = church.api.post(
        "/v1/messages",
        json={
            "body": "Later",
            "target": {"member_ids": [home, away]},
            "send_at": (now + timedelta(seconds=1)).isoformat(),
        },
    ).json()["data"]["id"]

    def holds() -> dict[str, datetime | None]:
        rows = _sql(
            stack,
            "SELECT member_id, not_before FROM message_recipient "
            "WHERE church_id = %s AND message_id = %s",
            (uuid.UUID(church.id), uuid.UUID(message_id)),
        )
        return {str(r[0]): r[1] for r in rows}

    def minute(delta: timedelta) -> datetime:
        return (now + delta).replace(second=0, microsecond=0)

    _wait(lambda: len(holds()) == 2, what="materialized")
    assert holds() == {home: minute(timedelta(hours=3)), away: minute(timedelta(hours=8))}
    later = now + timedelta(hours=5)
    church.session.patch(
        "/v1/church",
        json={
            "quiet_hours_start": later.strftime("%H:%M"),
            "quiet_hours_end": (later + timedelta(hours=1)).strftime("%H:%M"),
        },
    ).raise_for_status()
    assert holds() == {home: minute(timedelta(hours=5)), away: minute(timedelta(hours=10))}
    # Another church zone: the same local window, read in Tokyo; the member keeps theirs.
    church.session.patch("/v1/church", json={"timezone": "Asia/Tokyo"}).raise_for_status()
    moved = holds()
    tokyo = moved[home]
    assert tokyo is not None
    assert tokyo.astimezone(ZoneInfo("Asia/Tokyo")).strftime("%H:%M") == later.strftime("%H:%M")
    assert tokyo > now
    assert moved[away] == minute(timedelta(hours=10))
