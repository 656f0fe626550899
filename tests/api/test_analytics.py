"""Analytics against a broadcast's real outcomes (mixed deliveries, a reply)."""

from __future__ import annotations

import re
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from deploy.stack import Stack
from storage.pg.analytics import church_summary, message_analytics
from storage.pg.messages import get_message
from storage.process.services import Services
from storage.process.settings import Settings
from tests.conftest import Church, unique_phone


@pytest.fixture
def half_undelivered(sim_url: str) -> Iterator[None]:
    answer = httpx.post(
        f"{sim_url}/_sim/config", json={"outcomes": {"delivered": 0.5, "delivery_failed": 0.5}}
    )
    assert answer.status_code == 200, answer.text
    try:
        yield
    finally:
        httpx.post(
            f"{sim_url}/_sim/config",
            json={"outcomes": {"delivered": 1.0, "delivery_failed": 0.0}},
        )


def _counts(recipients: list[dict[str, Any]]) -> dict[str, int]:
    found = Counter(r["status"] for r in recipients)
    names = ("queued", "sending", "sent", "delivered", "failed", "undelivered", "skipped")
    return {name: found.get(name, 0) for name in names}


def _failures(recipients: list[dict[str, Any]]) -> list[dict[str, Any]]:
    codes = Counter(
        r["error_code"] or "unknown" for r in recipients if r["status"] in ("failed", "undelivered")
    )
    ranked = sorted(codes.items(), key=lambda kv: (-kv[1], kv[0]))
    return [{"error_code": code, "count": n} for code, n in ranked]


@pytest.mark.usefixtures("half_undelivered")
def test_analytics_match_a_broadcasts_outcomes(
    church: Church, other_church: Church, sim_url: str
) -> None:
    group = church.group()
    phones = [unique_phone() for _ in range(6)]
    for phone in phones:
        church.member(phone, [group])
    body = "Choir practice moved to Thursday"
    message_id = church.broadcast(group, body)
    counts = church.counts_when(message_id, lambda c: c["delivered"] + c["undelivered"] == 6, 20)
    assert counts["delivered"] + counts["undelivered"] == 6, counts
    # A canceled scheduled message is not "sent".
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    canceled = church.api.post(
        "/v1/messages", json={"body": "x", "target": {"group_ids": [group]}, "send_at": later}
    ).json()["data"]["id"]
    assert church.api.post(f"/v1/messages/{canceled}/cancel").status_code == 200
    # Another church's traffic stays out of ours.
    their_group = other_church.group()
    other_church.member(unique_phone(), [their_group])
    other_church.broadcast(their_group)

    reply = httpx.post(
        f"{sim_url}/_sim/inbound",
        json={"from": phones[0], "to": church.phone_number, "text": "See you there"},
    )
    assert reply.status_code in (200, 202), reply.text
    assert len(church.conversations_when(1)) == 1

    recipients = church.api.get(f"/v1/messages/{message_id}/recipients").json()["data"]
    real = _counts(recipients)
    delivered = real["delivered"]
    segments = church.api.get(f"/v1/messages/{message_id}").json()["data"]["segments"]

    answer = church.api.get(f"/v1/messages/{message_id}/analytics")
    assert answer.status_code == 200, answer.text
    one = answer.json()["data"]
    assert one["message_id"] == message_id
    assert one["status"] == "completed"
    assert one["recipient_count"] == 6
    assert one["counts"] == real
    assert one["delivery_rate"] == round(delivered / 6, 4)
    assert one["failed_by_error_code"] == _failures(recipients)
    assert one["segments_sent"] == 6 * segments
    assert one["replies"] == 1
    assert one["replying_members"] == 1
    if delivered:
        timing = one["seconds_to_delivered"]
        assert 0 <= timing["p50"] <= timing["p90"] < 30
    else:
        assert one["seconds_to_delivered"] is None

    summary = church.api.get("/v1/analytics/summary")
    assert summary.status_code == 200, summary.text
    data = summary.json()["data"]
    assert data["messages_sent"] == 1
    assert data["recipients"] == real
    assert data["delivery_rate"] == round(delivered / 6, 4)
    assert data["failed_by_error_code"] == _failures(recipients)
    assert data["segments_sent"] == 6 * segments
    assert data["members_total"] == 6
    assert data["members_opted_out"] == 0
    assert data["conversations_open"] == 1
    assert data["conversations_closed"] == 0
    assert data["inbound_messages"] == 1
    # Served from the cache the second time, and the same.
    assert church.api.get("/v1/analytics/summary").json()["data"] == data

    # A new broadcast is in the summary at once (accepting invalidates the cache).
    church.broadcast(group, "One more")
    assert church.api.get("/v1/analytics/summary").json()["data"]["messages_sent"] == 2

    before = {"since": "2020-01-01T00:00:00Z", "until": "2020-02-01T00:00:00Z"}
    empty = church.api.get("/v1/analytics/summary", params=before).json()["data"]
    assert empty["messages_sent"] == 0
    assert empty["delivery_rate"] is None
    assert empty["members_total"] == 6  # members are counted as they are now


def test_summary_validation_names_the_parameter(church: Church) -> None:
    for params, field in [
        ({"since": "yesterday"}, "since"),
        ({"until": "2026-01-01T00:00:00"}, "until"),
        ({"since": "2026-02-01T00:00:00Z", "until": "2026-01-01T00:00:00Z"}, "since"),
        ({"since": "2020-01-01T00:00:00Z", "until": "2026-01-01T00:00:00Z"}, "since"),
    ]:
        answer = church.api.get("/v1/analytics/summary", params=params)
        assert answer.status_code == 422, (params, answer.text)
        assert [d["field"] for d in answer.json()["error"]["details"]] == [field]


def test_a_new_church_has_an_empty_summary(church: Church) -> None:
    data = church.api.get("/v1/analytics/summary").json()["data"]
    assert data["messages_sent"] == 0
    assert data["recipients"]["delivered"] == 0
    assert data["failed_by_error_code"] == []
    assert data["members_total"] == 0
    assert data["delivery_rate"] is None


def test_a_scheduled_messages_analytics_show_it_waiting(church: Church) -> None:
    member = church.member(unique_phone())
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    message_id = church.api.post(
        "/v1/messages", json={"body": "Later", "target": {"member_ids": [member]}, "send_at": later}
    ).json()["data"]["id"]
    data = church.api.get(f"/v1/messages/{message_id}/analytics").json()["data"]
    assert data["status"] == "scheduled"
    assert data["counts"]["queued"] == 1
    assert data["delivery_rate"] is None
    assert datetime.fromisoformat(data["reply_window_ends_at"]) == datetime.fromisoformat(
        later
    ) + timedelta(hours=48)
    church.api.post(f"/v1/messages/{message_id}/cancel")


class _Recording:
    """A connection that remembers each statement it runs, to EXPLAIN them after."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.statements: list[tuple[str, Any]] = []

    async def execute(self, query: str, params: Any = None) -> Any:
        self.statements.append((query, params))
        return await self.conn.execute(query, params)


def _partitions(plan: str, table: str) -> set[str]:
    return set(re.findall(rf"\b{table}_y\d{{4}}m\d{{2}}(?![_\w])", plan))


@pytest.mark.anyio
async def test_analytics_queries_are_partition_pruned(church: Church, stack: Stack) -> None:
    member = church.member(unique_phone())
    answer = church.api.post("/v1/messages", json={"body": "x", "target": {"member_ids": [member]}})
    message_id = uuid.UUID(answer.json()["data"]["id"])
    services = await Services.open(Settings.from_env(stack.env))
    try:
        async with services.pool.connection() as conn:
            recording: Any = _Recording(conn)
            message = await get_message(conn, uuid.UUID(church.id), message_id)
            now = datetime.now(UTC)
            await church_summary(recording, uuid.UUID(church.id), now - timedelta(days=20), now)
            await message_analytics(recording, uuid.UUID(church.id), message)
            partitioned = 0
            for query, params in recording.statements:
                cur = await conn.execute(f"EXPLAIN {query}", params)
                plan = "\n".join(r[0] for r in await cur.fetchall())
                for table in ("message", "message_recipient", "conversation_message"):
                    if re.search(rf"\bFROM {table}\b|\bJOIN {table}\b", query):
                        partitioned += 1
                        # A 20-day range spans at most two months; one message, one.
                        assert 1 <= len(_partitions(plan, table)) <= 2, (query, plan)
            assert partitioned >= 8
    finally:
        await services.close()
