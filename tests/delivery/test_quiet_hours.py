"""Quiet hours on the real stack: scheduled and recurring sends held and released
(the window arithmetic is tests/storage/domain/test_quiet_hours.py)."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest

from deploy.stack import Stack
from storage.domain.quiet_hours import QuietHours
from tests.conftest import Church, texts_sent, unique_phone
from tests.conftest import wait_until as _wait

NEW_YORK = ZoneInfo("America/New_York")
DAY = QuietHours()  # 08:00-21:00


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


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


@pytest.mark.slow
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
