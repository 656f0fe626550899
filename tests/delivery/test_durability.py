"""Nothing accepted is lost: Redis forgetting the queue only delays delivery."""

from __future__ import annotations

import time

import httpx
import redis

from deploy.stack import Stack
from tests.conftest import Church, unique_phone


def test_broadcast_survives_an_empty_redis(church: Church, stack: Stack, sim_url: str) -> None:
    group = church.group()
    phones = [unique_phone() for _ in range(5)]
    for phone in phones:
        church.member(phone, [group])
    stack.stop_process("worker")
    try:
        answer = church.api.post(
            "/v1/messages", json={"body": "Still coming", "target": {"group_ids": [group]}}
        )
        assert answer.status_code == 202
        message_id = answer.json()["data"]["id"]
        # The materialize entry is the only trace in Redis; wipe it all.
        client = redis.Redis.from_url(stack.env["REDIS_URL"])
        client.flushall()
        client.close()
    finally:
        stack.spawn("worker", "worker")
    deadline = time.monotonic() + 40
    counts: dict[str, int] = {}
    while time.monotonic() < deadline:
        counts = church.api.get(f"/v1/messages/{message_id}").json()["data"]["counts"]
        if counts["delivered"] == 5:
            break
        time.sleep(0.25)
    assert counts["delivered"] == 5, counts
    by_destination = httpx.get(f"{sim_url}/_sim/stats").json()["by_destination"]
    assert [by_destination.get(p) for p in phones] == [1] * 5


def test_killed_worker_loses_nothing_and_doubles_nothing(
    church: Church, stack: Stack, sim_url: str
) -> None:
    """kill -9 the worker mid-broadcast; a new one takes over the stalled queue
    entries (XAUTOCLAIM) and the provider idempotency key stops repeats."""
    count = 1500
    group = church.group()
    phones = [unique_phone() for _ in range(count)]
    for phone in phones:
        church.member(phone, [group])
    httpx.post(f"{sim_url}/_sim/config", json={"latency_ms": [50, 150]}).raise_for_status()
    try:
        answer = church.api.post(
            "/v1/messages", json={"body": "Crash test", "target": {"group_ids": [group]}}
        )
        message_id = answer.json()["data"]["id"]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            counts = church.api.get(f"/v1/messages/{message_id}").json()["data"]["counts"]
            if counts["sending"] + counts["sent"] + counts["delivered"] >= count // 5:
                break
            time.sleep(0.02)
        stack.stop_process("worker", kill=True)
        stack.spawn("worker", "worker")
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            counts = church.api.get(f"/v1/messages/{message_id}").json()["data"]["counts"]
            if counts["delivered"] == count:
                break
            time.sleep(0.25)
    finally:
        httpx.post(f"{sim_url}/_sim/config", json={"latency_ms": [0, 0]}).raise_for_status()
    assert counts["delivered"] == count, counts
    by_destination = httpx.get(f"{sim_url}/_sim/stats").json()["by_destination"]
    texts = [by_destination.get(p, 0) for p in phones]
    assert texts.count(1) == count, f"lost: {texts.count(0)}, doubled: {sum(t > 1 for t in texts)}"


def test_redis_flushed_mid_broadcast_loses_nothing_and_doubles_nothing(
    church: Church, stack: Stack, sim_url: str
) -> None:
    """Mid-broadcast, during a provider outage, the worker stops and Redis forgets
    every queue entry and scheduled retry: the reconciler re-enqueues from
    Postgres, and idempotency keys keep any repeat from texting twice."""
    count = 300
    group = church.group()
    phones = [unique_phone() for _ in range(count)]
    for phone in phones:
        church.member(phone, [group])
    config = f"{sim_url}/_sim/config"
    httpx.post(config, json={"outage": True}).raise_for_status()
    try:
        answer = church.api.post(
            "/v1/messages", json={"body": "Flush test", "target": {"group_ids": [group]}}
        )
        message_id = answer.json()["data"]["id"]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            counts = church.api.get(f"/v1/messages/{message_id}").json()["data"]["counts"]
            if counts["sending"] == count:
                break
            time.sleep(0.02)
        assert counts["sending"] == count, counts
        # Every recipient now waits for a retry that lives only in Redis.
        stack.stop_process("worker")
        client = redis.Redis.from_url(stack.env["REDIS_URL"])
        client.flushall()
        client.close()
    finally:
        httpx.post(config, json={"outage": False}).raise_for_status()
        if "worker" not in stack.processes:
            stack.spawn("worker", "worker")
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        counts = church.api.get(f"/v1/messages/{message_id}").json()["data"]["counts"]
        if counts["delivered"] == count:
            break
        time.sleep(0.25)
    assert counts["delivered"] == count, counts
    by_destination = httpx.get(f"{sim_url}/_sim/stats").json()["by_destination"]
    texts = [by_destination.get(p, 0) for p in phones]
    assert texts.count(1) == count, f"lost: {texts.count(0)}, doubled: {sum(t > 1 for t in texts)}"
