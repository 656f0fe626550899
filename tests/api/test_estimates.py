"""Send estimates on the session stack: POST /v1/messages/estimate (validated like
POST /v1/messages, writing nothing), a broadcast's estimate under other sending
limits and quiet hours, and the delivery timeline of a finished broadcast (the
arithmetic alone: tests/storage/domain/test_estimate.py)."""

from __future__ import annotations

import itertools
import time
import uuid
from datetime import UTC, datetime, timedelta
from datetime import time as clock
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

from api.estimates import estimate_of
from deploy.stack import Stack
from storage.domain.quiet_hours import QuietHours
from storage.pg.analytics import bucket_for
from storage.pg.messages import get_message
from storage.pg.send_backlog import recent_pace, work_ahead
from storage.process.services import Services
from storage.process.settings import Settings
from tests.conftest import Church, unique_phone

ESTIMATE = "/v1/messages/estimate"


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _opted_out(church: Church, member: str) -> None:
    answer = church.api.post(f"/v1/members/{member}/opt-out")
    assert answer.status_code == 200, answer.text


def _message_total(church: Church) -> int:
    """Every message of the church, scheduled ones included (one page is plenty here)."""
    listed = church.api.get("/v1/messages", params={"limit": 100}).json()["data"]
    return len(listed)


def test_an_estimate_counts_the_audience_and_writes_nothing(church: Church) -> None:
    group = church.group()
    for _ in range(3):
        church.member(unique_phone(), [group])
    _opted_out(church, church.member(unique_phone(), [group]))
    church.member(unique_phone())  # not in the group
    before = _message_total(church)
    audit_before = church.session.get("/v1/audit-log").json()["data"]
    body = {"body": "ж" * 71, "target": {"group_ids": [group]}}  # UCS-2: 2 segments
    answer = church.api.post(ESTIMATE, json=body)
    assert answer.status_code == 200, answer.text
    data = answer.json()["data"]
    assert data["recipient_count"] == 3
    assert data["estimate"]["segments_total"] == 6
    now = datetime.now(UTC)
    finish = _at(data["estimate"]["finishes_at"])
    # 3 texts under the stack's limits (1,000/s over the account, a full bucket): now.
    assert now - timedelta(seconds=30) < finish < now + timedelta(seconds=30)
    everyone = church.api.post(ESTIMATE, json={"body": "Hi", "target": {"all": True}})
    assert everyone.json()["data"]["recipient_count"] == 4
    assert everyone.json()["data"]["estimate"]["segments_total"] == 4
    assert _message_total(church) == before
    assert church.session.get("/v1/audit-log").json()["data"] == audit_before
    # The same body is accepted as it was estimated.
    accepted = church.api.post("/v1/messages", json=body)
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["data"]["recipient_count"] == 3
    assert _message_total(church) == before + 1


def _error(answer: httpx.Response) -> tuple[int, Any]:
    return answer.status_code, answer.json()["error"]


BAD_BODIES: list[dict[str, Any]] = [
    {"target": {"all": True}},
    {"body": "x", "target": {}},
    {"body": "Hi {{nickname}}", "target": {"all": True}},
    {"body": "x", "target": {"all": True}, "send_at": "2000-01-01T00:00:00Z"},
    {"body": "x", "target": {"all": True}, "send_at": "2030-01-01T10:00:00"},
    {"body": "x", "target": {"all": True}, "surprise": 1},
    {"body": "x", "target": {"group_ids": [str(uuid.uuid4())]}},
    {"template_id": str(uuid.uuid4()), "target": {"all": True}},
    {"body": "x", "target": {"all": True}, "media_ids": [str(uuid.uuid4())]},
    {"body": "x", "target": {"group_ids": [str(uuid.uuid4())]}, "media_ids": [str(uuid.uuid4())]},
    {"body": 5, "target": {"all": True}},
]


def test_bad_input_is_answered_as_post_messages_answers_it(church: Church) -> None:
    church.member(unique_phone())
    before = _message_total(church)
    for body in BAD_BODIES:
        estimated = church.api.post(ESTIMATE, json=body)
        sent = church.api.post("/v1/messages", json=body)
        assert estimated.status_code in (404, 422), (body, estimated.text)
        assert _error(estimated) == _error(sent), body
    assert _message_total(church) == before


def _uploaded(church: Church) -> str:
    png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + b"\r\n\x00\xff" * 100
    answer = church.api.post("/v1/media", files={"file": ("flyer.png", png, "image/png")})
    assert answer.status_code == 201, answer.text
    return str(answer.json()["data"]["id"])


def test_another_churchs_group_or_media_is_not_found(church: Church, other_church: Church) -> None:
    theirs = other_church.group()
    other_church.member(unique_phone(), [theirs])
    before = _message_total(church)
    for body in (
        {"body": "x", "target": {"group_ids": [theirs]}},
        {"body": "x", "target": {"all": True}, "media_ids": [_uploaded(other_church)]},
    ):
        estimated = church.api.post(ESTIMATE, json=body)
        assert estimated.status_code == 404, estimated.text
        assert _error(estimated) == _error(church.api.post("/v1/messages", json=body))
    assert _message_total(church) == before


def test_estimating_needs_the_write_scope(church: Church) -> None:
    key = church.session.post("/v1/api-keys", json={"name": "ro", "scopes": ["read"]})
    assert key.status_code == 201, key.text
    reader = httpx.Client(
        base_url=str(church.api.base_url),
        headers={"Authorization": f"Bearer {key.json()['data']['key']}"},
    )
    with reader:
        answer = reader.post(ESTIMATE, json={"body": "x", "target": {"all": True}})
    assert answer.status_code == 403, answer.text


@pytest.mark.anyio
async def test_the_estimate_moves_with_the_per_number_rate(church: Church, stack: Stack) -> None:
    """The web process has no per-number limit: a Services with one (as a process
    started with KOINONIA_SEND_RATE_PER_NUMBER would have) estimates the same
    scheduled broadcast, 30 recipients from its ``send_at``."""
    group = church.group()
    for _ in range(30):
        church.member(unique_phone(), [group])
    send_at = (datetime.now(UTC) + timedelta(days=1)).replace(microsecond=0)
    answer = church.api.post(
        "/v1/messages",
        json={"body": "Tomorrow", "target": {"group_ids": [group]}, "send_at": _iso(send_at)},
    )
    assert answer.status_code == 202, answer.text
    message_id = uuid.UUID(answer.json()["data"]["id"])
    after: dict[float, float] = {}
    for rate in (1.0, 2.0, 10.0):
        env = {
            **stack.env,
            "KOINONIA_SEND_RATE_PER_NUMBER": str(rate),
            "KOINONIA_SEND_BURST_S": "1",
        }
        services = await Services.open(Settings.from_env(env))
        try:
            async with services.pool.connection() as conn:
                message = await get_message(conn, uuid.UUID(church.id), message_id)
                estimate = await estimate_of(services, conn, uuid.UUID(church.id), message)
        finally:
            await services.close()
        assert estimate.segments_total == 30
        after[rate] = (estimate.finishes_at - send_at).total_seconds()
    # The bucket's one second of burst goes at once, the rest at the rate.
    assert after == {1.0: pytest.approx(29.0), 2.0: pytest.approx(14.0), 10.0: pytest.approx(2.0)}
    # No limit of ours at all: the workers' recent pace (or the fallback) paces it.
    env = {**stack.env, "KOINONIA_SEND_RATE_PER_NUMBER": "0", "KOINONIA_SEND_RATE_PER_ACCOUNT": "0"}
    services = await Services.open(Settings.from_env(env))
    try:
        async with services.pool.connection() as conn:
            message = await get_message(conn, uuid.UUID(church.id), message_id)
            unlimited = await estimate_of(services, conn, uuid.UUID(church.id), message)
    finally:
        await services.close()
    # At least the fallback's 50 texts/s.
    assert send_at < unlimited.finishes_at <= send_at + timedelta(seconds=30 / 50), unlimited
    # The web's own limits (1,000/s over the account): at its send_at.
    estimated = church.api.post(
        ESTIMATE,
        json={"body": "Tomorrow", "target": {"group_ids": [group]}, "send_at": _iso(send_at)},
    )
    assert _at(estimated.json()["data"]["estimate"]["finishes_at"]) == send_at
    # An MMS is one message per recipient however long its text, and passes the
    # account's MMS bucket too (15/s on the stack, its burst 15): 15 at once, 15 in 1 s.
    mms = church.api.post(
        ESTIMATE,
        json={
            "body": "ж" * 71,
            "media_ids": [_uploaded(church)],
            "target": {"group_ids": [group]},
            "send_at": _iso(send_at),
        },
    )
    assert mms.status_code == 200, mms.text
    assert mms.json()["data"]["estimate"]["segments_total"] == 30
    assert _at(mms.json()["data"]["estimate"]["finishes_at"]) == send_at + timedelta(seconds=1)


def _closed_window(now: datetime) -> tuple[QuietHours, datetime]:
    """A one-hour window (UTC) opening 3 to 4 hours from now, and the instant it opens."""
    opens = (now + timedelta(hours=3)).replace(minute=0, second=0, microsecond=0)
    window = QuietHours(clock(opens.hour), clock((opens.hour + 1) % 24))
    return window, opens


def test_quiet_hours_push_a_scheduled_estimate_past_the_window(church: Church) -> None:
    now = datetime.now(UTC)
    window, opens = _closed_window(now)
    assert window.next_open(ZoneInfo("UTC"), now + timedelta(hours=1)) == opens
    answer = church.api.patch(
        "/v1/church",
        json={
            "timezone": "UTC",
            "quiet_hours_start": f"{window.start:%H:%M}",
            "quiet_hours_end": f"{window.end:%H:%M}",
        },
    )
    assert answer.status_code == 200, answer.text
    group = church.group()
    church.member(unique_phone(), [group])
    church.member(unique_phone(), [group])
    send_at = _iso(now + timedelta(hours=1))
    body = {"body": "Held", "target": {"group_ids": [group]}, "send_at": send_at}
    estimated = church.api.post(ESTIMATE, json=body).json()["data"]["estimate"]
    finish = _at(estimated["finishes_at"])
    assert opens <= finish < opens + timedelta(seconds=5)
    # Immediate broadcasts are never held: the same audience now finishes now.
    now_body = {"body": "Now", "target": {"group_ids": [group]}}
    immediate = _at(
        church.api.post(ESTIMATE, json=now_body).json()["data"]["estimate"]["finishes_at"]
    )
    assert immediate < now + timedelta(minutes=1)


@pytest.mark.anyio
async def test_a_finished_broadcast_finished_when_its_last_text_went(
    church: Church, stack: Stack
) -> None:
    group = church.group()
    for _ in range(4):
        church.member(unique_phone(), [group])
    message_id = church.broadcast(group, body="Done soon")
    counts = church.counts_when(message_id, lambda c: c["delivered"] == 4)
    assert counts["delivered"] == 4
    services = await Services.open(Settings.from_env(stack.env))
    try:
        async with services.pool.connection() as conn:
            message = await get_message(conn, uuid.UUID(church.id), uuid.UUID(message_id))
            estimate = await estimate_of(services, conn, uuid.UUID(church.id), message)
            cur = await conn.execute(
                "SELECT max(updated_at) FROM message_recipient WHERE church_id = %s "
                "AND message_id = %s",
                (uuid.UUID(church.id), uuid.UUID(message_id)),
            )
            row = await cur.fetchone()
            # Four texts went within the last minute: the workers have a pace.
            pace = await recent_pace(conn, datetime.now(UTC))
    finally:
        await services.close()
    assert pace is not None
    assert pace > 0
    assert row is not None
    assert estimate.segments_total == 4
    # Completed: its completion; still awaiting its last receipts: its last hand-over.
    assert message.created_at <= estimate.finishes_at <= row[0] + timedelta(seconds=1)
    assert estimate.finishes_at <= datetime.now(UTC)


def test_the_timeline_of_a_finished_broadcast_adds_up_to_its_counts(
    church: Church, sim_url: str
) -> None:
    group = church.group()
    for _ in range(6):
        church.member(unique_phone(), [group])
    _opted_out(church, church.member(unique_phone(), [group]))
    message_id = church.broadcast(group, body="Chart me")
    church.counts_when(message_id, lambda c: c["delivered"] == 6)

    def analytics() -> dict[str, Any]:
        found: dict[str, Any] = church.api.get(f"/v1/messages/{message_id}/analytics").json()[
            "data"
        ]
        return found

    data = analytics()
    deadline = datetime.now(UTC) + timedelta(seconds=10)
    while data["status"] != "completed" and datetime.now(UTC) < deadline:
        data = analytics()
    timeline = data["timeline"]
    points = timeline["points"]
    assert 1 <= len(points) <= 120
    assert timeline["bucket_s"] >= 1
    counts = data["counts"]
    assert (
        sum(p["sent"] for p in points)
        == counts["sent"] + counts["delivered"] + counts["undelivered"]
    )
    assert sum(p["delivered"] for p in points) == counts["delivered"] == 6
    assert sum(p["failed"] for p in points) == counts["failed"] + counts["undelivered"] == 0
    starts = [_at(p["at"]) for p in points]
    assert starts == sorted(starts)
    assert all(
        (b - a).total_seconds() == timeline["bucket_s"] for a, b in itertools.pairwise(starts)
    )


@pytest.mark.parametrize(
    ("span_s", "width"),
    [
        (0, 1),
        (119, 1),
        (120, 1),
        (121, 2),
        (400, 5),
        (3_600, 30),
        (86_400, 900),
        (10**8, 86_400 * 10),
    ],
)
def test_a_timeline_bucket_keeps_the_series_within_120_points(span_s: int, width: int) -> None:
    assert bucket_for(span_s) == width
    assert span_s // width + 1 <= 121


def _status_when(church: Church, message_id: str, done: Any, seconds: float = 15) -> dict[str, Any]:
    deadline = datetime.now(UTC) + timedelta(seconds=seconds)
    while True:
        detail: dict[str, Any] = church.api.get(f"/v1/messages/{message_id}").json()["data"]
        if done(detail) or datetime.now(UTC) > deadline:
            return detail
        time.sleep(0.05)


@pytest.mark.anyio
async def test_held_recipients_finish_after_their_window_and_are_not_work_ahead(
    church: Church, stack: Stack
) -> None:
    now = datetime.now(UTC)
    window, opens = _closed_window(now)
    church.api.patch(
        "/v1/church",
        json={
            "timezone": "UTC",
            "quiet_hours_start": f"{window.start:%H:%M}",
            "quiet_hours_end": f"{window.end:%H:%M}",
        },
    ).raise_for_status()
    group = church.group()
    church.member(unique_phone(), [group])
    church.member(unique_phone(), [group])
    send_at = _iso(datetime.now(UTC) + timedelta(seconds=1.2))
    answer = church.api.post(
        "/v1/messages", json={"body": "Held", "target": {"group_ids": [group]}, "send_at": send_at}
    )
    assert answer.status_code == 202, answer.text
    message_id = answer.json()["data"]["id"]
    detail = _status_when(church, message_id, lambda d: d["status"] == "sending")
    assert detail["status"] == "sending"
    assert detail["counts"]["queued"] == 2
    services = await Services.open(Settings.from_env(stack.env))
    try:
        async with services.pool.connection() as conn:
            message = await get_message(conn, uuid.UUID(church.id), uuid.UUID(message_id))
            estimate = await estimate_of(services, conn, uuid.UUID(church.id), message)
            ahead = await work_ahead(
                conn,
                services.redis,
                before=datetime.now(UTC),
                from_number=church.phone_number,
                now=datetime.now(UTC),
            )
    finally:
        await services.close()
    assert estimate.segments_total == 2
    assert opens <= estimate.finishes_at < opens + timedelta(seconds=5)
    # Held until hours from now, they are not ahead of a broadcast sent meanwhile.
    assert ahead.number == 0


def _provider_latency(sim_url: str, ms: int) -> None:
    httpx.post(f"{sim_url}/_sim/config", json={"latency_ms": [ms, ms]}).raise_for_status()


@pytest.mark.anyio
async def test_recipients_in_flight_on_the_number_are_work_ahead(
    church: Church, stack: Stack, sim_url: str
) -> None:
    group = church.group()
    for _ in range(3):
        church.member(unique_phone(), [group])
    # The provider answers after 2.5 s: the broadcast's recipients stay in flight.
    _provider_latency(sim_url, 2500)
    try:
        message_id = church.broadcast(group, body="Slow")
        detail = _status_when(church, message_id, lambda d: d["status"] == "sending", seconds=2)
        services = await Services.open(Settings.from_env(stack.env))
        try:
            async with services.pool.connection() as conn:
                now = datetime.now(UTC)
                ahead = await work_ahead(
                    conn, services.redis, before=now, from_number=church.phone_number, now=now
                )
                # Another church's number: the same work is ahead on the account only.
                elsewhere = await work_ahead(
                    conn, services.redis, before=now, from_number="+15550000000", now=now
                )
        finally:
            await services.close()
        counts = church.api.get(f"/v1/messages/{message_id}").json()["data"]["counts"]
    finally:
        _provider_latency(sim_url, 0)
    assert detail["status"] == "sending"
    # Nothing was handed over yet (the provider had not answered).
    assert counts["sent"] + counts["delivered"] == 0, counts
    assert ahead.number == 3
    assert ahead.account >= 3
    assert ahead.mms == 0
    assert elsewhere.number == 0
    assert elsewhere.account >= 3


def test_a_broadcast_carries_its_estimate_when_accepted_and_when_read(church: Church) -> None:
    group = church.group()
    for _ in range(3):
        church.member(unique_phone(), [group])
    body = {"target": {"group_ids": [group]}, "body": "Two parts: " + "ą" * 70}
    asked = church.api.post("/v1/messages/estimate", json=body).json()["data"]
    accepted = church.api.post("/v1/messages", json=body)
    assert accepted.status_code == 202, accepted.text
    data = accepted.json()["data"]
    assert data["estimate"]["segments_total"] == 3 * 2 == asked["estimate"]["segments_total"]
    created = _at(data["created_at"])
    assert created <= _at(data["estimate"]["finishes_at"]) <= created + timedelta(seconds=30)
    church.counts_when(data["id"], lambda c: c["delivered"] == 3)
    shown = church.api.get(f"/v1/messages/{data['id']}").json()["data"]
    assert shown["estimate"]["segments_total"] == 6
    # Every text went: the estimate is when the last one did, in the past.
    assert created <= _at(shown["estimate"]["finishes_at"]) <= datetime.now(UTC)
