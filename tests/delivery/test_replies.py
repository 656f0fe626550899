"""One send pipeline: staff replies and automatic answers travel the broadcasts' path.

A reply is a message of one recipient (storage/pg/conversations.py ``accept_reply``),
so it gets what a broadcast's recipients get: consent checked at acceptance and
again when it is sent, the reconciler after Redis forgets it, XAUTOCLAIM after a
worker dies, dead letters after its last attempt, and the provider idempotency
key against a second text.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import psycopg
import pytest
import redis

from deploy.stack import Stack
from tests.conftest import Church, texted_in, texts_sent, unique_phone
from tests.conftest import wait_until as _wait


@pytest.fixture
def outage(sim_url: str) -> Iterator[Callable[[bool], None]]:
    """Switch the provider outage (every send answers 503) on and off; off at the end."""

    def switch(on: bool) -> None:
        httpx.post(f"{sim_url}/_sim/config", json={"outage": on}).raise_for_status()

    try:
        yield switch
    finally:
        switch(False)


def _reply(church: Church, conversation_id: str, body: str) -> httpx.Response:
    return church.api.post(f"/v1/conversations/{conversation_id}/messages", json={"body": body})


def _outbound(church: Church, conversation_id: str) -> list[dict[str, Any]]:
    """The conversation's outbound texts, oldest first."""
    thread = church.api.get(f"/v1/conversations/{conversation_id}/messages").json()["data"]
    return [m for m in reversed(thread) if m["direction"] == "outbound"]


def _status_of(church: Church, conversation_id: str, message_id: str) -> str:
    for message in _outbound(church, conversation_id):
        if message["id"] == message_id:
            found: str = message["status"]
            return found
    raise AssertionError(f"{message_id} is not in the thread")


def _flush_redis(stack: Stack) -> None:
    client = redis.Redis.from_url(stack.env["REDIS_URL"])
    client.flushall()
    client.close()


def _recipient(stack: Stack, message_id: str) -> tuple[str, int, str | None]:
    """(status, attempts, error code) of a reply's one recipient row."""
    with psycopg.connect(stack.env["DATABASE_URL"], autocommit=True) as conn:
        row = conn.execute(
            "SELECT status, attempts, error_code FROM message_recipient WHERE message_id = %s",
            (uuid.UUID(message_id),),
        ).fetchone()
    assert row is not None, "a reply has a recipient row"
    return str(row[0]), int(row[1]), row[2]


def test_a_reply_to_an_opted_out_member_is_refused_and_never_texted(
    church: Church, other_church: Church, sim_url: str
) -> None:
    phone = unique_phone()
    member_id, conversation_id = texted_in(church, sim_url, phone)
    assert church.api.post(f"/v1/members/{member_id}/opt-out").status_code == 200
    answer = _reply(church, conversation_id, "Are you coming Sunday?")
    assert answer.status_code == 409, answer.text
    error = answer.json()["error"]
    assert error["code"] == "opted_out"
    assert answer.json()["success"] is False
    assert _outbound(church, conversation_id) == []
    time.sleep(0.5)
    assert texts_sent(sim_url, [phone]) == [0]
    # Another church's reply to this conversation finds nothing, opted out or not.
    stranger = _reply(other_church, conversation_id, "Hello")
    assert (stranger.status_code, stranger.json()["error"]["code"]) == (404, "not_found")


def test_opted_out_between_acceptance_and_sending_ends_skipped(
    church: Church, stack: Stack, sim_url: str, outage: Callable[[bool], None]
) -> None:
    """The send-time check: the reply waits out an outage, the member opts out
    meanwhile, and the retry finds them opted out."""
    phone = unique_phone()
    member_id, conversation_id = texted_in(church, sim_url, phone)
    outage(True)
    answer = _reply(church, conversation_id, "See you at 10")
    assert answer.status_code == 202, answer.text
    message_id = answer.json()["data"]["id"]
    _wait(lambda: _recipient(stack, message_id)[1] >= 1, 20, "the reply was attempted")
    assert church.api.post(f"/v1/members/{member_id}/opt-out").status_code == 200
    outage(False)
    _wait(lambda: _status_of(church, conversation_id, message_id) == "skipped", 30, "skipped")
    time.sleep(0.5)
    assert texts_sent(sim_url, [phone]) == [0]
    assert _recipient(stack, message_id)[0] == "skipped"


def test_help_and_start_answers_go_whatever_the_opt_in_state(church: Church, sim_url: str) -> None:
    """Staff opted the member out: a staff reply is refused, but the answer to HELP is
    one of the two texts carriers allow to anyone, and goes."""
    phone = unique_phone()
    member_id, conversation_id = texted_in(church, sim_url, phone)
    assert church.api.post(f"/v1/members/{member_id}/opt-out").status_code == 200
    assert _reply(church, conversation_id, "Hello?").status_code == 409
    httpx.post(
        f"{sim_url}/_sim/inbound", json={"from": phone, "to": church.phone_number, "text": "HELP"}
    ).raise_for_status()
    _wait(lambda: texts_sent(sim_url, [phone]) == [1], 15, "the HELP answer was texted")
    (answer,) = _outbound(church, conversation_id)
    _wait(lambda: _status_of(church, conversation_id, answer["id"]) == "delivered", 15)
    # The member is still opted out, and broadcasts still skip them.
    assert church.api.get(f"/v1/members/{member_id}").json()["data"]["opted_in"] is False


@pytest.mark.slow
def test_a_reply_survives_an_outage_and_an_empty_redis(
    church: Church, stack: Stack, sim_url: str, outage: Callable[[bool], None]
) -> None:
    """Accepted during a provider outage, its retry lives only in Redis, Redis forgets
    everything: the reconciler finds the reply in Postgres and it is texted once."""
    phone = unique_phone()
    _, conversation_id = texted_in(church, sim_url, phone)
    outage(True)
    try:
        answer = _reply(church, conversation_id, "Still coming?")
        assert answer.status_code == 202, answer.text
        message_id = answer.json()["data"]["id"]
        _wait(lambda: _recipient(stack, message_id)[1] >= 1, 20, "the reply was attempted")
        stack.stop_process("worker")
        _flush_redis(stack)
    finally:
        outage(False)
        if "worker" not in stack.processes:
            stack.spawn("worker", "worker")
    _wait(lambda: _status_of(church, conversation_id, message_id) == "delivered", 60, "delivered")
    time.sleep(0.5)
    assert texts_sent(sim_url, [phone]) == [1]


@pytest.mark.slow
def test_replies_in_flight_when_the_worker_is_killed_are_texted_once(
    church: Church, stack: Stack, sim_url: str, outage: Callable[[bool], None]
) -> None:
    """kill -9 with replies claimed, retrying and queued: the next worker takes over
    the stalled entries (XAUTOCLAIM) and each member gets exactly one text."""
    phones = [unique_phone() for _ in range(12)]
    conversations = [texted_in(church, sim_url, p)[1] for p in phones]
    outage(True)
    try:
        ids = []
        for conversation_id in conversations:
            answer = _reply(church, conversation_id, "Thanks for writing!")
            assert answer.status_code == 202, answer.text
            ids.append(answer.json()["data"]["id"])
        _wait(lambda: _recipient(stack, ids[0])[1] >= 1, 20, "replies attempted")
        stack.stop_process("worker", kill=True)
    finally:
        outage(False)
        if "worker" not in stack.processes:
            stack.spawn("worker", "worker")
    for conversation_id, message_id in zip(conversations, ids, strict=True):
        _wait(
            lambda c=conversation_id, m=message_id: _status_of(church, c, m) == "delivered",
            60,
            f"reply {message_id} delivered",
        )
    time.sleep(0.5)
    assert texts_sent(sim_url, phones) == [1] * len(phones)


@pytest.mark.slow
def test_a_reply_that_uses_every_attempt_is_dead_lettered_and_requeued(
    church: Church, stack: Stack, sim_url: str, outage: Callable[[bool], None]
) -> None:
    """A reply's failures count as attempts (alone, it stays under the breaker's
    threshold), its last one dead-letters it as kind ``reply``, and requeueing it
    texts the member once."""
    warm_phone = unique_phone()
    _, warm = texted_in(church, sim_url, warm_phone)
    first = _reply(church, warm, "warm-up").json()["data"]["id"]
    _wait(lambda: _status_of(church, warm, first) == "delivered", 15, "warm-up delivered")
    phone = unique_phone()
    _, conversation_id = texted_in(church, sim_url, phone)
    outage(True)
    answer = _reply(church, conversation_id, "Prayer meeting tonight")
    message_id = answer.json()["data"]["id"]
    _wait(lambda: _status_of(church, conversation_id, message_id) == "failed", 60, "failed")

    def letters() -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = church.api.get("/v1/dead-letters").json()["data"]
        return [d for d in found if d["message_id"] == message_id]

    _wait(lambda: bool(letters()), 10, "dead-lettered")
    (letter,) = letters()
    assert letter["kind"] == "reply"
    assert letter["conversation_id"] == conversation_id
    assert letter["recipient_count"] == 1
    assert _recipient(stack, message_id)[2] == "max_attempts"
    outage(False)
    assert texts_sent(sim_url, [phone]) == [0]
    requeued = church.api.post(f"/v1/dead-letters/{letter['id']}/requeue")
    assert requeued.status_code == 200, requeued.text
    assert requeued.json()["data"]["requeued"] == 1
    _wait(lambda: _status_of(church, conversation_id, message_id) == "delivered", 30)
    time.sleep(0.5)
    assert texts_sent(sim_url, [phone]) == [1]
    # A reply is not a broadcast: it is listed in its conversation, not in /v1/messages.
    assert church.api.get(f"/v1/messages/{message_id}").status_code == 404
    listed = church.api.get("/v1/messages", params={"limit": 200}).json()["data"]
    assert message_id not in {m["id"] for m in listed}
