"""Recurring messages: the rule math across DST changes (no I/O), and the REST surface."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

from deploy.stack import Stack
from storage.domain.recurrence import Rule, next_occurrence
from tests.api.test_messages import make_template
from tests.conftest import Church, unique_phone

NEW_YORK = ZoneInfo("America/New_York")
LONDON = ZoneInfo("Europe/London")


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def runs(rule: Rule, zone: ZoneInfo, after: datetime, count: int, **bounds: Any) -> list[str]:
    found: list[str] = []
    at: datetime | None = after
    for _ in range(count):
        assert at is not None
        at = next_occurrence(rule, zone, at, **bounds)
        if at is None:
            break
        found.append(at.strftime("%Y-%m-%d %H:%M"))
    return found


# -- rule math -------------------------------------------------------------------------


def test_daily_keeps_local_time_across_spring_forward() -> None:
    rule = Rule(frequency="daily", time="09:00")
    # 2026-03-08 is the US change: 09:00 EST is 14:00 UTC, 09:00 EDT is 13:00 UTC.
    assert runs(rule, NEW_YORK, utc("2026-03-06T15:00"), 3) == [
        "2026-03-07 14:00",
        "2026-03-08 13:00",
        "2026-03-09 13:00",
    ]


def test_a_time_skipped_by_spring_forward_runs_an_hour_later() -> None:
    rule = Rule(frequency="daily", time="02:30")
    assert runs(rule, NEW_YORK, utc("2026-03-07T08:00"), 3) == [
        "2026-03-08 07:30",  # 03:30 EDT: 02:30 does not exist that night
        "2026-03-09 06:30",  # 02:30 EDT
        "2026-03-10 06:30",
    ]


def test_a_time_repeated_by_fall_back_runs_once() -> None:
    rule = Rule(frequency="daily", time="01:30")
    # 2026-11-01: 01:30 happens at 05:30 UTC (EDT) and again at 06:30 UTC (EST).
    assert runs(rule, NEW_YORK, utc("2026-10-31T12:00"), 3) == [
        "2026-11-01 05:30",
        "2026-11-02 06:30",
        "2026-11-03 06:30",
    ]


def test_weekly_on_chosen_days_across_the_change() -> None:
    sunday = Rule(frequency="weekly", time="09:00", weekdays=[6])
    assert runs(sunday, NEW_YORK, utc("2026-02-28T12:00"), 3) == [
        "2026-03-01 14:00",
        "2026-03-08 13:00",
        "2026-03-15 13:00",
    ]
    monday_wednesday = Rule(frequency="weekly", time="19:15", weekdays=[0, 2])
    assert runs(monday_wednesday, LONDON, utc("2026-03-25T00:00"), 4) == [
        "2026-03-25 19:15",  # Wednesday, GMT
        "2026-03-30 18:15",  # Monday, BST (changed on Sunday the 29th)
        "2026-04-01 18:15",
        "2026-04-06 18:15",
    ]


def test_monthly_on_a_day_and_on_the_last_day() -> None:
    fifteenth = Rule(frequency="monthly", time="09:00", day_of_month=15)
    assert runs(fifteenth, NEW_YORK, utc("2026-01-20T00:00"), 3) == [
        "2026-02-15 14:00",
        "2026-03-15 13:00",
        "2026-04-15 13:00",
    ]
    last = Rule(frequency="monthly", time="18:00", day_of_month=-1)
    assert runs(last, LONDON, utc("2026-02-01T00:00"), 3) == [
        "2026-02-28 18:00",
        "2026-03-31 17:00",
        "2026-04-30 17:00",
    ]
    assert runs(last, LONDON, utc("2028-02-01T00:00"), 1) == ["2028-02-29 18:00"]


def test_starts_on_and_ends_on_are_local_dates_inclusive() -> None:
    rule = Rule(frequency="daily", time="23:30")
    # 23:30 in New York on 2026-06-01 is already 2026-06-02 in UTC.
    bounds = {"starts_on": date(2026, 6, 1), "ends_on": date(2026, 6, 2)}
    assert runs(rule, NEW_YORK, utc("2026-01-01T00:00"), 5, **bounds) == [
        "2026-06-02 03:30",
        "2026-06-03 03:30",
    ]


def test_the_next_run_is_strictly_after() -> None:
    rule = Rule(frequency="daily", time="09:00")
    at = next_occurrence(rule, NEW_YORK, utc("2026-07-01T13:00"))
    assert at == utc("2026-07-02T13:00")


@pytest.mark.parametrize(
    ("rule", "field"),
    [
        (Rule(frequency="weekly", time="09:00"), "rule.weekdays"),
        (Rule(frequency="weekly", time="09:00", weekdays=[1, 1]), "rule.weekdays"),
        (Rule(frequency="daily", time="09:00", weekdays=[1]), "rule.weekdays"),
        (Rule(frequency="monthly", time="09:00"), "rule.day_of_month"),
        (Rule(frequency="monthly", time="09:00", day_of_month=0), "rule.day_of_month"),
        (Rule(frequency="weekly", time="09:00", weekdays=[1], day_of_month=3), "rule.day_of_month"),
    ],
)
def test_rule_problems_name_the_field(rule: Rule, field: str) -> None:
    assert [p.field for p in rule.problems()] == [field]


# -- REST ------------------------------------------------------------------------------


def _weekly(group: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": "Sunday reminder",
        "body": "Hi {{first_name}}, service at 10",
        "target": {"group_ids": [group]},
        "rule": {"frequency": "weekly", "time": "08:00", "weekdays": [6]},
    } | extra


def _check_next_run(found: dict[str, Any], hour_minute: str) -> datetime:
    assert found["timezone"] == "America/New_York"
    at = datetime.fromisoformat(found["next_run_at"])
    local = datetime.fromisoformat(found["next_run_local"])
    assert at == local
    assert local.utcoffset() == at.astimezone(NEW_YORK).utcoffset()
    assert local.strftime("%H:%M") == hour_minute
    assert at > datetime.now(UTC)
    return local


def test_crud_pause_and_delete(church: Church) -> None:
    group = church.group()
    created = church.api.post("/v1/recurring-messages", json=_weekly(group))
    assert created.status_code == 201, created.text
    found = created.json()["data"]
    recurring_id = found["id"]
    assert found["enabled"] is True
    local = _check_next_run(found, "08:00")
    assert local.weekday() == 6

    listed = church.api.get("/v1/recurring-messages").json()
    assert [r["id"] for r in listed["data"]] == [recurring_id]
    assert listed["meta"]["next_cursor"] is None
    assert church.api.get(f"/v1/recurring-messages/{recurring_id}").json()["data"] == found

    renamed = church.api.patch(f"/v1/recurring-messages/{recurring_id}", json={"name": "Sunday"})
    assert renamed.status_code == 200, renamed.text
    assert renamed.json()["data"]["name"] == "Sunday"
    assert renamed.json()["data"]["next_run_at"] == found["next_run_at"]

    monthly = {"rule": {"frequency": "monthly", "time": "18:30", "day_of_month": -1}}
    moved = church.api.patch(f"/v1/recurring-messages/{recurring_id}", json=monthly).json()["data"]
    local = _check_next_run(moved, "18:30")
    assert date.fromordinal(local.date().toordinal() + 1).day == 1  # the last day of a month

    paused = church.api.patch(f"/v1/recurring-messages/{recurring_id}", json={"enabled": False})
    assert paused.json()["data"]["enabled"] is False
    assert paused.json()["data"]["next_run_at"] is None
    assert paused.json()["data"]["next_run_local"] is None
    resumed = church.api.patch(f"/v1/recurring-messages/{recurring_id}", json={"enabled": True})
    _check_next_run(resumed.json()["data"], "18:30")

    deleted = church.api.delete(f"/v1/recurring-messages/{recurring_id}")
    assert deleted.status_code == 200, deleted.text
    assert church.api.get(f"/v1/recurring-messages/{recurring_id}").status_code == 404
    assert church.api.get("/v1/recurring-messages").json()["data"] == []


def test_template_based_recurring_message(church: Church, stack: Stack) -> None:
    group = church.group()
    template = make_template(church, stack, "Hello {{first_name}}")
    body = _weekly(group) | {"template_id": template}
    del body["body"]
    created = church.api.post("/v1/recurring-messages", json=body)
    assert created.status_code == 201, created.text
    assert created.json()["data"]["template_id"] == template
    assert created.json()["data"]["body"] is None
    recurring_id = created.json()["data"]["id"]
    # A body replaces the template.
    swapped = church.api.patch(f"/v1/recurring-messages/{recurring_id}", json={"body": "Plain"})
    assert swapped.json()["data"]["template_id"] is None
    assert swapped.json()["data"]["body"] == "Plain"


def _fields(answer: httpx.Response) -> set[str]:
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["code"] == "validation_error"
    return {d["field"] for d in answer.json()["error"]["details"]}


def test_validation_errors_name_their_fields(church: Church, stack: Stack) -> None:
    group = church.group()
    post = church.api.post
    url = "/v1/recurring-messages"
    rule = {"frequency": "weekly", "time": "08:00"}
    assert _fields(post(url, json=_weekly(group, rule=rule))) == {"rule.weekdays"}
    rule = {"frequency": "monthly", "time": "08:00", "day_of_month": 29}
    assert _fields(post(url, json=_weekly(group, rule=rule))) == {"rule.day_of_month"}
    rule = {"frequency": "monthly", "time": "08:00", "day_of_month": 0}
    assert _fields(post(url, json=_weekly(group, rule=rule))) == {"rule.day_of_month"}
    rule = {"frequency": "daily", "time": "24:00"}
    assert _fields(post(url, json=_weekly(group, rule=rule))) == {"rule.time"}
    rule = {"frequency": "hourly", "time": "08:00"}
    assert _fields(post(url, json=_weekly(group, rule=rule))) == {"rule.frequency"}
    rule = {"frequency": "weekly", "time": "08:00", "weekdays": [7]}
    assert _fields(post(url, json=_weekly(group, rule=rule))) == {"rule.weekdays[0]"}
    rule = {"frequency": "daily", "time": "08:00", "hour": 3}
    assert _fields(post(url, json=_weekly(group, rule=rule))) == {"rule.hour"}
    assert _fields(post(url, json=_weekly(group, body="Hi {{nick}}"))) == {"body"}
    template = make_template(church, stack, "Hello")
    assert _fields(post(url, json=_weekly(group, template_id=template))) == {"body"}
    dates = {"starts_on": "2030-02-01", "ends_on": "2030-01-01"}
    assert _fields(post(url, json=_weekly(group, **dates))) == {"ends_on"}
    assert _fields(post(url, json=_weekly(group, target={}))) == {"target"}
    no_name = _weekly(group)
    del no_name["name"]
    assert _fields(post(url, json=no_name)) == {"name"}

    recurring_id = post(url, json=_weekly(group)).json()["data"]["id"]
    patch = church.api.patch
    path = f"{url}/{recurring_id}"
    assert _fields(patch(path, json={"rule": {"frequency": "monthly", "time": "08:00"}})) == {
        "rule.day_of_month"
    }
    assert _fields(patch(path, json={"body": "x", "template_id": template})) == {"body"}
    assert _fields(patch(path, json={"enabled": "yes"})) == {"enabled"}


def test_another_churchs_recurring_messages_are_not_found(
    church: Church, other_church: Church, stack: Stack
) -> None:
    their_group = other_church.group()
    theirs = other_church.api.post("/v1/recurring-messages", json=_weekly(their_group))
    their_id = theirs.json()["data"]["id"]
    for method, path, body in [
        ("GET", f"/v1/recurring-messages/{their_id}", None),
        ("PATCH", f"/v1/recurring-messages/{their_id}", {"enabled": False}),
        ("DELETE", f"/v1/recurring-messages/{their_id}", None),
        ("GET", f"/v1/recurring-messages/{their_id}/occurrences", None),
        ("GET", f"/v1/recurring-messages/{uuid.uuid4()}", None),
        ("GET", "/v1/recurring-messages/nope", None),
    ]:
        answer = church.api.request(method, path, json=body)
        assert answer.status_code == 404, (method, path, answer.text)
        assert answer.json()["error"]["code"] == "not_found"
    # Their group or template in our recurring message: not found either.
    assert church.api.post("/v1/recurring-messages", json=_weekly(their_group)).status_code == 404
    their_template = make_template(other_church, stack, "Hi")
    mine = _weekly(church.group()) | {"template_id": their_template}
    del mine["body"]
    assert church.api.post("/v1/recurring-messages", json=mine).status_code == 404
    assert church.api.get("/v1/recurring-messages").json()["data"] == []
    # Untouched for its owner.
    still = other_church.api.get(f"/v1/recurring-messages/{their_id}").json()["data"]
    assert still["enabled"] is True


def test_a_member_target_is_checked(church: Church) -> None:
    member = church.member(unique_phone())
    body = _weekly(church.group()) | {"target": {"member_ids": [member, str(uuid.uuid4())]}}
    answer = church.api.post("/v1/recurring-messages", json=body)
    assert answer.status_code == 404
