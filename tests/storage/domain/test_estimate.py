"""Send estimates, pure: the sending limits as queues, work ahead, quiet-hours holds,
an idle bucket's burst, observed paces (the endpoint is tests/api/test_estimates.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from datetime import time as clock
from zoneinfo import ZoneInfo

import pytest

from storage.domain.estimate import (
    FALLBACK_RATE,
    Ahead,
    Limits,
    Queue,
    Wave,
    drain,
    finishes_at,
    limited,
    queues,
    segments_total,
    start_waves,
)
from storage.domain.quiet_hours import QuietHours, plan_holds

NOW = datetime(2026, 12, 3, 15, 0, tzinfo=UTC)


def seconds(at: datetime) -> float:
    return (at - NOW).total_seconds()


def estimate(
    count: int,
    limits: Limits,
    *,
    media: bool = False,
    ahead: Ahead | None = None,
    recent: float | None = None,
    running: float | None = None,
) -> float:
    through = queues(limits, media=media, ahead=ahead or Ahead(), recent_rate=recent)
    return seconds(finishes_at(NOW, [Wave(NOW, count)], through, running_rate=running))


def test_the_number_rate_paces_a_broadcast_after_its_burst() -> None:
    # 20,000 at 50/s: the idle bucket's 50 tokens go at once, the rest at 50 a second.
    assert estimate(20_000, Limits(per_number=50)) == pytest.approx(399.0)
    # A burst of 4 s saves 4 s.
    assert estimate(20_000, Limits(per_number=50, burst_s=4)) == pytest.approx(396.0)


def test_the_estimate_moves_with_the_rate() -> None:
    slow = estimate(10_000, Limits(per_number=10))
    fast = estimate(10_000, Limits(per_number=100))
    assert slow == pytest.approx(999.0)
    assert fast == pytest.approx(99.0)


def test_the_slowest_limit_decides() -> None:
    both = Limits(per_number=50, per_account=20)
    assert estimate(2_000, both) == pytest.approx((2_000 - 20) / 20)
    assert estimate(2_000, Limits(per_number=20, per_account=50)) == pytest.approx(99.0)


def test_mms_pass_their_own_account_bucket_and_sms_do_not() -> None:
    limits = Limits(per_number=50, per_account=1000, mms_per_account=15)
    assert estimate(1_500, limits, media=True) == pytest.approx((1_500 - 15) / 15)
    assert estimate(1_500, limits, media=False) == pytest.approx((1_500 - 50) / 50)


def test_work_ahead_on_the_number_comes_first_and_empties_the_bucket() -> None:
    limits = Limits(per_number=50)
    assert estimate(1_000, limits, ahead=Ahead(number=500)) == pytest.approx(30.0)
    # Work ahead on other numbers only counts against the account's limit.
    assert estimate(1_000, limits, ahead=Ahead(account=10_000)) == pytest.approx(19.0)
    account = Limits(per_number=50, per_account=100)
    assert estimate(1_000, account, ahead=Ahead(account=10_000)) == pytest.approx(110.0)


def test_mms_work_ahead_counts_only_for_mms() -> None:
    limits = Limits(per_account=1000, mms_per_account=10)
    ahead = Ahead(account=300, mms=300)
    assert estimate(100, limits, media=True, ahead=ahead) == pytest.approx(40.0)
    assert estimate(100, limits, media=False, ahead=ahead) == pytest.approx(0.4)


def test_without_limits_the_recent_pace_is_used_or_a_fallback() -> None:
    assert estimate(6_000, Limits(), recent=200.0) == pytest.approx(30.0)
    assert estimate(6_000, Limits(), recent=200.0, ahead=Ahead(account=4_000)) == pytest.approx(
        50.0
    )
    assert estimate(6_000, Limits()) == pytest.approx(6_000 / FALLBACK_RATE)
    assert estimate(6_000, Limits(), recent=0.0) == pytest.approx(6_000 / FALLBACK_RATE)
    # Three texts in the last minute say the workers were idle, not slow.
    assert estimate(6_000, Limits(), recent=0.05) == pytest.approx(6_000 / FALLBACK_RATE)
    assert not limited(Limits(), media=False)
    assert not limited(Limits(mms_per_account=15), media=False)
    assert limited(Limits(mms_per_account=15), media=True)
    assert limited(Limits(per_account=1), media=False)
    # The observed pace replaces no configured limit.
    assert estimate(6_000, Limits(per_number=100), recent=10.0) == pytest.approx(59.0)


def test_a_running_broadcast_has_no_burst_left() -> None:
    through = queues(Limits(per_number=50), media=False, ahead=Ahead(), running=True)
    assert seconds(finishes_at(NOW, [Wave(NOW, 1_000)], through)) == pytest.approx(20.0)


def test_a_slower_running_pace_pushes_the_finish_and_a_faster_one_does_not() -> None:
    limits = Limits(per_number=50)
    assert estimate(5_000, limits, running=40.0) == pytest.approx(125.0)
    assert estimate(5_000, limits, running=500.0) == pytest.approx(99.0)


def test_nothing_left_finishes_now_or_at_a_later_start() -> None:
    through = queues(Limits(per_number=50), media=False, ahead=Ahead())
    assert finishes_at(NOW, [], through) == NOW
    assert finishes_at(NOW, [Wave(NOW, 0)], through) == NOW
    later = NOW + timedelta(hours=1)
    assert finishes_at(NOW, [Wave(later, 0)], through) == later


def test_a_later_wave_waits_and_its_bucket_refills_meanwhile() -> None:
    queue = Queue(rate=10, capacity=10, ahead=0)
    later = NOW + timedelta(minutes=10)
    # 10 go from the full bucket now, 90 take 9 s; at +10 min the bucket is full again.
    waves = [Wave(NOW, 100), Wave(later, 100)]
    assert seconds(drain(queue, NOW, waves)) == pytest.approx(600 + 9)
    # Waves that overlap queue behind each other.
    close = [Wave(NOW, 100), Wave(NOW + timedelta(seconds=2), 100)]
    assert seconds(drain(queue, NOW, close)) == pytest.approx(19.0)


def test_work_ahead_done_before_a_scheduled_start_does_not_delay_it() -> None:
    queue = Queue(rate=10, capacity=10, ahead=100)
    start = NOW + timedelta(hours=1)
    # The backlog takes 10 s, then the bucket refills to 10 before the start.
    assert seconds(drain(queue, NOW, [Wave(start, 50)])) == pytest.approx(3600 + 4)


def test_quiet_hours_hold_a_scheduled_start_until_the_window_opens() -> None:
    window = QuietHours(clock(8), clock(21))
    # 22:00 in New York: closed until 08:00 the next morning (13:00 UTC).
    start = datetime(2026, 12, 4, 3, 0, tzinfo=UTC)
    plan = plan_holds(window, "America/New_York", [], start)
    waves = start_waves(1_000, start, plan)
    assert waves == [Wave(datetime(2026, 12, 4, 13, 0, tzinfo=UTC), 1_000)]
    through = queues(Limits(per_number=10), media=False, ahead=Ahead())
    finish = finishes_at(NOW, waves, through)
    assert finish == datetime(2026, 12, 4, 13, 0, tzinfo=UTC) + timedelta(seconds=99)
    assert finish.astimezone(ZoneInfo("America/New_York")).hour == 8


def test_an_open_window_or_no_plan_starts_at_once() -> None:
    window = QuietHours(clock(8), clock(21))
    start = datetime(2026, 12, 4, 15, 0, tzinfo=UTC)  # 10:00 in New York
    assert start_waves(5, start, plan_holds(window, "America/New_York", [], start)) == [
        Wave(start, 5)
    ]
    assert start_waves(5, start, None) == [Wave(start, 5)]
    always = QuietHours(clock(0), clock(0))
    assert start_waves(5, start, plan_holds(always, "America/New_York", [], start)) == [
        Wave(start, 5)
    ]


def test_a_member_zone_opening_later_bounds_the_finish() -> None:
    window = QuietHours(clock(8), clock(21))
    # 14:00 UTC: open in London (14:00), closed in Los Angeles (06:00) until 16:00 UTC.
    start = datetime(2026, 12, 4, 14, 0, tzinfo=UTC)
    plan = plan_holds(window, "Europe/London", ["America/Los_Angeles", "Europe/London"], start)
    waves = start_waves(100, start, plan)
    assert waves == [Wave(start, 100), Wave(datetime(2026, 12, 4, 16, 0, tzinfo=UTC), 1)]
    through = queues(Limits(per_number=10), media=False, ahead=Ahead())
    assert finishes_at(start, waves, through) == datetime(2026, 12, 4, 16, 0, tzinfo=UTC)


def test_segments_total_counts_sms_segments_and_one_per_mms() -> None:
    assert segments_total(20_000, 2, media=False) == 40_000
    assert segments_total(20_000, 2, media=True) == 20_000
    assert segments_total(3, 0, media=False) == 3
    assert segments_total(-1, 2, media=False) == 0
