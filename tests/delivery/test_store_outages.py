"""Nothing lost when a store blinks (compressed in time; full-length runs in bench/).

Events are logged in Postgres with the change they describe and relayed to Redis
and webhooks from there, so a Redis that dies right after a commit delays events,
never drops them; completion is decided from Postgres; receipts that never come
are looked up at the provider; a store that is down gets fast 503s, never 500s.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import psycopg
import pytest

from deploy.stack import Stack
from tests.conftest import Church, texts_sent, unique_phone
from tests.conftest import wait_until as _wait
from tests.deploy.nginx_support import Follower

pytestmark = pytest.mark.slow


def _sql(stack: Stack, statement: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    with psycopg.connect(stack.env["DATABASE_URL"], autocommit=True) as conn:
        cur = conn.execute(statement, params)
        return cur.fetchall() if cur.description else []


class _Accept(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def listen_to_everything(church: Church) -> Iterator[None]:
    """An endpoint for every event, so each one's id is kept in ``webhook_event``. Its
    receiver answers 204, so the endpoint stays enabled however long the test runs."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Accept)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/all"
        answer = church.api.post("/v1/webhook-endpoints", json={"url": url, "events": ["*"]})
        assert answer.status_code == 201, answer.text
        yield
    finally:
        server.shutdown()
        server.server_close()


def _event_ids(stack: Stack, church: Church, types: tuple[str, ...]) -> set[str]:
    rows = _sql(
        stack,
        "SELECT id FROM webhook_event WHERE church_id = %s AND type = ANY(%s)",
        (uuid.UUID(church.id), list(types)),
    )
    return {str(r[0]) for r in rows}


@pytest.fixture
def sim_config(sim_url: str) -> Iterator[Callable[..., None]]:
    def configure(**values: Any) -> None:
        httpx.post(f"{sim_url}/_sim/config", json=values).raise_for_status()

    try:
        yield configure
    finally:
        configure(latency_ms=[0, 0], outage=False, drop_webhooks=0.0, outcomes={"delivered": 1.0})


@pytest.mark.usefixtures("listen_to_everything")
def test_redis_restart_while_replies_arrive_misses_no_event(
    church: Church, stack: Stack, base_url: str, sim_url: str
) -> None:
    """50 WebSocket clients follow ``inbox`` while members text in; Redis is stopped and
    started again (empty) in the middle. Every reply reaches every client, or the
    client is told it cannot recover (``recovered: false``)."""
    phones = [unique_phone() for _ in range(18)]
    for phone in phones:
        church.member(phone)
    url = base_url.replace("http", "ws") + "/v1/realtime"

    async def scenario() -> list[Follower]:
        stop = asyncio.Event()
        followers = [
            Follower(i, url, church.key, church.id, ["inbox"], stop, expected=10**9)
            for i in range(50)
        ]
        tasks = [asyncio.create_task(f.run()) for f in followers]
        await asyncio.wait_for(asyncio.gather(*(f.ready.wait() for f in followers)), 30)
        async with httpx.AsyncClient() as client:
            for n, phone in enumerate(phones):
                if n == 6:
                    await asyncio.to_thread(stack.outage, "redis")
                if n == 12:
                    await asyncio.to_thread(stack.recover, "redis")
                answer = await client.post(
                    f"{sim_url}/_sim/inbound",
                    json={"from": phone, "to": church.phone_number, "text": f"Amen {n}"},
                )
                assert answer.status_code == 202, answer.text
                await asyncio.sleep(0.2)
        want = await asyncio.to_thread(_wait_for_events, stack, church, len(phones))
        for _ in range(300):  # up to 60 s for the last events to reach every client
            if all(want <= set(f.received["inbox"]) or False in f.resubscribed for f in followers):
                break
            await asyncio.sleep(0.2)
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for f in followers:
            f.received["want"] = sorted(want)
        return followers

    followers = asyncio.run(scenario())
    want = set(followers[0].received["want"])
    unnoticed = [
        f.index
        for f in followers
        if not want <= set(f.received["inbox"]) and False not in f.resubscribed
    ]
    detail = [
        (
            f.index,
            len(want - set(f.received["inbox"])),
            f.drops[-2:],
            f.resubscribed,
            f.problems[:2],
        )
        for f in followers
        if f.index in unnoticed
    ][:5]
    assert unnoticed == [], f"clients that missed events without notice: {detail}"
    assert all(not f.problems for f in followers), [f.problems for f in followers][:3]
    # Every text in the inbox once, and nothing of ours was texted.
    conversations = church.conversations_when(len(phones), 10)
    assert len(conversations) == len(phones)
    assert texts_sent(sim_url, phones) == [0] * len(phones)


def _wait_for_events(stack: Stack, church: Church, texts: int) -> set[str]:
    """The ids of the church's inbox events, once all ``texts`` made theirs."""
    kinds = ("conversation.created", "conversation.updated", "conversation.message.created")
    _wait(
        lambda: len(_event_ids(stack, church, ("conversation.message.created",))) >= texts,
        60,
        "every text's event logged and relayed",
    )
    return _event_ids(stack, church, kinds)


@pytest.mark.usefixtures("listen_to_everything")
def test_redis_restart_mid_broadcast_completes_once(
    church: Church, stack: Stack, sim_config: Callable[..., None], sim_url: str
) -> None:
    """The progress counters die with Redis: the broadcast still completes, once, with
    the right counts, and every member is texted once."""
    group = church.group()
    phones = [unique_phone() for _ in range(150)]
    for phone in phones:
        church.member(phone, [group])
    sim_config(latency_ms=[200, 600])
    message_id = church.broadcast(group, "Redis goes away now")
    church.counts_when(message_id, lambda c: c["delivered"] >= 20, 30)
    stack.outage("redis")
    time.sleep(2)
    stack.recover("redis")
    counts = church.counts_when(message_id, lambda c: c["delivered"] == len(phones), 90)
    assert counts["delivered"] == len(phones), counts

    def detail() -> dict[str, Any]:
        found: dict[str, Any] = church.api.get(f"/v1/messages/{message_id}").json()["data"]
        return found

    _wait(lambda: detail()["status"] == "completed", 30, "completed")
    assert detail()["completed_at"] is not None
    _wait(lambda: len(_event_ids(stack, church, ("message.completed",))) >= 1, 10, "completion")
    time.sleep(1)
    completed = _sql(
        stack,
        "SELECT data FROM webhook_event WHERE church_id = %s AND type = 'message.completed'",
        (uuid.UUID(church.id),),
    )
    assert len(completed) == 1, completed
    assert completed[0][0]["counts"]["delivered"] == len(phones)
    assert texts_sent(sim_url, phones) == [1] * len(phones)


def test_lost_receipts_are_looked_up_at_the_provider(
    church: Church, stack: Stack, sim_config: Callable[..., None], sim_url: str
) -> None:
    """The provider's callbacks never come: after KOINONIA_RECEIPT_TIMEOUT_S the app asks
    ``GET /v2/messages/{id}``, applies the answer, and the message completes."""
    group = church.group()
    phones = [unique_phone() for _ in range(12)]
    for phone in phones:
        church.member(phone, [group])
    sim_config(drop_webhooks=1.0, outcomes={"delivered": 3, "delivery_failed": 1})
    message_id = church.broadcast(group, "Nobody will tell you")
    counts = church.counts_when(message_id, lambda c: c["sending"] == len(phones), 20)
    assert counts["sending"] == len(phones), counts
    counts = church.counts_when(
        message_id, lambda c: c["delivered"] + c["undelivered"] == len(phones), 60
    )
    assert counts["delivered"] + counts["undelivered"] == len(phones), counts
    assert counts["undelivered"] > 0 or counts["delivered"] == len(phones)
    _wait(
        lambda: (
            church.api.get(f"/v1/messages/{message_id}").json()["data"]["status"] == "completed"
        ),
        30,
        "completed",
    )
    assert texts_sent(sim_url, phones) == [1] * len(phones)


def test_store_outages_answer_503_fast_and_lose_nothing(
    church: Church, stack: Stack, sim_url: str
) -> None:
    """Postgres stopped 10 s, later Redis stopped 5 s, under steady load: no 500, every
    failure a 503 within 5 s, service back within 10 s of the store's return, and
    every accepted (202) broadcast texted exactly once."""
    phones = [unique_phone() for _ in range(400)]
    member_of = {phone: church.member(phone) for phone in phones}
    answers: list[tuple[float, int, float, str]] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(
            base_url=str(church.api.base_url), headers=dict(church.api.headers), timeout=30
        ) as client:
            for phone in phones:
                if stop.is_set():
                    return
                started = time.monotonic()
                answer = client.post(
                    "/v1/messages",
                    json={"body": "Steady", "target": {"member_ids": [member_of[phone]]}},
                )
                took = time.monotonic() - started
                answers.append((started, answer.status_code, took, phone))
                client.get("/v1/conversations")
                time.sleep(0.05)

    loader = threading.Thread(target=load)
    loader.start()
    try:
        time.sleep(2)
        down = time.monotonic()
        stack.outage("postgres")
        time.sleep(10)
        stack.recover("postgres")
        pg_back = time.monotonic()
        time.sleep(8)
        stack.outage("redis")
        redis_down = time.monotonic()
        time.sleep(5)
        stack.recover("redis")
        redis_back = time.monotonic()
        time.sleep(8)
    finally:
        stop.set()
        loader.join(60)
    statuses = {status for _, status, _, _ in answers}
    assert statuses <= {202, 503}, sorted(statuses)
    slow = [
        (round(took, 2), status) for _, status, took, _ in answers if status == 503 and took > 5
    ]
    assert not slow, f"503s slower than 5 s: {slow[:5]}"
    assert any(status == 503 for t, status, _, _ in answers if down <= t < pg_back)
    for back in (pg_back, redis_back):
        served = [t for t, status, _, _ in answers if t >= back and status == 202]
        assert served, f"nothing served after {back}"
        assert served[0] - back < 10, f"not serving again within 10 s of {back}"
    assert any(status == 503 for t, status, _, _ in answers if redis_down <= t < redis_back)
    accepted = [phone for _, status, _, phone in answers if status == 202]
    assert accepted
    _wait(
        lambda: texts_sent(sim_url, accepted).count(1) == len(accepted),
        90,
        "every accepted broadcast texted",
    )
    time.sleep(1)
    assert texts_sent(sim_url, accepted) == [1] * len(accepted)
    # A 503 whose commit went through just before the database died is texted; none
    # is texted twice.
    refused = [phone for _, status, _, phone in answers if status == 503]
    assert max(texts_sent(sim_url, refused), default=0) <= 1
    for name in ("web", "worker", "scheduler", "simulator"):
        assert stack.processes[name].poll() is None, f"{name} exited"
