"""SMS keywords against the running stack: STOP and its synonyms, START / UNSTOP / YES,
HELP / INFO; members text in through the simulator (``POST /_sim/inbound``), which
also applies Telnyx's STOP block rule (error 40300) to later sends."""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
import psycopg
import pytest

from deploy.stack import Stack
from storage.pg.keywords import Kind, match, normalize
from tests.conftest import Church, texts_sent, unique_phone
from tests.conftest import wait_until as _wait


def _text(sim_url: str, church: Church, phone: str, text: str) -> None:
    answer = httpx.post(
        f"{sim_url}/_sim/inbound", json={"from": phone, "to": church.phone_number, "text": text}
    )
    assert answer.status_code == 202, answer.text


def _member(church: Church, member_id: str) -> dict[str, Any]:
    found: dict[str, Any] = church.api.get(f"/v1/members/{member_id}").json()["data"]
    return found


def _thread(church: Church, member_id: str) -> list[dict[str, Any]]:
    """The member's conversation, oldest first (empty when there is none yet)."""
    for conversation in church.api.get("/v1/conversations", params={"limit": 200}).json()["data"]:
        if conversation["member_id"] == member_id:
            path = f"/v1/conversations/{conversation['id']}/messages"
            thread: list[dict[str, Any]] = church.api.get(path).json()["data"]
            return list(reversed(thread))
    return []


def _conversation(church: Church, member_id: str) -> dict[str, Any]:
    for conversation in church.api.get("/v1/conversations", params={"limit": 200}).json()["data"]:
        if conversation["member_id"] == member_id:
            found: dict[str, Any] = conversation
            return found
    raise AssertionError("no conversation")


def _sql(stack: Stack, statement: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    with psycopg.connect(stack.env["DATABASE_URL"], autocommit=True) as conn:
        cur = conn.execute(statement, params)
        return cur.fetchall() if cur.description else []


def _audit(church: Church, action: str) -> list[dict[str, Any]]:
    answer = church.session.get("/v1/audit-log", params={"action": action, "limit": 200})
    assert answer.status_code == 200, answer.text
    found: list[dict[str, Any]] = answer.json()["data"]
    return found


def _member_events(stack: Stack, church: Church) -> list[tuple[str, dict[str, Any]]]:
    rows = _sql(
        stack,
        "SELECT type, data FROM webhook_event WHERE church_id = %s AND type LIKE 'member.opted%%' "
        "ORDER BY id",
        (uuid.UUID(church.id),),
    )
    return [(r[0], r[1]) for r in rows]


def _listen_for_member_events(church: Church) -> None:
    """A webhook endpoint for member events, so they are recorded (an endpoint on a
    closed loopback port: its deliveries fail, which does not matter here)."""
    answer = church.api.post(
        "/v1/webhook-endpoints", json={"url": "http://127.0.0.1:9/hook", "events": ["member.*"]}
    )
    assert answer.status_code == 201, answer.text


# -- matching (no I/O) -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind", "word"),
    [
        ("STOP", Kind.OPT_OUT, "STOP"),
        ("  stop ", Kind.OPT_OUT, "STOP"),
        ("Stop!", Kind.OPT_OUT, "STOP"),
        ('"stop."', Kind.OPT_OUT, "STOP"),
        ("stop   all", Kind.OPT_OUT, "STOP ALL"),
        ("StopAll", Kind.OPT_OUT, "STOPALL"),
        ("\tUnsubscribe\n", Kind.OPT_OUT, "UNSUBSCRIBE"),
        ("cancel", Kind.OPT_OUT, "CANCEL"),
        ("End.", Kind.OPT_OUT, "END"),
        ("quit!!", Kind.OPT_OUT, "QUIT"),
        ("Revoke", Kind.OPT_OUT, "REVOKE"),
        ("optout", Kind.OPT_OUT, "OPTOUT"),
        ("start", Kind.OPT_IN, "START"),
        (" Unstop ", Kind.OPT_IN, "UNSTOP"),
        ("Yes!", Kind.OPT_IN, "YES"),
        ("help", Kind.HELP, "HELP"),
        ("INFO?", Kind.HELP, "INFO"),
    ],
)
def test_whole_message_keywords_match(text: str, kind: Kind, word: str) -> None:
    assert match(text) == (kind, word)


@pytest.mark.parametrize(
    "text",
    [
        "please stop by",
        "stop it",
        "STOP-ALL",
        "s t o p",
        "don't stop",
        "help me",
        "yes please",
        "I want to END this",
        "information",
        "",
        "   ",
        "?!",
        "started",
    ],
)
def test_other_texts_are_not_keywords(text: str) -> None:
    assert match(text) is None


def test_normalize_trims_only_the_outside() -> None:
    assert normalize(" ¡Stop   All! ") == "STOP ALL"
    assert normalize("stop.all") == "STOP.ALL"


# -- against the stack -------------------------------------------------------------------------


def test_every_opt_out_keyword_opts_out_and_records_it(
    church: Church, stack: Stack, sim_url: str
) -> None:
    _listen_for_member_events(church)
    variants = [
        "stop",
        " STOPALL ",
        "Stop All",
        "unsubscribe.",
        "Cancel",
        "end!",
        "QUIT",
        "revoke",
        "OptOut",
    ]
    phones = [unique_phone() for _ in variants]
    members = [church.member(p) for p in phones]
    for phone, text in zip(phones, variants, strict=True):
        _text(sim_url, church, phone, text)
    for member_id in members:
        _wait(lambda m=member_id: _member(church, m)["opted_in"] is False, what="opted out")
        shown = _member(church, member_id)
        assert shown["opt_source"] == "keyword"
        # The keyword stays in the inbox, unread, for staff to see; no text of ours
        # answers STOP (the provider does, then blocks the number).
        thread = _thread(church, member_id)
        assert [m["direction"] for m in thread] == ["inbound"]
        assert _conversation(church, member_id)["unread_count"] == 1
    assert [t.strip() for t in variants] == [
        m["body"].strip() for member_id in members for m in _thread(church, member_id)
    ]

    audit = _audit(church, "member.opt_out")
    assert {e["target_id"] for e in audit} == set(members)
    for entry in audit:
        assert entry["actor_type"] == "system"
        assert entry["actor_id"] is None
        assert entry["details"]["source"] == "keyword"
        assert entry["details"]["confirmation"] == "provider"
    # Webhook copies leave the event log right after the commit.
    _wait(lambda: len(_member_events(stack, church)) >= len(members), what="events recorded")
    events = _member_events(stack, church)
    assert sorted(d["member_id"] for t, d in events if t == "member.opted_out") == sorted(members)
    assert all(d["source"] == "keyword" for _, d in events)
    time.sleep(0.5)
    assert texts_sent(sim_url, phones) == [0] * len(phones)

    # A second STOP changes nothing and records nothing.
    _text(sim_url, church, phones[0], "STOP")
    _wait(lambda: len(_thread(church, members[0])) == 2, what="second STOP stored")
    assert len(_audit(church, "member.opt_out")) == len(members)


def test_stop_then_broadcast_then_start(church: Church, stack: Stack, sim_url: str) -> None:
    _listen_for_member_events(church)
    stopper, other = unique_phone(), unique_phone()
    group = church.group()
    stopper_id = church.member(stopper, [group])
    church.member(other, [group])

    _text(sim_url, church, stopper, "Stop")
    _wait(lambda: _member(church, stopper_id)["opted_in"] is False, what="opted out")

    # Staff cannot undo a keyword opt-out; a broadcast skips the member.
    refused = church.api.post(f"/v1/members/{stopper_id}/opt-in")
    assert refused.status_code == 409, refused.text
    sent = church.api.post("/v1/messages", json={"body": "Hi", "target": {"group_ids": [group]}})
    assert sent.status_code == 202, sent.text
    assert sent.json()["data"]["recipient_count"] == 1
    message_id = sent.json()["data"]["id"]
    counts = church.counts_when(message_id, lambda c: c["delivered"] == 1)
    assert counts["delivered"] == 1, counts
    assert texts_sent(sim_url, [stopper, other]) == [0, 1]

    # START: opted in again by keyword, with our confirmation (the provider lifted
    # its block on START, so it goes out), an event and an audit row.
    _text(sim_url, church, stopper, " start ")
    _wait(lambda: _member(church, stopper_id)["opted_in"] is True, what="opted in")
    assert _member(church, stopper_id)["opt_source"] == "keyword"
    _wait(lambda: texts_sent(sim_url, [stopper]) == [1], what="confirmation sent")

    def confirmation() -> dict[str, Any] | None:
        outbound = [m for m in _thread(church, stopper_id) if m["direction"] == "outbound"]
        return outbound[0] if outbound else None

    _wait(
        lambda: (c := confirmation()) is not None and c["status"] == "delivered",
        what="confirmation delivered",
    )
    reply = confirmation()
    assert reply is not None
    assert "Grace Chapel" in reply["body"]
    assert "STOP" in reply["body"]
    assert [m["direction"] for m in _thread(church, stopper_id)] == [
        "inbound",
        "inbound",
        "outbound",
    ]
    # An automatic answer is not a staff reply: both texts are still unread.
    assert _conversation(church, stopper_id)["unread_count"] == 2
    (entry,) = _audit(church, "member.opt_in")
    assert entry["actor_type"] == "system"
    assert entry["target_id"] == stopper_id
    assert entry["details"] == {"source": "keyword", "keyword": "START", "confirmation": "sent"}
    _wait(lambda: len(_member_events(stack, church)) == 2, what="events recorded")
    assert [t for t, _ in _member_events(stack, church)] == ["member.opted_out", "member.opted_in"]

    again = church.broadcast(group, "Welcome back")
    counts = church.counts_when(again, lambda c: c["delivered"] == 2)
    assert counts["delivered"] == 2, counts
    assert texts_sent(sim_url, [stopper, other]) == [2, 2]


def test_unstop_and_yes_opt_back_in_but_yes_alone_is_an_answer(
    church: Church, sim_url: str
) -> None:
    phones = [unique_phone() for _ in range(3)]
    members = [church.member(p) for p in phones]
    for phone in phones[:2]:
        _text(sim_url, church, phone, "STOP")
    for member_id in members[:2]:
        _wait(lambda m=member_id: _member(church, m)["opted_in"] is False, what="opted out")
    _text(sim_url, church, phones[0], "unstop")
    _text(sim_url, church, phones[1], "Yes.")
    # Already opted in: "Yes" answers a question, it is no keyword to confirm.
    _text(sim_url, church, phones[2], "YES")
    for member_id in members[:2]:
        _wait(lambda m=member_id: _member(church, m)["opted_in"] is True, what="opted in")
    _wait(lambda: texts_sent(sim_url, phones[:2]) == [1, 1], what="confirmations")
    _wait(lambda: len(_thread(church, members[2])) == 1, what="yes stored")
    time.sleep(0.5)
    assert texts_sent(sim_url, phones) == [1, 1, 0]
    assert _member(church, members[2])["opt_source"] != "keyword"


def test_help_and_info_answer_with_the_help_text(church: Church, sim_url: str) -> None:
    phone = unique_phone()
    member_id = church.member(phone)
    _text(sim_url, church, phone, "HELP")
    _wait(lambda: texts_sent(sim_url, [phone]) == [1], what="help answered")

    def replies() -> list[str]:
        return [m["body"] for m in _thread(church, member_id) if m["direction"] == "outbound"]

    _wait(lambda: len(replies()) == 1, what="help stored")
    (default,) = replies()
    assert "Grace Chapel" in default
    assert "Reply STOP to opt out" in default
    assert _member(church, member_id)["opted_in"] is True

    custom = "Grace Chapel office: 555-0100. Reply STOP to opt out."
    changed = church.session.patch("/v1/church", json={"help_text": custom})
    assert changed.status_code == 200, changed.text
    assert changed.json()["data"]["help_reply"] == custom
    _text(sim_url, church, phone, " info? ")
    _wait(lambda: len(replies()) == 2, what="info answered")
    assert replies()[1] == custom
    _wait(lambda: texts_sent(sim_url, [phone]) == [2], what="info sent")

    # After STOP the provider refuses every send to the number (and answers HELP
    # itself): no answer of ours that could only fail.
    _text(sim_url, church, phone, "STOP")
    _wait(lambda: _member(church, member_id)["opted_in"] is False, what="opted out")
    _text(sim_url, church, phone, "help")
    _wait(lambda: len(_thread(church, member_id)) == 6, what="help after stop stored")
    time.sleep(0.5)
    assert len(replies()) == 2
    assert texts_sent(sim_url, [phone]) == [2]


def test_sentences_with_keywords_in_them_do_nothing(church: Church, sim_url: str) -> None:
    phone = unique_phone()
    member_id = church.member(phone)
    sentences = ["Please stop by after service", "help me find the room", "END of story", "stop it"]
    for text in sentences:
        _text(sim_url, church, phone, text)
    _wait(lambda: len(_thread(church, member_id)) == len(sentences), what="texts stored")
    time.sleep(0.5)
    assert [m["direction"] for m in _thread(church, member_id)] == ["inbound"] * len(sentences)
    assert _member(church, member_id)["opted_in"] is True
    assert texts_sent(sim_url, [phone]) == [0]
    assert _audit(church, "member.opt_out") == []
    assert _audit(church, "member.opt_in") == []


def test_a_stranger_texting_stop_is_recorded_opted_out(church: Church, sim_url: str) -> None:
    phone = unique_phone()
    _text(sim_url, church, phone, "STOP")
    conversations = church.conversations_when(1)
    assert conversations, "the text never reached the inbox"
    member_id = conversations[0]["member_id"]
    shown = _member(church, member_id)
    assert shown["opted_in"] is False
    assert shown["opt_source"] == "keyword"
