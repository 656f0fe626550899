"""Dead letters on the real stack: a provider outage long enough to use every attempt
puts a broadcast's recipients in the dead-letter stream; the API and the CLI list
them per church and requeue them, once. The outage case runs on a standalone Redis
and on a Redis Cluster (``any_stack``, tests/conftest.py), where the dead-letter
stream is one key of the whole deployment."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import msgspec
import pytest

from deploy.stack import Stack
from storage.domain.errors import Conflict
from storage.domain.ids import created_at_of, uuid7
from storage.pg.database import open_pool
from storage.pg.dead_letters import entry_id_of, entry_uuid, list_dead_letters, requeue
from storage.process.settings import Settings
from storage.redis import key_names
from storage.redis.connection import open_redis
from storage.redis.queue import SendBatch, encode_entry
from tests.api.staff_support import error_of, join
from tests.conftest import Church, stack_redis, texts_sent, unique_phone
from tests.conftest import wait_until as _wait


def plant_dead_letter(stack: Stack, church_id: str, recipient_ids: list[str] | None = None) -> str:
    """Write a dead-letter entry for ``church_id`` as the worker does (a send batch of a
    made-up message, reason ``max_attempts``); returns its API id. For tests that need
    one without an outage (the tenancy matrix)."""
    message_id = uuid7()
    batch = SendBatch(
        church_id=uuid.UUID(church_id),
        message_id=message_id,
        created_at=created_at_of(message_id),
        recipient_ids=[uuid.UUID(r) for r in recipient_ids or [str(uuid.uuid4())]],
        from_number="+15550000000",
        attempt=5,
        max_attempts=5,
    )
    with stack_redis(stack) as client:
        entry_id = client.xadd(
            key_names.DEAD_LETTER_STREAM, {"j": encode_entry(batch), "reason": "max_attempts"}
        )
    raw = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    return str(entry_uuid(raw))


def _outage(sim_url: str, on: bool) -> None:
    """Every send answers 503 (with Retry-After: 1) while on."""
    httpx.post(f"{sim_url}/_sim/config", json={"outage": on}).raise_for_status()


@contextlib.contextmanager
def _outage_switch(sim_url: str) -> Iterator[Callable[[bool], None]]:
    try:
        yield lambda on: _outage(sim_url, on)
    finally:
        _outage(sim_url, False)


@pytest.fixture
def outages(sim_url: str) -> Iterator[Callable[[bool], None]]:
    """Switch the provider outage on and off; always off when the test ends."""
    with _outage_switch(sim_url) as switch:
        yield switch


@pytest.fixture
def any_outages(any_sim_url: str) -> Iterator[Callable[[bool], None]]:
    """``outages`` of ``any_stack``'s simulator."""
    with _outage_switch(any_sim_url) as switch:
        yield switch


def _letters(church: Church) -> list[dict[str, Any]]:
    answer = church.api.get("/v1/dead-letters", params={"limit": 200})
    assert answer.status_code == 200, answer.text
    found: list[dict[str, Any]] = answer.json()["data"]
    return found


def _dead_broadcast(church: Church, phones: list[str]) -> str:
    group = church.group()
    for phone in phones:
        church.member(phone, [group])
    return church.broadcast(group, "Choir practice moved to 7")


def _cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deploy.cli", "dead-letters", *args],
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_entry_ids_are_uuids_both_ways() -> None:
    for raw in ("0-0", "1732262400000-0", "1732262400000-17", f"{2**48 - 1}-{2**40}"):
        value = entry_uuid(raw)
        assert value.version == 7
        assert entry_id_of(value) == raw
        assert entry_id_of(str(value)) == raw
        assert entry_id_of(raw) == raw
    assert entry_uuid("1732262400000-0").hex.startswith(f"{1732262400000:012x}")
    assert entry_id_of(uuid.uuid4()) is None
    assert entry_id_of("not-an-id") is None
    assert entry_id_of(uuid7()) is None  # random bits where the sequence number sits


def _dead_letter_by_outage(
    church: Church, sim_url: str, outages: Callable[[bool], None]
) -> tuple[str, str, dict[str, Any]]:
    """One member's broadcast dead-lettered by an outage: (phone, message id, entry).

    A delivered text first, so the provider circuit breaker (if any) starts from a
    success; one recipient, so its five attempts stay under the breaker's threshold
    and each one counts as an attempt."""
    group = church.group("warm")
    church.member(unique_phone(), [group])
    warm = church.broadcast(group, "warm-up")
    assert church.counts_when(warm, lambda c: c["delivered"] == 1)["delivered"] == 1
    phone = unique_phone()
    outages(True)
    try:
        message_id = _dead_broadcast(church, [phone])
        counts = church.counts_when(message_id, lambda c: c["failed"] == 1, 60)
        assert counts["failed"] == 1, counts
        _wait(lambda: any(d["message_id"] == message_id for d in _letters(church)))
    finally:
        outages(False)
    (entry,) = [d for d in _letters(church) if d["message_id"] == message_id]
    return phone, message_id, entry


@pytest.mark.slow
def test_an_outage_dead_letter_is_listed_and_requeued_once(
    any_church: Church,
    any_stack: Stack,
    any_base_url: str,
    any_sim_url: str,
    any_outages: Callable[[bool], None],
) -> None:
    church, stack, base_url, sim_url = any_church, any_stack, any_base_url, any_sim_url
    outages = any_outages
    phone, message_id, letter = _dead_letter_by_outage(church, sim_url, outages)
    assert texts_sent(sim_url, [phone]) == [0]
    assert letter["church_id"] == church.id
    assert letter["kind"] == "batch"
    assert letter["reason"] == "max_attempts"
    assert letter["recipient_count"] == 1
    assert letter["requeueable"] is True
    dead_at = datetime.fromisoformat(letter["dead_at"])
    assert abs(dead_at - datetime.now(UTC)) < timedelta(minutes=2)
    recipients = church.api.get(f"/v1/messages/{message_id}/recipients").json()["data"]
    assert letter["recipient_ids"] == [r["id"] for r in recipients]
    assert [r["error_code"] for r in recipients] == ["max_attempts"]
    assert church.api.get(f"/v1/messages/{message_id}").json()["data"]["status"] == "completed"

    # Staff may look but not requeue.
    staff, _ = join(church, stack, base_url, "staff")
    own = f"/v1/dead-letters/{letter['id']}/requeue"
    try:
        assert [d["id"] for d in staff.get("/v1/dead-letters").json()["data"]] == [letter["id"]]
        assert error_of(staff.post(own)) == (403, "forbidden")
    finally:
        staff.close()

    # Two admins press the button at once: the recipient is sent once.
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda _: church.api.post(own), range(2)))
    assert sorted(a.status_code for a in answers) in ([200, 200], [200, 404]), [
        a.text for a in answers
    ]
    done = [a.json()["data"] for a in answers if a.status_code == 200]
    assert sum(d["requeued"] for d in done) == 1
    counts = church.counts_when(message_id, lambda c: c["delivered"] == 1, 30)
    assert (counts["delivered"], counts["failed"]) == (1, 0), counts

    def status() -> str:
        found: str = church.api.get(f"/v1/messages/{message_id}").json()["data"]["status"]
        return found

    _wait(lambda: status() == "completed", what="completed again")
    assert _letters(church) == []
    assert error_of(church.api.post(own)) == (404, "not_found")
    audit = church.api.get("/v1/audit-log", params={"action": "dead_letter.requeue"}).json()
    assert {e["target_id"] for e in audit["data"]} == {letter["id"]}
    time.sleep(1.0)
    assert texts_sent(sim_url, [phone]) == [1]


@pytest.mark.slow
def test_dead_letters_per_church_and_the_cli(
    church: Church,
    other_church: Church,
    stack: Stack,
    sim_url: str,
    outages: Callable[[bool], None],
) -> None:
    phone, message_id, theirs = _dead_letter_by_outage(other_church, sim_url, outages)
    ours = plant_dead_letter(stack, church.id)
    assert [d["id"] for d in _letters(church)] == [ours]
    assert [d["id"] for d in _letters(other_church)] == [theirs["id"]]
    assert error_of(church.api.post(f"/v1/dead-letters/{theirs['id']}/requeue")) == (
        404,
        "not_found",
    )

    # The CLI: one church's entries, requeue them all with progress, then nothing left.
    listed = _cli(stack, "list", "--church-id", other_church.id)
    assert listed.returncode == 0, listed.stderr
    rows = [msgspec.json.decode(line) for line in listed.stdout.splitlines()]
    assert [r["id"] for r in rows] == [theirs["id"]]
    everyone = _cli(stack, "list")
    assert {theirs["id"], ours} <= {
        msgspec.json.decode(line)["id"] for line in everyone.stdout.splitlines()
    }
    refused = _cli(stack, "requeue", theirs["id"], "--church-id", church.id)
    assert refused.returncode == 1, refused.stderr
    assert "not found" in refused.stdout
    requeued = _cli(stack, "requeue", "--all", "--church-id", other_church.id)
    assert requeued.returncode == 0, requeued.stderr
    assert "requeue: 1/1 entries, 1 recipients" in requeued.stderr
    summary = msgspec.json.decode(requeued.stdout)
    assert summary == {"entries": 1, "requeued_entries": 1, "recipients": 1, "problems": []}
    counts = other_church.counts_when(message_id, lambda c: c["delivered"] == 1, 30)
    assert counts["delivered"] == 1, counts
    again = _cli(stack, "requeue", "--all", "--church-id", other_church.id)
    assert again.returncode == 2, again.stderr
    audit = other_church.api.get("/v1/audit-log", params={"action": "dead_letter.requeue"})
    (entry,) = audit.json()["data"]
    assert entry["actor_type"] == "system"
    assert entry["details"]["via"] == "cli"
    time.sleep(1.0)
    assert texts_sent(sim_url, [phone]) == [1]
    assert [d["id"] for d in _letters(church)] == [ours]


def test_pages_and_old_entries(church: Church, other_church: Church, stack: Stack) -> None:
    ours = [plant_dead_letter(stack, church.id) for _ in range(3)]
    plant_dead_letter(stack, other_church.id)
    first = church.api.get("/v1/dead-letters", params={"limit": 2})
    assert first.status_code == 200, first.text
    cursor = first.json()["meta"]["next_cursor"]
    assert cursor
    second = church.api.get("/v1/dead-letters", params={"limit": 2, "cursor": cursor})
    listed = [d["id"] for d in first.json()["data"] + second.json()["data"]]
    assert listed == list(reversed(ours))  # newest first
    assert second.json()["meta"]["next_cursor"] is None
    bad = church.api.get("/v1/dead-letters", params={"cursor": "nope"})
    assert error_of(bad) == (422, "validation_error")

    # Past the provider's idempotency window an entry is refused, and stays listed.
    settings = Settings.from_env(stack.env)

    async def too_old() -> None:
        pool = await open_pool(settings.database)
        client = open_redis(settings.redis)
        try:
            with pytest.raises(Conflict, match="idempotency window"):
                await requeue(
                    pool,
                    client,
                    uuid.UUID(ours[0]),
                    church_id=uuid.UUID(church.id),
                    shards=settings.delivery.shards,
                    max_attempts=5,
                    now=datetime.now(UTC) + timedelta(days=1),
                )
            page = await list_dead_letters(
                client, uuid.UUID(church.id), limit=10, cursor=None, now=datetime.now(UTC)
            )
            assert str(page.items[-1].id) == ours[0]
        finally:
            await pool.close()
            await client.aclose()

    asyncio.run(too_old())
    # A planted batch whose recipients do not exist: requeued, nobody to send.
    answer = church.api.post(f"/v1/dead-letters/{ours[1]}/requeue")
    assert answer.status_code == 200, answer.text
    assert (answer.json()["data"]["requeued"], answer.json()["data"]["unchanged"]) == (0, 1)
