"""Nothing accepted is lost: Redis forgetting the queue only delays delivery."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import redis

from deploy.stack import Stack
from tests.conftest import Church, texts_sent, unique_phone


def _flush_redis(stack: Stack) -> None:
    client = redis.Redis.from_url(stack.env["REDIS_URL"])
    client.flushall()
    client.close()


def _audience(church: Church, count: int) -> tuple[str, list[str]]:
    group = church.group()
    phones = [unique_phone() for _ in range(count)]
    for phone in phones:
        church.member(phone, [group])
    return group, phones


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


def test_broadcast_survives_an_empty_redis(church: Church, stack: Stack, sim_url: str) -> None:
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
    assert texts_sent(sim_url, phones) == [1] * 5


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
    church: Church, stack: Stack, sim_url: str
) -> None:
    """Mid-broadcast, during a provider outage, the worker stops and Redis forgets
    every queue entry and scheduled retry: the reconciler re-enqueues from
    Postgres, and idempotency keys keep any repeat from texting twice."""
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


def test_short_outage_is_retried_with_backoff(church: Church, sim_url: str) -> None:
    """Sends refused with 503 wait in the retry set and go out once it clears."""
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
