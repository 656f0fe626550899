"""Nothing accepted is lost: Redis forgetting the queue only delays delivery.

The two tests that empty Redis run on a standalone Redis and on a Redis Cluster
(``any_stack``, tests/conftest.py), with the same assertions: on the cluster every
master is flushed."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import cast

import httpx
import pytest

from delivery.provider import Lookup, SendRequest, SendResult
from delivery.worker import Worker
from deploy.stack import Stack
from storage.domain.ids import created_at_of, uuid7
from storage.process.services import Services
from storage.process.settings import Settings
from storage.redis import key_names
from storage.redis.queue import SendBatch, send_decoder
from tests.conftest import Church, flush_redis, texts_sent
from tests.delivery.test_throttle import audience

# Slow lane: kills workers and empties Redis mid-broadcast.
pytestmark = pytest.mark.slow


def _flush_redis(stack: Stack) -> None:
    """Empty ``stack``'s Redis, standalone or every master of a cluster."""
    flush_redis(stack)


def _audience(church: Church, count: int) -> tuple[str, list[str]]:
    """``count`` new members in one new group, through one CSV import (one request, not
    ``count``: the 1,500 members below took most of their test's time one by one)."""
    return audience(church, count)


def _once_each(sim_url: str, phones: list[str]) -> None:
    texts = texts_sent(sim_url, phones)
    lost, doubled = texts.count(0), sum(t > 1 for t in texts)
    assert texts.count(1) == len(phones), f"lost: {lost}, doubled: {doubled}"


@pytest.fixture
def slow_receipts(sim_url: str) -> Iterator[None]:
    """Receipts take 50-150 ms, so a broadcast is still in flight when disturbed."""
    httpx.post(f"{sim_url}/_sim/config", json={"latency_ms": [50, 150]}).raise_for_status()
    yield
    httpx.post(f"{sim_url}/_sim/config", json={"latency_ms": [0, 0]}).raise_for_status()


def test_broadcast_survives_an_empty_redis(
    any_church: Church, any_stack: Stack, any_sim_url: str
) -> None:
    church, stack = any_church, any_stack
    group, phones = _audience(church, 5)
    stack.stop_process("worker")
    try:
        message_id = church.broadcast(group, "Still coming")
        # The materialize entry is the only trace in Redis; wipe it all.
        _flush_redis(stack)
    finally:
        stack.spawn("worker", "worker")
    counts = church.counts_when(message_id, lambda c: c["delivered"] == 5, 40)
    assert counts["delivered"] == 5, counts
    assert texts_sent(any_sim_url, phones) == [1] * 5


@pytest.mark.usefixtures("slow_receipts")
def test_killed_worker_loses_nothing_and_doubles_nothing(
    church: Church, stack: Stack, sim_url: str
) -> None:
    """kill -9 the worker mid-broadcast; a new one takes over the stalled queue
    entries (XAUTOCLAIM) and the provider idempotency key stops repeats."""
    count = 1500
    group, phones = _audience(church, count)
    message_id = church.broadcast(group, "Crash test")
    church.counts_when(
        message_id, lambda c: c["sending"] + c["sent"] + c["delivered"] >= count // 5
    )
    stack.stop_process("worker", kill=True)
    stack.spawn("worker", "worker")
    counts = church.counts_when(message_id, lambda c: c["delivered"] == count, 90)
    assert counts["delivered"] == count, counts
    _once_each(sim_url, phones)


def test_redis_flushed_mid_broadcast_loses_nothing_and_doubles_nothing(
    any_church: Church, any_stack: Stack, any_sim_url: str
) -> None:
    """Mid-broadcast, during a provider outage, the worker stops and Redis forgets
    every queue entry and scheduled retry: the reconciler re-enqueues from
    Postgres, and idempotency keys keep any repeat from texting twice."""
    church, stack, sim_url = any_church, any_stack, any_sim_url
    count = 300
    group, phones = _audience(church, count)
    config = f"{sim_url}/_sim/config"
    httpx.post(config, json={"outage": True}).raise_for_status()
    try:
        message_id = church.broadcast(group, "Flush test")
        counts = church.counts_when(message_id, lambda c: c["sending"] == count)
        assert counts["sending"] == count, counts
        # Every recipient now waits for a retry that lives only in Redis.
        stack.stop_process("worker")
        _flush_redis(stack)
    finally:
        httpx.post(config, json={"outage": False}).raise_for_status()
        if "worker" not in stack.processes:
            stack.spawn("worker", "worker")
    counts = church.counts_when(message_id, lambda c: c["delivered"] == count, 90)
    assert counts["delivered"] == count, counts
    _once_each(sim_url, phones)


def test_short_outage_is_retried_and_delivered_once(church: Church, sim_url: str) -> None:
    """Sends refused with 503 wait (the breaker hands them back) and go out once it
    clears. The backoff itself is checked by the next test: with 20 recipients the
    circuit opens before any failure counts as an attempt."""
    group, phones = _audience(church, 20)
    config = f"{sim_url}/_sim/config"
    httpx.post(config, json={"outage": True}).raise_for_status()
    try:
        message_id = church.broadcast(group, "Retry test")
        counts = church.counts_when(message_id, lambda c: c["sending"] == 20)
        assert counts["sending"] == 20, counts
    finally:
        httpx.post(config, json={"outage": False}).raise_for_status()
    counts = church.counts_when(message_id, lambda c: c["delivered"] == 20, 30)
    assert counts["delivered"] == 20, counts
    assert counts["failed"] == 0
    _once_each(sim_url, phones)


@pytest.mark.anyio
async def test_a_counted_failure_waits_its_backoff(stack: Stack) -> None:
    """A failed attempt goes back to the church's delayed set due no sooner than half
    the exponential delay (full jitter in [d/2, d]), at the next attempt; this fails
    if the backoff were zero."""
    settings = Settings.from_env(stack.env)
    services = await Services.open(settings)
    try:
        worker = Worker(services, provider=_NoProvider())
        base = settings.delivery.retry_base_s
        for attempt in (1, 2, 3):
            church_id = uuid.uuid4()
            message_id = uuid7()
            batch = SendBatch(
                church_id=church_id,
                message_id=message_id,
                created_at=created_at_of(message_id),
                recipient_ids=[uuid.uuid4()],
                from_number="+15550000000",
                attempt=attempt,
                max_attempts=5,
            )
            before_ms = time.time() * 1000
            await worker._retry_or_dead_letter(batch, batch.recipient_ids)
            after_ms = time.time() * 1000
            (entry, due_ms), *_ = cast(
                list[tuple[bytes, float]],
                await services.redis.zrange(
                    key_names.church_delayed(church_id), 0, -1, withscores=True
                ),
            )
            delay = base * 2 ** (attempt - 1)
            # The due time is kept in whole milliseconds (truncated).
            assert before_ms + delay * 500 - 1 < due_ms <= after_ms + delay * 1000, attempt
            again = send_decoder.decode(entry)
            assert (again.attempt, again.recipient_ids) == (attempt + 1, batch.recipient_ids)
            await services.redis.delete(key_names.church_delayed(church_id))
    finally:
        await services.close()


class _NoProvider:
    """The retry decision needs no provider call."""

    async def send(self, batch: list[SendRequest]) -> list[SendResult]:
        raise AssertionError("nothing is sent here")

    async def lookup(self, provider_message_id: str) -> Lookup | None:
        raise AssertionError("nothing is looked up here")

    async def aclose(self) -> None:
        pass
