"""Inbound provider webhooks against the running stack: signatures, dedupe, guards."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from deploy.stack import Stack
from tests.conftest import Church, receipt_ref, unique_phone
from tests.delivery.telnyx_webhooks import (
    provider_events_seen,
    signed_headers,
    sim_signer,
    status_event,
)

PATH = "/v1/provider/telnyx/webhooks"


@pytest.fixture
def held_receipts(sim_url: str) -> Iterator[None]:
    """The simulator's own receipts wait 20 s, so the test's webhooks act alone."""
    httpx.post(f"{sim_url}/_sim/config", json={"latency_ms": [20_000, 20_000]}).raise_for_status()
    yield
    httpx.post(f"{sim_url}/_sim/config", json={"latency_ms": [0, 0]}).raise_for_status()


def _post(
    base_url: str, body: bytes, signer: Ed25519PrivateKey | None, ref: str, ts: int | None = None
) -> httpx.Response:
    return httpx.post(
        f"{base_url}{PATH}",
        params={"ref": ref},
        content=body,
        headers=signed_headers(signer, body, ts),
    )


def _recipient(stack: Stack, message_id: str) -> tuple[Any, ...]:
    """The broadcast's one recipient, waiting for the worker to materialize it."""
    deadline = time.monotonic() + 15
    while True:
        with psycopg.connect(stack.env["DATABASE_URL"]) as conn:
            row = conn.execute(
                "SELECT church_id, id, status, provider_message_id FROM message_recipient "
                "WHERE message_id = %s",
                (uuid.UUID(message_id),),
            ).fetchone()
        if row is not None:
            return tuple(row)
        assert time.monotonic() < deadline, "the recipient was never materialized"
        time.sleep(0.05)


@pytest.mark.usefixtures("held_receipts")
def test_signed_receipts_move_forward_once(church: Church, stack: Stack, base_url: str) -> None:
    church.member(unique_phone(), [group := church.group()])
    sent = church.api.post("/v1/messages", json={"body": "hi", "target": {"group_ids": [group]}})
    message_id = sent.json()["data"]["id"]
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        church_id, recipient_id, status, provider_id = _recipient(stack, message_id)
        if provider_id:
            break
        time.sleep(0.1)
    assert status == "sending"
    assert provider_id
    ref = receipt_ref(stack, church_id, message_id, recipient_id)
    signer = sim_signer(stack)

    # A bad signature, a stale one, and a missing one: 401 and nothing written.
    bad_id = f"evt-{uuid.uuid4()}"
    body = status_event(bad_id, provider_id, "delivery_failed", "message.finalized")
    assert _post(base_url, body, None, ref).status_code == 401
    assert _post(base_url, body, signer, ref, ts=int(time.time()) - 301).status_code == 401
    unsigned = httpx.post(f"{base_url}{PATH}", params={"ref": ref}, content=body)
    assert unsigned.status_code == 401
    assert unsigned.json()["error"]["code"] == "unauthorized"
    assert provider_events_seen(stack, bad_id) == 0
    assert _recipient(stack, message_id)[2] == "sending"

    # message.sent twice with one event id: applied once.
    sent_id = f"evt-{uuid.uuid4()}"
    body = status_event(sent_id, provider_id, "sent", "message.sent")
    assert _post(base_url, body, signer, ref).status_code == 200
    assert _post(base_url, body, signer, ref).status_code == 200
    assert provider_events_seen(stack, sent_id) == 1
    assert _recipient(stack, message_id)[2] == "sent"

    # A reference to this recipient with someone else's provider id is refused, and
    # nothing of it is written (not even its event id: a genuine one may come later).
    foreign_id = f"evt-{uuid.uuid4()}"
    foreign = status_event(foreign_id, "another-id", "delivered", "message.finalized")
    refused = _post(base_url, foreign, signer, ref)
    assert refused.status_code == 422, refused.text
    assert refused.json()["error"]["code"] == "validation_error"
    assert provider_events_seen(stack, foreign_id) == 0
    assert _recipient(stack, message_id)[2] == "sent"

    # Finalized as delivery_failed → undelivered; a late "delivered" changes nothing.
    final = status_event(f"evt-{uuid.uuid4()}", provider_id, "delivery_failed")
    assert _post(base_url, final, signer, ref).status_code == 200
    assert _recipient(stack, message_id)[2] == "undelivered"
    late = status_event(f"evt-{uuid.uuid4()}", provider_id, "delivered")
    assert _post(base_url, late, signer, ref).status_code == 200
    assert _recipient(stack, message_id)[2] == "undelivered"
    counts = church.api.get(f"/v1/messages/{message_id}").json()["data"]["counts"]
    assert counts["undelivered"] == 1
    assert counts["delivered"] == 0


def test_a_genuine_receipt_cannot_be_pointed_at_another_recipient(
    church: Church, stack: Stack, base_url: str, sim_url: str
) -> None:
    """The provider's signature covers the body, not the callback URL. A genuine signed
    receipt of recipient A, replayed with B's reference (B held back by an outage, so
    no provider id yet), must not move B: a forged reference fails our MAC, and even
    B's real reference is refused because the receipt's message id is A's."""
    group = church.group()
    church.member(unique_phone(), [group])
    first = church.broadcast(group, "to A")
    _, a_id, _, a_provider_id = _recipient(stack, first)
    deadline = time.monotonic() + 15
    while not a_provider_id and time.monotonic() < deadline:
        time.sleep(0.05)
        _, a_id, _, a_provider_id = _recipient(stack, first)
    assert a_provider_id
    httpx.post(f"{sim_url}/_sim/config", json={"outage": True}).raise_for_status()
    try:
        other = church.group("B")
        church.member(unique_phone(), [other])
        second = church.broadcast(other, "to B")
        church_id, b_id, _, b_provider_id = _recipient(stack, second)
        assert b_provider_id is None
        signer = sim_signer(stack)
        stolen_id = f"evt-{uuid.uuid4()}"
        stolen = status_event(stolen_id, a_provider_id, "delivered", "message.finalized")
        forged = f"{church_id}.{second}.{b_id}"
        for ref in (forged, forged + ".AAAAAAAAAAAAAAAAAAAAAA"):
            answer = _post(base_url, stolen, signer, ref)
            assert answer.status_code == 422, answer.text
        leaked = receipt_ref(stack, church_id, second, b_id)
        answer = _post(base_url, stolen, signer, leaked)
        assert answer.status_code == 422, answer.text
        assert provider_events_seen(stack, stolen_id) == 0
        status, provider_id = _recipient(stack, second)[2:]
        assert status in ("queued", "sending")
        assert provider_id is None
    finally:
        httpx.post(f"{sim_url}/_sim/config", json={"outage": False}).raise_for_status()
    counts = church.counts_when(second, lambda c: c["delivered"] == 1)
    assert counts["delivered"] == 1, counts
    assert a_id != b_id


def test_malformed_webhooks_are_refused(stack: Stack, base_url: str) -> None:
    signer = sim_signer(stack)
    answer = _post(base_url, b"{not json", signer, "x")
    assert answer.status_code == 400
    answer = _post(base_url, b'{"data": {"event_type": 1}}', signer, "x")
    assert answer.status_code == 422
    big = b"{" + b" " * 2_000_000 + b"}"
    assert _post(base_url, big, signer, "x").status_code == 413


def test_reply_arrives_in_the_inbox(church: Church, sim_url: str) -> None:
    phone = unique_phone()
    member_id = church.member(phone)
    answer = httpx.post(
        f"{sim_url}/_sim/inbound", json={"from": phone, "to": church.phone_number, "text": "Amen"}
    )
    assert answer.status_code == 202, answer.text
    conversations = church.conversations_when(1)
    assert conversations, "the reply never reached the inbox"
    conversation = conversations[0]
    assert conversation["member_id"] == member_id
    assert conversation["unread_count"] == 1
    assert conversation["status"] == "open"
    thread = church.api.get(f"/v1/conversations/{conversation['id']}/messages").json()["data"]
    assert [(m["direction"], m["body"]) for m in thread] == [("inbound", "Amen")]

    reply = church.api.post(
        f"/v1/conversations/{conversation['id']}/messages", json={"body": "Bless you"}
    )
    assert reply.status_code == 202, reply.text
    deadline = time.monotonic() + 10
    status = ""
    while time.monotonic() < deadline and status != "delivered":
        thread = church.api.get(f"/v1/conversations/{conversation['id']}/messages").json()["data"]
        status = next(m["status"] for m in thread if m["direction"] == "outbound")
        time.sleep(0.1)
    assert status == "delivered"
    stats = httpx.get(f"{sim_url}/_sim/stats").json()
    assert stats["by_destination"][phone] == 1


def test_staff_work_the_inbox(church: Church, other_church: Church, sim_url: str) -> None:
    phone = unique_phone()
    church.member(phone)
    httpx.post(
        f"{sim_url}/_sim/inbound", json={"from": phone, "to": church.phone_number, "text": "Hi"}
    ).raise_for_status()
    conversations = church.conversations_when(1)
    conversation_id = conversations[0]["id"]
    path = f"/v1/conversations/{conversation_id}"

    read = church.api.post(f"{path}/read")
    assert read.status_code == 200
    assert read.json()["data"]["unread_count"] == 0
    assigned = church.api.patch(path, json={"assignee_id": church.user_id})
    assert assigned.json()["data"]["assignee_id"] == church.user_id
    closed = church.api.patch(path, json={"status": "closed"})
    assert closed.json()["data"]["status"] == "closed"
    assert closed.json()["data"]["assignee_id"] == church.user_id
    unassigned = church.api.patch(path, json={"assignee_id": None, "status": "open"})
    assert unassigned.json()["data"]["assignee_id"] is None
    assert unassigned.json()["data"]["status"] == "open"

    stranger = church.api.patch(path, json={"assignee_id": other_church.user_id})
    assert stranger.status_code == 422
    assert church.api.patch(path, json={"status": "snoozed"}).status_code == 422
    assert other_church.api.patch(path, json={"status": "closed"}).status_code == 404
    assert other_church.api.post(f"{path}/read").status_code == 404


def test_inbox_filters(church: Church, sim_url: str) -> None:
    phones = [unique_phone(), unique_phone()]
    for phone in phones:
        church.member(phone)
        httpx.post(
            f"{sim_url}/_sim/inbound", json={"from": phone, "to": church.phone_number, "text": "?"}
        ).raise_for_status()
    conversations = church.conversations_when(2)
    first, second = conversations
    church.api.post(f"/v1/conversations/{first['id']}/read")
    church.api.patch(
        f"/v1/conversations/{second['id']}",
        json={"status": "closed", "assignee_id": church.user_id},
    )

    def ids(**params: str) -> list[str]:
        answer = church.api.get("/v1/conversations", params=params)
        assert answer.status_code == 200, answer.text
        return [c["id"] for c in answer.json()["data"]]

    assert ids(unread="true") == [second["id"]]
    assert ids(unread="false") == [first["id"]]
    assert ids(status="closed") == [second["id"]]
    assert ids(status="open") == [first["id"]]
    assert ids(assignee_id=church.user_id) == [second["id"]]
    for bad in ({"status": "snoozed"}, {"unread": "maybe"}, {"assignee_id": "x"}):
        assert church.api.get("/v1/conversations", params=bad).status_code == 422
