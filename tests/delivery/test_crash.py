"""A 10,000-recipient broadcast survives a kill -9 of its worker, and an empty Redis.

The audience comes in through the CSV import (one request), the broadcast through
the REST API. Mid-broadcast (at about a quarter of the texts sent) the worker is
killed without warning and a new one started, or Redis forgets everything. Then
every recipient must end ``delivered`` and the simulator must have texted each
destination exactly once: a lost recipient shows as 0 texts, a duplicate as 2.

The helpers here serve tests/delivery/test_outage.py too; the smaller durability
tests (tests/delivery/test_durability.py) lend theirs.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import httpx
import msgspec
import psycopg
import pytest
import redis

from deploy.stack import Stack
from storage.redis import key_names
from tests.conftest import Church, unique_phone
from tests.delivery.test_durability import _flush_redis, _once_each

# Slow lane: kills and restarts processes mid-broadcast of 10,000.
pytestmark = pytest.mark.slow


AUDIENCE = 10_000
KILL_AT = 0.25
"""Disturb the broadcast once the provider has sent this share of the audience's texts."""
FINISH_S = 150.0
"""How long the rest of a broadcast may take after the disturbance (2 loaded cores)."""

Counts = dict[str, int]


def bulk_audience(
    church: Church, count: int, group_name: str = "Everyone"
) -> tuple[str, list[str]]:
    """``count`` new members in one new group, imported as one CSV (seconds, not minutes)."""
    group = church.group(group_name)
    phones = [unique_phone() for _ in range(count)]
    lines = ["first_name,last_name,phone,groups"]
    lines += [f"Member{i},Crash,{phone},{group_name}" for i, phone in enumerate(phones)]
    answer = church.api.post(
        "/v1/members/import",
        content="\n".join(lines).encode(),
        headers={"Content-Type": "text/csv"},
        timeout=300,
    )
    assert answer.status_code == 200, answer.text
    summary = answer.json()["data"]
    assert summary["created"] == count, summary
    return group, phones


def counts_of(church: Church, message_id: str) -> Counts:
    counts: Counts = church.api.get(f"/v1/messages/{message_id}", timeout=30).json()["data"][
        "counts"
    ]
    return counts


def wait_counts(
    church: Church,
    message_id: str,
    done: Callable[[Counts], bool],
    seconds: float,
    every_s: float = 0.25,
) -> Counts:
    """Like ``Church.counts_when``, but polling gently: each poll counts every row of a
    large broadcast, and the two cores are busy delivering it."""
    deadline = time.monotonic() + seconds
    while True:
        counts = counts_of(church, message_id)
        if done(counts) or time.monotonic() > deadline:
            return counts
        time.sleep(every_s)


def final(counts: Counts) -> int:
    return counts["delivered"] + counts["failed"] + counts["undelivered"] + counts["skipped"]


Row = tuple[str, str | None, int, int]


def recipient_summary(stack: Stack, message_id: str) -> list[Row]:
    """(status, error code, attempts, rows) of one broadcast's recipients, from Postgres:
    what an assertion shows when the counts are off."""
    with psycopg.connect(stack.env["DATABASE_URL"]) as conn:
        rows = conn.execute(
            "SELECT status, error_code, attempts, count(*) FROM message_recipient "
            "WHERE message_id = %s GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
            (uuid.UUID(message_id),),
        ).fetchall()
    return [(str(r[0]), r[1], int(r[2]), int(r[3])) for r in rows]


def dead_letters(stack: Stack, message_id: str) -> list[tuple[str, int]]:
    """(reason, recipients) of every dead-letter entry that names this message.

    Read from ``key_names.DEAD_LETTER_STREAM`` and any other stream whose name mentions
    "dead" (per-church dead-letter streams would be found too); an entry belongs to
    the message when one of its fields holds the message id's text (msgpack and JSON
    both carry a UUID as its canonical string)."""
    needle = message_id.encode()
    client = redis.Redis.from_url(stack.env["REDIS_URL"])
    try:
        streams = {key_names.DEAD_LETTER_STREAM.encode()}
        streams.update(
            name for name in client.scan_iter(match="*dead*") if client.type(name) == b"stream"
        )
        found: list[tuple[str, int]] = []
        for stream in sorted(streams):
            for _entry_id, fields in client.xrange(stream):
                if not any(needle in value for value in fields.values()):
                    continue
                reason = fields.get(b"reason", b"?").decode(errors="replace")
                found.append((reason, _recipients_in(fields)))
        return found
    finally:
        client.close()


def _recipients_in(fields: dict[bytes, bytes]) -> int:
    for value in fields.values():
        for decode in (msgspec.msgpack.decode, msgspec.json.decode):
            try:
                entry = decode(value)
            except (msgspec.DecodeError, UnicodeDecodeError):
                continue
            if isinstance(entry, dict) and isinstance(entry.get("recipient_ids"), list):
                return len(entry["recipient_ids"])
    return 1


def provider_texts(sim_url: str) -> int:
    """Texts the simulator has sent so far, all tests together (replays not counted)."""
    return int(httpx.get(f"{sim_url}/_sim/stats", timeout=30).json()["total"])


def _broadcast_until(church: Church, sim_url: str, group: str, body: str) -> tuple[str, int]:
    """Post the broadcast; return once the provider has sent ``KILL_AT`` of it, with
    the count sent then. Progress is the provider's, not the recipients' statuses:
    the worker sends far ahead of the receipts that move recipients to sent and
    delivered, so by the time a quarter reads ``sent`` it may have sent them all."""
    before = provider_texts(sim_url)
    message_id = church.broadcast(group, body)
    deadline = time.monotonic() + 120
    while (sent := provider_texts(sim_url) - before) < KILL_AT * AUDIENCE:
        assert time.monotonic() < deadline, (sent, counts_of(church, message_id))
        time.sleep(0.05)
    return message_id, sent


def _all_delivered_once(
    church: Church, stack: Stack, sim_url: str, message_id: str, phones: list[str]
) -> None:
    counts = wait_counts(church, message_id, lambda c: c["delivered"] == AUDIENCE, FINISH_S)
    assert counts["delivered"] == AUDIENCE, (counts, recipient_summary(stack, message_id))
    _once_each(sim_url, phones)


def _timings(what: str, marks: list[float], sent: tuple[int, int], rows: list[Row]) -> None:
    """Phase times, texts sent around the disturbance, and how many recipients were
    claimed more than once; shown with ``pytest -s`` (the suite's time is watched)."""
    started, imported, disturbed = marks
    now = time.monotonic()
    again = sum(n for _status, _error, attempts, n in rows if attempts > 1)
    print(
        f"\n{what}: import {imported - started:.1f} s, broadcast to {what} "
        f"{disturbed - imported:.1f} s ({sent[0]:,} texts sent, {sent[1]:,} just after), "
        f"{what} to all delivered {now - disturbed:.1f} s, total {now - started:.1f} s; "
        f"{again:,} recipients claimed more than once"
    )


@pytest.mark.timeout(420)
def test_worker_killed_mid_broadcast_of_10000(church: Church, stack: Stack, sim_url: str) -> None:
    """kill -9 at ~25 %: the new worker takes the dead one's pending entries over
    (XAUTOCLAIM after ``claim_idle_ms``), re-sends what was claimed but not recorded
    with the same Idempotency-Key, and nobody is texted twice or forgotten."""
    marks = [time.monotonic()]
    group, phones = bulk_audience(church, AUDIENCE)
    marks.append(time.monotonic())
    before = provider_texts(sim_url)
    message_id, at_kill = _broadcast_until(church, sim_url, group, "Crash test")
    stack.stop_process("worker", kill=True)
    after_kill = provider_texts(sim_url) - before
    stack.spawn("worker", "worker")
    marks.append(time.monotonic())
    assert after_kill < AUDIENCE, "every text was sent before the kill: nothing tested"
    _all_delivered_once(church, stack, sim_url, message_id, phones)
    _timings("kill -9", marks, (at_kill, after_kill), recipient_summary(stack, message_id))
    assert dead_letters(stack, message_id) == []


@pytest.mark.timeout(420)
def test_redis_flushed_mid_broadcast_of_10000(church: Church, stack: Stack, sim_url: str) -> None:
    """FLUSHALL at ~25 % with the worker running: every queued batch, pending entry and
    consumer group is gone; the reconciler (every second here, for rows idle 5 s)
    enqueues the recipients again from Postgres, and idempotency keys stop repeats."""
    marks = [time.monotonic()]
    group, phones = bulk_audience(church, AUDIENCE)
    marks.append(time.monotonic())
    before = provider_texts(sim_url)
    message_id, at_flush = _broadcast_until(church, sim_url, group, "Flush test")
    _flush_redis(stack)
    after_flush = provider_texts(sim_url) - before
    marks.append(time.monotonic())
    assert after_flush < AUDIENCE, "every text was sent before the flush: nothing tested"
    _all_delivered_once(church, stack, sim_url, message_id, phones)
    _timings("FLUSHALL", marks, (at_flush, after_flush), recipient_summary(stack, message_id))
    assert dead_letters(stack, message_id) == []
