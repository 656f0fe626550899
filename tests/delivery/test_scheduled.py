"""Scheduled and recurring sends against the real stack: on time, once, with several
schedulers racing for the same rows."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from deploy.stack import Stack
from storage.pg.recurring_schedules import Ran, run_next_due
from storage.process.services import Services
from storage.process.settings import Settings
from tests.conftest import Church, texts_sent, unique_phone


@pytest.fixture
async def services(stack: Stack) -> AsyncIterator[Services]:
    opened = await Services.open(Settings.from_env(stack.env))
    yield opened
    await opened.close()


@pytest.fixture
def three_schedulers(stack: Stack) -> Iterator[None]:
    """The suite's scheduler plus two more processes, all ticking every second."""
    names = [f"scheduler-extra-{n}-{uuid.uuid4().hex[:6]}" for n in range(2)]
    for name in names:
        stack.spawn(name, "scheduler")
    time.sleep(2.0)  # connected and ticking
    for name in names:
        process = stack.processes[name]
        assert process.poll() is None, f"{name} exited with {process.returncode}"
    try:
        yield
    finally:
        for name in names:
            stack.stop_process(name)


def _sql(stack: Stack, statement: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    with psycopg.connect(stack.env["DATABASE_URL"], autocommit=True) as conn:
        cur = conn.execute(statement, params)
        return cur.fetchall() if cur.description else []


def _make_due(stack: Stack, church: Church, ids: list[str], at: str = "now()") -> None:
    _sql(
        stack,
        f"UPDATE recurring_message SET next_run_at = {at} WHERE church_id = %s AND id = ANY(%s)",
        (church.id, [uuid.UUID(i) for i in ids]),
    )


def _daily(target: dict[str, Any], body: str = "Daily word") -> dict[str, Any]:
    return {
        "name": f"daily-{uuid.uuid4().hex[:6]}",
        "body": body,
        "target": target,
        "rule": {"frequency": "daily", "time": "06:00"},
    }


def _occurrences(church: Church, recurring_id: str) -> list[dict[str, Any]]:
    answer = church.api.get(f"/v1/recurring-messages/{recurring_id}/occurrences")
    assert answer.status_code == 200, answer.text
    found: list[dict[str, Any]] = answer.json()["data"]
    return found


def _wait(check: Any, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {seconds} s")
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.usefixtures("three_schedulers")
def test_three_schedulers_send_each_occurrence_and_scheduled_message_once(
    church: Church, stack: Stack, sim_url: str
) -> None:
    recurring_phones = [unique_phone() for _ in range(4)]
    scheduled_phones = [unique_phone() for _ in range(3)]
    members = [
        church.member(p, first_name=f"M{n}")
        for n, p in enumerate(recurring_phones + scheduled_phones)
    ]
    recurring_ids = []
    for n in range(4):
        answer = church.api.post(
            "/v1/recurring-messages",
            json=_daily({"member_ids": [members[n]]}, "Good morning {{first_name}}"),
        )
        assert answer.status_code == 201, answer.text
        recurring_ids.append(answer.json()["data"]["id"])
    send_at = (datetime.now(UTC) + timedelta(seconds=2)).isoformat()
    scheduled = [
        church.api.post(
            "/v1/messages",
            json={"body": "At two", "target": {"member_ids": [m]}, "send_at": send_at},
        ).json()["data"]["id"]
        for m in members[4:]
    ]
    _make_due(stack, church, recurring_ids)
    phones = recurring_phones + scheduled_phones
    _wait(lambda: texts_sent(sim_url, phones) == [1] * len(phones))
    time.sleep(3.5)  # several more ticks of all three schedulers
    assert texts_sent(sim_url, phones) == [1] * len(phones)

    for recurring_id in recurring_ids:
        occurrences = _occurrences(church, recurring_id)
        assert [o["status"] for o in occurrences] == ["sent"], occurrences
        message = church.api.get(f"/v1/messages/{occurrences[0]['message_id']}").json()["data"]
        assert message["recurring_id"] == recurring_id
        assert message["recipient_count"] == 1
        assert message["personalized"] is True
        found = church.api.get(f"/v1/recurring-messages/{recurring_id}").json()["data"]
        assert datetime.fromisoformat(found["next_run_at"]) > datetime.now(UTC)
        assert datetime.fromisoformat(found["next_run_local"]).strftime("%H:%M") == "06:00"
        assert found["last_run_at"] == occurrences[0]["occurrence_at"]
    for message_id in scheduled:
        counts = church.counts_when(message_id, lambda c: c["delivered"] == 1, 10)
        assert counts["delivered"] == 1, counts
    listed = church.api.get("/v1/messages", params={"limit": 200}).json()["data"]
    assert len(listed) == len(recurring_ids) + len(scheduled)


def test_a_paused_or_deleted_recurring_message_does_not_run(
    church: Church, stack: Stack, sim_url: str
) -> None:
    phones = [unique_phone(), unique_phone()]
    members = [church.member(p) for p in phones]
    paused, deleted = (
        church.api.post("/v1/recurring-messages", json=_daily({"member_ids": [m]})).json()["data"][
            "id"
        ]
        for m in members
    )
    assert (
        church.api.patch(f"/v1/recurring-messages/{paused}", json={"enabled": False}).json()[
            "data"
        ]["next_run_at"]
        is None
    )
    # Even with a due time left behind, a paused row is never claimed.
    _make_due(stack, church, [paused])
    assert church.api.delete(f"/v1/recurring-messages/{deleted}").status_code == 200
    time.sleep(3)
    assert texts_sent(sim_url, phones) == [0, 0]
    assert _occurrences(church, paused) == []


def test_an_occurrence_found_too_late_is_missed_not_sent(
    church: Church, stack: Stack, sim_url: str
) -> None:
    phone = unique_phone()
    member = church.member(phone)
    recurring_id = church.api.post(
        "/v1/recurring-messages", json=_daily({"member_ids": [member]})
    ).json()["data"]["id"]
    _make_due(stack, church, [recurring_id], "now() - interval '3 hours'")
    _wait(lambda: len(_occurrences(church, recurring_id)) == 1, 10)
    occurrence = _occurrences(church, recurring_id)[0]
    assert occurrence["status"] == "missed"
    assert occurrence["message_id"] is None
    found = church.api.get(f"/v1/recurring-messages/{recurring_id}").json()["data"]
    assert datetime.fromisoformat(found["next_run_at"]) > datetime.now(UTC)
    time.sleep(1.5)
    assert texts_sent(sim_url, [phone]) == [0]


@pytest.mark.anyio
async def test_racing_claims_make_one_occurrence_and_a_stale_one_is_refused(
    church: Church, stack: Stack, services: Services
) -> None:
    """Many claimers at one due row in this process (the suite's scheduler may be one
    more): one message; then a replay of the same occurrence makes nothing."""
    member = church.member(unique_phone())
    recurring_id = church.api.post(
        "/v1/recurring-messages", json=_daily({"member_ids": [member]})
    ).json()["data"]["id"]
    due = datetime.now(UTC).replace(microsecond=0)
    _sql(
        stack,
        "UPDATE recurring_message SET next_run_at = %s WHERE church_id = %s AND id = %s",
        (due, church.id, recurring_id),
    )

    async def claim() -> list[Ran]:
        ran: list[Ran] = []
        async with services.pool.connection() as conn:
            while (done := await run_next_due(conn)) is not None:
                ran.append(done)
        return ran

    results = await asyncio.gather(*(claim() for _ in range(8)))
    mine = [r for batch in results for r in batch if str(r.recurring_id) == recurring_id]
    occurrences = _occurrences(church, recurring_id)
    assert [o["status"] for o in occurrences] == ["sent"]
    assert len(mine) <= 1  # the suite's scheduler may have won it
    # A scheduler that read the old next_run_at: the unique key refuses a second one.
    _sql(
        stack,
        "UPDATE recurring_message SET next_run_at = %s WHERE church_id = %s AND id = %s",
        (due, church.id, recurring_id),
    )

    def advanced() -> bool:
        found = church.api.get(f"/v1/recurring-messages/{recurring_id}").json()["data"]
        return datetime.fromisoformat(found["next_run_at"]) > due

    _wait(advanced, 10)
    assert [o["status"] for o in _occurrences(church, recurring_id)] == ["sent"]
    rows = _sql(
        stack,
        "SELECT count(*) FROM message WHERE church_id = %s AND recurring_id = %s",
        (church.id, recurring_id),
    )
    assert rows[0][0] == 1
