"""The lean provider-webhook route answers exactly as the route behind Starlette's stack.

``deploy/app.py FrontDoor`` serves ``POST /v1/provider/telnyx/webhooks`` through
``delivery.inbound.inbound_lean_routes`` (no CORS, router or exception middleware);
with tracing on, the same request takes ``inbound_routes`` through the whole stack.
Here one in-process app, on the session stack's Postgres and Redis, takes every
request both ways (``FrontDoor`` itself, and the Starlette app inside it) and the
answers must match byte for byte, headers included (but the request id): refusals
before any write, the body limit, decoding, a reference we did not make, dedupe,
and a store that is down.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import psycopg
import pytest

from delivery.inbound import WEBHOOK_PATH
from deploy.app import FrontDoor, create_app
from deploy.stack import Stack
from storage.process.settings import Settings
from tests.conftest import Church, receipt_ref, unique_phone
from tests.delivery.telnyx_webhooks import (
    provider_events_seen,
    signed_headers,
    sim_signer,
    status_event,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def settings(stack: Stack) -> Settings:
    return Settings.from_env(stack.env)


@pytest.fixture
async def front(settings: Settings) -> AsyncIterator[FrontDoor]:
    app = create_app(settings)
    assert isinstance(app, FrontDoor)
    async with app.app.router.lifespan_context(app.app):
        yield app


class Both:
    """One request through the lean route and through Starlette's stack."""

    def __init__(self, front: FrontDoor) -> None:
        self.lean = httpx.AsyncClient(transport=httpx.ASGITransport(app=front), base_url="http://k")
        self.full = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=front.app), base_url="http://k"
        )

    async def post(self, **request: Any) -> tuple[httpx.Response, httpx.Response]:
        # One request id for both: the envelope's body carries it.
        headers = {**request.pop("headers", {}), "x-request-id": uuid.uuid4().hex}
        lean = await self.lean.post(WEBHOOK_PATH, headers=headers, **request)
        full = await self.full.post(WEBHOOK_PATH, headers=headers, **request)
        return lean, full

    async def same(self, **request: Any) -> httpx.Response:
        lean, full = await self.post(**request)
        assert lean.status_code == full.status_code, (lean.text, full.text)
        assert lean.content == full.content
        assert _headers(lean) == _headers(full)
        assert lean.headers["x-request-id"] == full.headers["x-request-id"]
        # Every envelope names its own request (not one id frozen at start-up).
        assert lean.json()["meta"]["request_id"] == lean.headers["x-request-id"]
        return lean


def _headers(response: httpx.Response) -> list[tuple[str, str]]:
    # ``vary: Origin`` is CORS's, which FrontDoor's lean routes skip by design (a
    # provider is no browser).
    return sorted((k, v) for k, v in response.headers.items() if k != "vary")


async def test_lean_route_answers_as_the_full_stack(
    front: FrontDoor, stack: Stack, settings: Settings
) -> None:
    both = Both(front)
    key = sim_signer(stack)

    # The lean route is the one answering: it skips CORS, whose header the full one has.
    lean, full = await both.post(content=b"{}", headers=signed_headers(None, b"{}"))
    assert "vary" not in lean.headers
    assert "vary" in full.headers

    # Refused before anything is read or written: bad, stale and missing signatures.
    event_id = f"evt-{uuid.uuid4()}"
    body = status_event(event_id, f"pid-{uuid.uuid4()}", "delivered")
    for headers in (
        signed_headers(None, body),
        signed_headers(key, body, int(time.time()) - settings.provider.webhook_tolerance_s - 5),
        {"content-type": "application/json"},
    ):
        answer = await both.same(content=body, headers=headers)
        assert answer.status_code == 401
        assert answer.json()["error"]["code"] == "unauthorized"
    assert provider_events_seen(stack, event_id) == 0

    # Larger than the limit: declared (RequestContext) and streamed without a length.
    big = b"{" + b" " * settings.http.max_body_bytes + b"}"
    assert (await both.same(content=big, headers=signed_headers(key, big))).status_code == 413

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(3):
            yield b" " * (settings.http.max_body_bytes // 2 + 1)

    rid = {"x-request-id": uuid.uuid4().hex}
    lean = await both.lean.post(
        WEBHOOK_PATH, content=chunks(), headers=signed_headers(key, b"") | rid
    )
    full = await both.full.post(
        WEBHOOK_PATH, content=chunks(), headers=signed_headers(key, b"") | rid
    )
    assert "content-length" not in lean.request.headers
    assert lean.status_code == full.status_code == 413
    assert lean.content == full.content

    # Signed but unreadable, or not a Telnyx event.
    for bad, status in ((b"{not json", 400), (b'{"data": {"event_type": 1}}', 422)):
        assert (
            await both.same(content=bad, headers=signed_headers(key, bad))
        ).status_code == status

    # A reference we did not make: refused, nothing recorded.
    forged = status_event(f"evt-{uuid.uuid4()}", f"pid-{uuid.uuid4()}", "delivered")
    answer = await both.same(
        content=forged, params={"ref": "not-ours"}, headers=signed_headers(key, forged)
    )
    assert answer.status_code == 422

    # A receipt for a text we do not know: recorded once (dedupe), answered 200 both ways.
    unknown_id = f"evt-{uuid.uuid4()}"
    unknown = status_event(unknown_id, f"pid-{uuid.uuid4()}", "delivered")
    answer = await both.same(content=unknown, headers=signed_headers(key, unknown))
    assert answer.status_code == 200
    assert answer.json()["data"] == {"received": True}
    assert provider_events_seen(stack, unknown_id) == 1


async def test_lean_route_answers_503_when_the_database_is_gone(
    front: FrontDoor, stack: Stack
) -> None:
    both = Both(front)
    key = sim_signer(stack)
    # The pool closed: every checkout fails as with a database that is down.
    await front.state.services.pool.close()
    event_id = f"evt-{uuid.uuid4()}"
    body = status_event(event_id, f"pid-{uuid.uuid4()}", "delivered")
    started = time.monotonic()
    answer = await both.same(content=body, headers=signed_headers(key, body))
    assert time.monotonic() - started < 5
    assert answer.status_code == 503
    assert answer.headers["retry-after"] == "2"
    assert answer.json()["error"]["code"] == "unavailable"
    assert provider_events_seen(stack, event_id) == 0


@pytest.fixture
def held_receipts(sim_url: str) -> Iterator[None]:
    """The simulator's own receipts wait 20 s, so the test's webhooks act alone."""
    httpx.post(f"{sim_url}/_sim/config", json={"latency_ms": [20_000, 20_000]}).raise_for_status()
    yield
    httpx.post(f"{sim_url}/_sim/config", json={"latency_ms": [0, 0]}).raise_for_status()


def _recipients(stack: Stack, message_id: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(stack.env["DATABASE_URL"]) as conn:
        return [
            tuple(row)
            for row in conn.execute(
                "SELECT church_id, id, status, provider_message_id FROM message_recipient "
                "WHERE message_id = %s",
                (uuid.UUID(message_id),),
            ).fetchall()
        ]


@pytest.mark.usefixtures("held_receipts")
async def test_batched_receipts_are_answered_once_committed(
    front: FrontDoor, church: Church, stack: Stack
) -> None:
    """Concurrent webhooks share receipt batches; each one's 200 comes only after its
    status change and its event id are committed (read from another connection the
    moment the answer arrives)."""
    group = church.group()
    for _ in range(12):
        church.member(unique_phone(), [group])
    sent = church.api.post("/v1/messages", json={"body": "hi", "target": {"group_ids": [group]}})
    message_id = sent.json()["data"]["id"]
    deadline = time.monotonic() + 20
    while True:
        rows = _recipients(stack, message_id)
        if len(rows) == 12 and all(row[3] for row in rows):
            break
        assert time.monotonic() < deadline, rows
        await asyncio.sleep(0.1)
    assert {row[2] for row in rows} == {"sending"}
    key = sim_signer(stack)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=front), base_url="http://k")

    def committed(event_id: str, recipient_id: uuid.UUID) -> tuple[int, str]:
        with psycopg.connect(stack.env["DATABASE_URL"]) as conn:
            seen = conn.execute(
                "SELECT count(*) FROM provider_event WHERE event_id = %s", (event_id,)
            ).fetchone()
            status = conn.execute(
                "SELECT status FROM message_recipient WHERE id = %s", (recipient_id,)
            ).fetchone()
        assert seen is not None
        assert status is not None
        return int(seen[0]), str(status[0])

    async def deliver(church_id: uuid.UUID, recipient_id: uuid.UUID, provider_id: str) -> None:
        event_id = f"evt-{uuid.uuid4()}"
        body = status_event(event_id, provider_id, "delivered")
        answer = await client.post(
            WEBHOOK_PATH,
            content=body,
            params={"ref": receipt_ref(stack, church_id, uuid.UUID(message_id), recipient_id)},
            headers=signed_headers(key, body),
        )
        assert answer.status_code == 200, answer.text
        assert await asyncio.to_thread(committed, event_id, recipient_id) == (1, "delivered")

    await asyncio.gather(*(deliver(row[0], row[1], row[3]) for row in rows))
