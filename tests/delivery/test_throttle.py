"""Sending limits: per-number token buckets, the provider's 429, and SIGTERM.

Each test replaces the suite's worker with one whose environment sets the limit
under test (``worker_with``) and puts the usual one back afterwards; the buckets
live in Redis, so what a worker does is what every worker would do. The per-number
pacing runs on a standalone Redis and on a Redis Cluster (``any_stack``, tests/conftest.py),
where each number's bucket has a hash tag of its own.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Iterator
from typing import cast

import httpx
import psycopg
import pytest

from deploy.stack import Stack
from storage.redis import key_names
from tests.conftest import Church, stack_redis, texts_sent, unique_phone

Counts = dict[str, int]


# Slow lane: real-time rates, SIGTERM of a worker.
pytestmark = pytest.mark.slow


@contextlib.contextmanager
def worker_with(stack: Stack, **env: str) -> Iterator[None]:
    """The suite's worker replaced by one with ``env`` added, for the block's length."""
    stack.stop_process("worker")
    stack.spawn("worker", "worker", env={**stack.env, **env})
    try:
        yield
    finally:
        stack.stop_process("worker")
        stack.spawn("worker", "worker")


@contextlib.contextmanager
def simulator_config(sim_url: str, **config: object) -> Iterator[None]:
    """The simulator configured so for the block; healthy and unlimited afterwards."""
    httpx.post(f"{sim_url}/_sim/config", json=config).raise_for_status()
    try:
        yield
    finally:
        httpx.post(
            f"{sim_url}/_sim/config", json={"outage": False, "rate_limit_per_s": None}
        ).raise_for_status()


def audience(church: Church, count: int, name: str = "Everyone") -> tuple[str, list[str]]:
    """``count`` new members in one new group, through one CSV import."""
    group = church.group(name)
    phones = [unique_phone() for _ in range(count)]
    lines = ["first_name,last_name,phone,groups"]
    lines += [f"M{i},Throttle,{phone},{name}" for i, phone in enumerate(phones)]
    answer = church.api.post(
        "/v1/members/import",
        content="\n".join(lines).encode(),
        headers={"Content-Type": "text/csv"},
        timeout=120,
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["data"]["created"] == count
    return group, phones


def texted(counts: Counts) -> int:
    return counts["sent"] + counts["delivered"] + counts["undelivered"]


def wait_for(church: Church, message_id: str, done: Callable[[Counts], bool], s: float) -> Counts:
    deadline = time.monotonic() + s
    while True:
        counts: Counts = church.api.get(f"/v1/messages/{message_id}").json()["data"]["counts"]
        if done(counts) or time.monotonic() > deadline:
            return counts
        time.sleep(0.1)


def first_texts(church: Church, message_id: str, posted: float, s: float) -> tuple[Counts, float]:
    """The counts once some text went out, and the latest moment known to be before
    the first one: the start of the last poll that saw none (or ``posted``).

    Measuring from there, not from the poll that saw texts, keeps the pacing
    assertions sound on a loaded machine, where that poll may come late."""
    deadline = time.monotonic() + s
    none_since = posted
    while True:
        asked = time.monotonic()
        counts: Counts = church.api.get(f"/v1/messages/{message_id}").json()["data"]["counts"]
        if texted(counts) > 0 or time.monotonic() > deadline:
            return counts, none_since
        none_since = asked
        time.sleep(0.1)


def once_each(sim_url: str, phones: list[str]) -> None:
    texts = texts_sent(sim_url, phones)
    assert texts == [1] * len(phones), (
        f"lost {texts.count(0)}, doubled {sum(t > 1 for t in texts)} of {len(phones)}"
    )


def dead_lettered(stack: Stack, message_id: str) -> int:
    with stack_redis(stack) as client:
        entries = cast(
            list[tuple[bytes, dict[bytes, bytes]]], client.xrange(key_names.DEAD_LETTER_STREAM)
        )
    needle = uuid.UUID(message_id).bytes
    return sum(1 for _, fields in entries if needle in fields.get(b"j", b""))


def test_a_number_sends_no_faster_than_its_rate(
    any_church: Church, any_stack: Stack, any_sim_url: str
) -> None:
    """80 texts from one number at 20/s with a one-second bucket: the first 20 at
    once, the other 60 at the rate, so no less than ~3 s; all of them once."""
    church, stack, sim_url = any_church, any_stack, any_sim_url
    count, rate = 80, 20.0
    group, phones = audience(church, count)
    with worker_with(stack, KOINONIA_SEND_RATE_PER_NUMBER=str(rate), KOINONIA_SEND_BURST_S="1"):
        posted = time.monotonic()
        message_id = church.broadcast(group, "Paced")
        first, started = first_texts(church, message_id, posted, 30)
        window = time.monotonic() - started
        # The burst, plus what the rate refilled while texts may have been going out
        # unseen (on a loaded machine a poll can take a second).
        assert texted(first) <= rate + rate * window + 1, (first, f"{window:.2f} s")
        counts = wait_for(church, message_id, lambda c: texted(c) == count, 60)
        took = time.monotonic() - started
    assert texted(counts) == count, counts
    # (count - burst) / rate, loosely: polling and start-up blur the edges. ``took``
    # runs from before the first text, so slow polls can only lengthen it.
    assert took >= 0.8 * (count - rate) / rate, f"{count} texts in {took:.2f} s at {rate}/s"
    assert took < 4 * count / rate, f"{count} texts took {took:.2f} s at {rate}/s"
    wait_for(church, message_id, lambda c: c["delivered"] == count, 30)
    once_each(sim_url, phones)


def test_provider_429s_use_up_no_attempts(church: Church, stack: Stack, sim_url: str) -> None:
    """The provider allows 10 texts a second and answers 429 with Retry-After to the
    rest. With one attempt per recipient, a 429 counted as a failure would fail the
    recipient at once: everyone is delivered, once, and nothing is dead-lettered."""
    count = 60
    group, phones = audience(church, count)
    with (
        worker_with(stack, KOINONIA_MAX_ATTEMPTS="1"),
        simulator_config(sim_url, rate_limit_per_s=10),
    ):
        message_id = church.broadcast(group, "Over the limit")
        started = time.monotonic()
        counts = wait_for(church, message_id, lambda c: texted(c) + c["failed"] == count, 90)
        took = time.monotonic() - started
    assert counts["failed"] == 0, counts
    assert texted(counts) == count, counts
    # The provider's own limit paced it: 10 at once, then 10 a second.
    assert took >= 0.8 * (count - 10) / 10, f"{count} texts in {took:.2f} s at 10/s"
    counts = wait_for(church, message_id, lambda c: c["delivered"] == count, 30)
    assert counts["delivered"] == count, counts
    assert dead_lettered(stack, message_id) == 0
    once_each(sim_url, phones)


@pytest.mark.timeout(180)
def test_sigterm_hands_back_in_flight_batches(church: Church, stack: Stack, sim_url: str) -> None:
    """SIGTERM mid-broadcast (paced at 100/s, so batches are in flight and waiting for
    tokens): the worker stops within seconds and leaves nothing pending in the queue
    nor any recipient claimed but unsent; a new worker finishes the broadcast with
    every member texted exactly once, without waiting for a takeover."""
    count = 600
    group, phones = audience(church, count)
    paced = {"KOINONIA_SEND_RATE_PER_NUMBER": "100", "KOINONIA_CLAIM_IDLE_MS": "60000"}
    with worker_with(stack, **paced):
        message_id = church.broadcast(group, "Drain test")
        at_stop = wait_for(church, message_id, lambda c: texted(c) >= count // 4, 60)
        process = stack.processes["worker"]
        asked = time.monotonic()
        stack.stop_process("worker")
        stopped_in = time.monotonic() - asked
        assert process.returncode == 0, process.returncode
        assert stopped_in < 10, f"the worker took {stopped_in:.1f} s to stop"
        assert texted(at_stop) < count, f"the broadcast ended before SIGTERM: {at_stop}"

        with stack_redis(stack) as client:
            stream = key_names.church_send_stream(uuid.UUID(church.id))
            pending = client.xpending(stream, key_names.SEND_GROUP)["pending"]
        assert pending == 0, f"{pending} queue entries left pending by the stopped worker"
        with psycopg.connect(stack.env["DATABASE_URL"]) as conn:
            row = conn.execute(
                "SELECT count(*) FROM message_recipient WHERE message_id = %s "
                "AND status = 'sending' AND provider_message_id IS NULL",
                (uuid.UUID(message_id),),
            ).fetchone()
        assert row is not None
        assert row[0] == 0, f"{row[0]} recipients claimed but neither sent nor handed back"

        # A worker with the same settings (no takeover for a minute) picks up the rest.
        stack.spawn("worker", "worker", env={**stack.env, **paced})
        counts = wait_for(church, message_id, lambda c: c["delivered"] == count, 60)
    assert counts["delivered"] == count, counts
    once_each(sim_url, phones)
