"""Quiet hours: the daily window in which scheduled and recurring sends may reach a member.

A window is local wall-clock time, ``[start, end)``: 08:00-21:00 by default, set per
church. It is read in the member's time zone when known, else the church's. A
window may cross midnight (22:00-06:00); ``start == end`` means no quiet hours.
Immediate broadcasts are never held: only messages with ``send_at`` or made by a
recurring schedule respect the window.

The time arithmetic is pure (no I/O), so it is tested on its own, daylight-saving
changes included:

- a window opening at a wall time the clock skips (02:30 on a spring-forward
  night) opens at the jump, the first instant whose local time is past it;
- one opening at a wall time that happens twice (01:30 on a fall-back night)
  opens at its first occurrence still ahead.

``HoldPlan`` turns one window into the hold of every zone an audience uses, so
materializing 50,000 recipients asks Python about a handful of zones, never per row.

In Postgres, recipients held by a window are ``storage/pg/held_recipients.py``'s.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

import msgspec

DEFAULT_START = time(8, 0)
DEFAULT_END = time(21, 0)

_HHMM = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")
HHMM_PATTERN = _HHMM.pattern


def parse_hhmm(text: str) -> time:
    """``"08:00"`` → ``time(8, 0)``; anything else is a ValueError."""
    found = _HHMM.match(text)
    if found is None:
        raise ValueError(f"{text!r} is not a time of day as HH:MM (00:00 to 23:59)")
    return time(int(found.group(1)), int(found.group(2)))


def format_hhmm(value: time) -> str:
    return f"{value.hour:02d}:{value.minute:02d}"


_zones: frozenset[str] | None = None


def is_zone(name: str) -> bool:
    """Whether ``name`` is an IANA time zone this machine knows (``Europe/Berlin``, ``UTC``)."""
    global _zones
    if _zones is None:
        _zones = frozenset(available_timezones())
    return name in _zones


def zone_or(name: str | None, fallback: ZoneInfo) -> ZoneInfo:
    """The zone named, or ``fallback`` when none is given or the name is unknown."""
    if not name or not is_zone(name):
        return fallback
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return fallback


class QuietHours(msgspec.Struct, frozen=True):
    """Sends are allowed from ``start`` (inclusive) to ``end`` (exclusive), local time."""

    start: time = DEFAULT_START
    end: time = DEFAULT_END

    @property
    def always_open(self) -> bool:
        return self.start == self.end

    def allows(self, local: time) -> bool:
        """Whether a send may go out at this local wall-clock time."""
        local = local.replace(tzinfo=None)
        if self.always_open:
            return True
        if self.start < self.end:
            return self.start <= local < self.end
        return local >= self.start or local < self.end

    def is_open(self, zone: ZoneInfo, at: datetime) -> bool:
        return self.allows(at.astimezone(zone).time())

    def next_open(self, zone: ZoneInfo, now: datetime) -> datetime | None:
        """None when the window is open at ``now``; else the instant (UTC) it next opens."""
        if self.is_open(zone, now):
            return None
        day = now.astimezone(zone).date()
        for offset in range(3):
            for at in self._openings(zone, day + timedelta(days=offset)):
                # A window the clock skips whole (02:30-03:00 on a spring-forward
                # night) does not open that day.
                if at > now and self.is_open(zone, at):
                    return at
        raise AssertionError("a daily window opens within three days")  # pragma: no cover

    def _openings(self, zone: ZoneInfo, day: date) -> list[datetime]:
        """The instants (UTC) on local date ``day`` at which the clock reads ``start``:
        one usually, two on a fall-back night, and the jump itself when the clock
        skips over ``start``."""
        wall = datetime.combine(day, self.start)
        found = []
        for fold in (0, 1):
            at = wall.replace(tzinfo=zone, fold=fold).astimezone(UTC)
            if at.astimezone(zone).replace(tzinfo=None) == wall:
                found.append(at)
        if found:
            return sorted(set(found))
        return [_jump_over(zone, wall)]


def _jump_over(zone: ZoneInfo, wall: datetime) -> datetime:
    """The first instant whose local time is at or past ``wall``, a wall time the clock
    skips. ``fold`` 0 and 1 resolve it with the offsets before and after the jump,
    which bracket the jump; a binary search over whole seconds finds it."""
    a = int(wall.replace(tzinfo=zone, fold=0).timestamp())
    b = int(wall.replace(tzinfo=zone, fold=1).timestamp())
    low, high = min(a, b), max(a, b)

    def past(ts: int) -> bool:
        return datetime.fromtimestamp(ts, zone).replace(tzinfo=None) >= wall

    while high - low > 1:
        middle = (low + high) // 2
        if past(middle):
            high = middle
        else:
            low = middle
    return datetime.fromtimestamp(low if past(low) else high, UTC)


class HoldPlan(msgspec.Struct, frozen=True):
    """When each recipient of one send may go: the church zone's hold and, for members
    with a zone of their own, that zone's. A hold of None means "now"."""

    church_hold: datetime | None
    zone_holds: dict[str, datetime | None]
    """Member time-zone name → hold; unknown names are held like the church's zone."""

    @property
    def uniform(self) -> bool:
        """Every recipient gets the church's hold (no member zone differs from it)."""
        return all(h == self.church_hold for h in self.zone_holds.values())

    @property
    def holds_anyone(self) -> bool:
        return self.church_hold is not None or any(h is not None for h in self.zone_holds.values())


def plan_holds(
    window: QuietHours, church_zone: str, member_zones: Iterable[str], now: datetime
) -> HoldPlan:
    """The holds for a send starting at ``now``, per zone the audience uses."""
    home = zone_or(church_zone, ZoneInfo("UTC"))
    church_hold = window.next_open(home, now)
    zone_holds = {
        name: window.next_open(zone_or(name, home), now) for name in set(member_zones) if name
    }
    return HoldPlan(church_hold=church_hold, zone_holds=zone_holds)
