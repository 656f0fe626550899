"""Recurrence rules: daily, weekly or monthly at a local time in a church's zone.

Pure date arithmetic, no storage. A wall-clock time that a spring-forward skips
(02:30 on that night) runs at the same distance past the change (03:30); one
that a fall-back repeats runs once, at its first occurrence.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

from storage.domain.envelope import FieldError

_SEARCH_DAYS = 400

Weekday = Annotated[int, msgspec.Meta(ge=0, le=6)]


class Rule(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    frequency: Literal["daily", "weekly", "monthly"]
    time: Annotated[
        str,
        msgspec.Meta(
            pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$",
            description="Local time of day in the church's time zone, HH:MM (24 h)",
        ),
    ]
    weekdays: (
        Annotated[
            list[Weekday],
            msgspec.Meta(
                min_length=1,
                max_length=7,
                description="Weekly rules: days of the week, 0 = Monday ... 6 = Sunday",
            ),
        ]
        | None
    ) = None
    day_of_month: (
        Annotated[
            int,
            msgspec.Meta(
                ge=-1, le=28, description="Monthly rules: 1 to 28, or -1 for the last day"
            ),
        ]
        | None
    ) = None

    def problems(self, prefix: str = "rule") -> list[FieldError]:
        found: list[FieldError] = []
        if self.frequency == "weekly":
            if not self.weekdays:
                found.append(FieldError(f"{prefix}.weekdays", "is required for a weekly rule"))
            elif len(set(self.weekdays)) != len(self.weekdays):
                found.append(FieldError(f"{prefix}.weekdays", "must not repeat a day"))
        elif self.weekdays is not None:
            found.append(FieldError(f"{prefix}.weekdays", "only weekly rules have weekdays"))
        if self.frequency == "monthly":
            if self.day_of_month is None:
                found.append(FieldError(f"{prefix}.day_of_month", "is required for a monthly rule"))
            elif self.day_of_month == 0:
                found.append(FieldError(f"{prefix}.day_of_month", "must be 1 to 28, or -1"))
        elif self.day_of_month is not None:
            found.append(
                FieldError(f"{prefix}.day_of_month", "only monthly rules have a day_of_month")
            )
        return found

    def matches(self, day: date) -> bool:
        match self.frequency:
            case "daily":
                return True
            case "weekly":
                return day.weekday() in (self.weekdays or [])
            case "monthly":
                if self.day_of_month == -1:
                    return (day + timedelta(days=1)).month != day.month
                return day.day == self.day_of_month
        return False

    def local_time(self) -> tuple[int, int]:
        hour, minute = self.time.split(":")
        return int(hour), int(minute)


def zone_of(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def next_occurrence(
    rule: Rule,
    zone: ZoneInfo,
    after: datetime,
    *,
    starts_on: date | None = None,
    ends_on: date | None = None,
) -> datetime | None:
    """The first occurrence strictly after ``after`` (UTC), or None once past ``ends_on``.

    Dates are the church's local dates; ``starts_on`` / ``ends_on`` are inclusive.
    """
    hour, minute = rule.local_time()
    day = after.astimezone(zone).date()
    if starts_on is not None and starts_on > day:
        day = starts_on
    for _ in range(_SEARCH_DAYS):
        if ends_on is not None and day > ends_on:
            return None
        if rule.matches(day):
            # fold=0: a skipped time keeps the offset before the change (02:30 -> 03:30),
            # a repeated one is its first instance.
            at = datetime(day.year, day.month, day.day, hour, minute, tzinfo=zone).astimezone(UTC)
            if at > after:
                return at
        day += timedelta(days=1)
    return None
