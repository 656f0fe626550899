"""Keywords that join groups, against the running stack: senders text in through the
simulator (``POST /_sim/inbound``), answers leave through the one send pipeline and
are counted by the simulator; events are read from the webhook copies the relay makes
for an endpoint listening to ``member.*``."""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any

import httpx
import msgspec
import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from deploy.stack import Stack
from tests.conftest import Church, texts_sent, unique_phone
from tests.conftest import wait_until as _wait

REPLY = "Welcome to Youth Group texts! Reply STOP to opt out."
AGAIN = "You're already on the Youth Group list."


def _text(sim_url: str, church: Church, phone: str, text: str) -> None:
    answer = httpx.post(
        f"{sim_url}/_sim/inbound", json={"from": phone, "to": church.phone_number, "text": text}
    )
    assert answer.status_code == 202, answer.text


def _keyword(church: Church, group: str, word: str = "Youth", **extra: Any) -> str:
    answer = church.api.post(
        "/v1/keywords", json={"keyword": word, "group_id": group, "reply": REPLY, **extra}
    )
    assert answer.status_code == 201, answer.text
    return str(answer.json()["data"]["id"])


def _member(church: Church, member_id: str) -> dict[str, Any]:
    found: dict[str, Any] = church.api.get(f"/v1/members/{member_id}").json()["data"]
    return found


def _member_count(church: Church, group: str) -> int:
    return int(church.api.get(f"/v1/groups/{group}").json()["data"]["member_count"])


def _conversation(church: Church, member_id: str) -> dict[str, Any] | None:
    for conversation in church.api.get("/v1/conversations", params={"limit": 200}).json()["data"]:
        if conversation["member_id"] == member_id:
            found: dict[str, Any] = conversation
            return found
    return None


def _thread(church: Church, member_id: str) -> list[dict[str, Any]]:
    """The member's conversation, oldest first (empty when there is none yet)."""
    conversation = _conversation(church, member_id)
    if conversation is None:
        return []
    path = f"/v1/conversations/{conversation['id']}/messages"
    thread: list[dict[str, Any]] = church.api.get(path, params={"limit": 200}).json()["data"]
    return list(reversed(thread))


def _answers(church: Church, member_id: str) -> list[str]:
    return [m["body"] for m in _thread(church, member_id) if m["direction"] == "outbound"]


def _inbound(church: Church, member_id: str) -> list[str]:
    return [m["body"] for m in _thread(church, member_id) if m["direction"] == "inbound"]


def _listen_for_member_events(church: Church) -> None:
    """A webhook endpoint for member events, so the relay records a copy of each (on a
    closed loopback port: its deliveries fail, which does not matter here)."""
    answer = church.api.post(
        "/v1/webhook-endpoints", json={"url": "http://127.0.0.1:9/hook", "events": ["member.*"]}
    )
    assert answer.status_code == 201, answer.text


def _member_events(stack: Stack, church: Church) -> list[tuple[str, dict[str, Any]]]:
    with psycopg.connect(stack.env["DATABASE_URL"], autocommit=True) as conn:
        rows = conn.execute(
            "SELECT type, data FROM webhook_event WHERE church_id = %s AND type LIKE 'member.%%' "
            "ORDER BY id",
            (uuid.UUID(church.id),),
        ).fetchall()
    return [(r[0], r[1]) for r in rows]


def _of(events: list[tuple[str, dict[str, Any]]], kind: str) -> list[dict[str, Any]]:
    return [d for t, d in events if t == kind]


def test_a_stranger_joins_then_gets_the_repeat_reply(
    church: Church, stack: Stack, sim_url: str
) -> None:
    _listen_for_member_events(church)
    group = church.group("Youth")
    _keyword(church, group, repeat_reply=AGAIN)
    # Read once, so a cached count would be stale if the join did not invalidate it.
    assert _member_count(church, group) == 0
    phone = unique_phone()

    _text(sim_url, church, phone, "  youth! ")
    (conversation,) = church.conversations_when(1)
    member_id = conversation["member_id"]
    _wait(lambda: _answers(church, member_id) == [REPLY], what="the reply")
    member = _member(church, member_id)
    assert member["group_ids"] == [group]
    assert member["opted_in"] is True
    assert member["opt_source"] == "keyword"
    assert _member_count(church, group) == 1
    _wait(lambda: texts_sent(sim_url, [phone]) == [1], what="the reply sent")

    # Again, in another case: the repeat reply, and nothing else changes.
    _text(sim_url, church, phone, "YOUTH")
    _wait(lambda: _answers(church, member_id) == [REPLY, AGAIN], what="the repeat reply")
    _wait(lambda: texts_sent(sim_url, [phone]) == [2], what="the repeat reply sent")
    assert _member(church, member_id)["group_ids"] == [group]
    assert _member_count(church, group) == 1
    assert _inbound(church, member_id) == ["  youth! ", "YOUTH"]
    # Our answers are not staff replies: both texts stay unread.
    found = _conversation(church, member_id)
    assert found is not None
    assert found["unread_count"] == 2

    _wait(lambda: len(_member_events(stack, church)) >= 2, what="events recorded")
    time.sleep(0.3)
    events = _member_events(stack, church)
    assert _of(events, "member.joined_group") == [
        {"member_id": member_id, "group_id": group, "source": "keyword"}
    ]
    assert _of(events, "member.opted_in") == [{"member_id": member_id, "source": "keyword"}]
    audit = church.session.get("/v1/audit-log", params={"action": "member.opt_in"}).json()["data"]
    assert [(e["target_id"], e["actor_type"], e["details"]["source"]) for e in audit] == [
        (member_id, "system", "keyword")
    ]


def test_join_word_for_members_and_the_built_in_repeat(
    church: Church, stack: Stack, sim_url: str
) -> None:
    _listen_for_member_events(church)
    group = church.group("Youth")
    _keyword(church, group)
    subscribed, unsubscribed = unique_phone(), unique_phone()
    subscribed_id = church.member(subscribed)
    unsubscribed_id = church.member(unsubscribed)
    # Opted out by staff, not by STOP: their own text is consent again.
    out = church.api.post(f"/v1/members/{unsubscribed_id}/opt-out")
    assert out.status_code == 200, out.text
    assert _member(church, unsubscribed_id)["opted_in"] is False

    _text(sim_url, church, subscribed, "join youth")
    _text(sim_url, church, unsubscribed, " Join   YOUTH. ")
    for member_id in (subscribed_id, unsubscribed_id):
        _wait(lambda m=member_id: _answers(church, m) == [REPLY], what="the reply")
        assert _member(church, member_id)["group_ids"] == [group]
    # Already opted in by the API: that consent stays as it was recorded.
    assert _member(church, subscribed_id)["opt_source"] == "api"
    back = _member(church, unsubscribed_id)
    assert (back["opted_in"], back["opt_source"]) == (True, "keyword")
    _wait(lambda: texts_sent(sim_url, [subscribed, unsubscribed]) == [1, 1], what="replies sent")

    # No repeat_reply of the church's own: a short built-in one.
    _text(sim_url, church, subscribed, "JOIN Youth")
    _wait(lambda: len(_answers(church, subscribed_id)) == 2, what="the repeat reply")
    repeat = _answers(church, subscribed_id)[1]
    assert "already on the list" in repeat
    assert "Grace Chapel" in repeat

    _wait(lambda: len(_of(_member_events(stack, church), "member.opted_in")) == 1, what="events")
    events = _member_events(stack, church)
    assert sorted(d["member_id"] for d in _of(events, "member.joined_group")) == sorted(
        [subscribed_id, unsubscribed_id]
    )
    assert _of(events, "member.opted_in") == [{"member_id": unsubscribed_id, "source": "keyword"}]


def test_a_member_who_texted_stop_joins_but_stays_opted_out_and_unanswered(
    church: Church, stack: Stack, sim_url: str
) -> None:
    _listen_for_member_events(church)
    group = church.group("Youth")
    _keyword(church, group, repeat_reply=AGAIN)
    phone = unique_phone()
    member_id = church.member(phone)
    _text(sim_url, church, phone, "STOP")
    _wait(lambda: _member(church, member_id)["opted_in"] is False, what="opted out")

    _text(sim_url, church, phone, "Youth")
    _wait(lambda: _member(church, member_id)["group_ids"] == [group], what="added to the group")
    assert _inbound(church, member_id) == ["STOP", "Youth"]
    time.sleep(0.5)
    assert _answers(church, member_id) == []
    assert texts_sent(sim_url, [phone]) == [0]
    stopped = _member(church, member_id)
    assert (stopped["opted_in"], stopped["opt_source"]) == (False, "keyword")
    _wait(
        lambda: len(_of(_member_events(stack, church), "member.joined_group")) == 1,
        what="joined event",
    )
    assert [t for t, _ in _member_events(stack, church) if t != "member.created"] == [
        "member.opted_out",
        "member.joined_group",
    ]

    # Only START brings them back; then the keyword answers as for anyone in the group.
    _text(sim_url, church, phone, "START")
    _wait(lambda: _member(church, member_id)["opted_in"] is True, what="opted in")
    _wait(lambda: len(_answers(church, member_id)) == 1, what="START confirmed")
    _text(sim_url, church, phone, "youth")
    _wait(lambda: len(_answers(church, member_id)) == 2, what="the repeat reply")
    assert _answers(church, member_id)[1] == AGAIN
    _wait(lambda: texts_sent(sim_url, [phone]) == [2], what="both sent")


def _signed_inbound(stack: Stack, base_url: str, event_id: str, frm: str, to: str) -> int:
    body = msgspec.json.encode(
        {
            "data": {
                "event_type": "message.received",
                "id": event_id,
                "occurred_at": "2026-11-22T10:00:00.000+00:00",
                "record_type": "event",
                "payload": {
                    "id": f"in-{event_id}",
                    "record_type": "message",
                    "direction": "inbound",
                    "from": {"phone_number": frm},
                    "to": [{"phone_number": to}],
                    "text": "JOIN youth",
                    "errors": [],
                },
            },
            "meta": {"attempt": 1, "delivered_to": "x"},
        }
    )
    seed = base64.b64decode(stack.env["KOINONIA_SIM_SIGNING_SEED"])
    stamp = str(int(time.time()))
    signature = Ed25519PrivateKey.from_private_bytes(seed).sign(stamp.encode() + b"|" + body)
    answer = httpx.post(
        f"{base_url}/v1/provider/telnyx/webhooks",
        content=body,
        headers={
            "telnyx-signature-ed25519": base64.b64encode(signature).decode(),
            "telnyx-timestamp": stamp,
            "content-type": "application/json",
        },
    )
    return answer.status_code


def test_a_redelivered_webhook_joins_and_answers_once(
    church: Church, stack: Stack, base_url: str, sim_url: str
) -> None:
    _listen_for_member_events(church)
    group = church.group("Youth")
    _keyword(church, group)
    phone, event_id = unique_phone(), str(uuid.uuid4())
    for _ in range(3):
        assert _signed_inbound(stack, base_url, event_id, phone, church.phone_number) == 200
    (conversation,) = church.conversations_when(1)
    member_id = conversation["member_id"]
    _wait(lambda: texts_sent(sim_url, [phone]) == [1], what="the reply sent")
    time.sleep(0.5)
    assert texts_sent(sim_url, [phone]) == [1]
    assert _inbound(church, member_id) == ["JOIN youth"]
    assert _answers(church, member_id) == [REPLY]
    assert _member(church, member_id)["group_ids"] == [group]
    _wait(lambda: len(_member_events(stack, church)) >= 2, what="events recorded")
    events = _member_events(stack, church)
    assert len(_of(events, "member.joined_group")) == 1
    assert len(_of(events, "member.opted_in")) == 1
