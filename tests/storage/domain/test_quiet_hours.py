"""Quiet hours: the window arithmetic across time zones and daylight-saving changes
(pure; the sends held and released on the real stack are tests/delivery/test_quiet_hours.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from datetime import time as clock
from zoneinfo import ZoneInfo

import pytest

from storage.domain.quiet_hours import QuietHours, format_hhmm, is_zone, parse_hhmm, plan_holds

NEW_YORK = ZoneInfo("America/New_York")
DAY = QuietHours()  # 08:00-21:00


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


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
