"""Two web nodes behind real nginx (issue 5, "Multi-node").

nginx runs the production configuration, ``deploy/nginx.conf``, rendered by
``deploy.nginx`` for free loopback ports, as an unprivileged foreground process
under the test's tmp dir. 200 WebSocket clients (10 churches x 20) connect
through it and follow ``inbox`` and ``dashboard``; least_conn spreads them over
both nodes. Numbered events are published on every channel while, midway, one
node is killed with SIGKILL. Its clients reconnect through nginx, which skips
the dead node, resubscribe with ``since`` and must be told ``recovered: true``;
in the end every client holds every event of its channels exactly once, in
order. nginx reports the node that answered each handshake in ``X-Upstream``,
so the test knows who was where.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aredis

from deploy.nginx import SITE_CONF, find_nginx, render_main
from deploy.stack import Stack
from storage.redis.publisher import EventPublisher
from tests.conftest import Church
from tests.deploy.nginx_support import (
    NGINX_MISSING,
    Cluster,
    Follower,
    Producer,
    compare,
)

# Slow lane: nginx in front of several web processes.
pytestmark = pytest.mark.slow


CHURCHES = 10
PER_CHURCH = 20
CHANNELS = ["inbox", "dashboard"]
ROUNDS = 100
"""Events per channel."""
KILL_AT = 40
PACE_S = 0.03


def _nginx() -> Path:
    binary = find_nginx()
    if binary is None:
        pytest.fail(NGINX_MISSING)
    return binary


@pytest.fixture(scope="module")
def churches(base_url: str) -> Iterator[list[Church]]:
    with ThreadPoolExecutor(CHURCHES) as pool:
        made = list(pool.map(lambda _: Church(base_url), range(CHURCHES)))
    yield made
    for church in made:
        church.close()


@pytest.fixture
def cluster(stack: Stack, tmp_path: Path) -> Iterator[Cluster]:
    _nginx()
    started = Cluster(stack, tmp_path / "nginx", f"nginx_{uuid.uuid4().hex[:6]}")
    try:
        started.start()
        yield started
    finally:
        started.stop()


def test_production_config_is_valid(tmp_path: Path) -> None:
    """deploy/nginx.conf as shipped (ports 8000/8001 and 8080) passes ``nginx -t``."""
    binary = _nginx()
    (tmp_path / "temp").mkdir()
    conf = tmp_path / "nginx.conf"
    conf.write_text(render_main(SITE_CONF.read_text(), tmp_path))
    checked = subprocess.run(
        [str(binary), "-t", "-p", str(tmp_path), "-c", str(conf), "-e", str(tmp_path / "err")],
        capture_output=True,
        timeout=10,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr.decode()


@pytest.mark.anyio
async def test_clients_of_a_killed_node_recover_through_nginx(
    stack: Stack, cluster: Cluster, churches: list[Church]
) -> None:
    started = time.monotonic()
    node_a, node_b = cluster.nodes["a"], cluster.nodes["b"]
    stop = asyncio.Event()
    followers = [
        Follower(i, cluster.ws_url, church.key, church.id, CHANNELS, stop, expected=ROUNDS)
        for i, church in enumerate(c for c in churches for _ in range(PER_CHURCH))
    ]
    tasks = [asyncio.create_task(f.run()) for f in followers]
    redis = aredis.Redis.from_url(stack.env["REDIS_URL"])
    producer = Producer(EventPublisher(redis), [c.id for c in churches], ROUNDS)
    try:
        await asyncio.wait_for(asyncio.gather(*(f.ready.wait() for f in followers)), 20)
        connected = time.monotonic()
        first = Counter(f.first_node for f in followers)
        # least_conn spreads the long-lived connections over both nodes.
        assert set(first) == {node_a, node_b}, first
        assert min(first.values()) >= len(followers) // 4, first

        for seq in range(1, ROUNDS + 1):
            await producer.publish_round(seq)
            if seq == KILL_AT:
                await asyncio.to_thread(cluster.kill, "a")
                killed = time.monotonic()
            await asyncio.sleep(PACE_S)
        published = time.monotonic()

        # Whoever is still short after 20 s shows up in the comparison below.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(f.caught_up.wait() for f in followers)), 20)
        caught_up = time.monotonic()
        await asyncio.sleep(0.5)  # a late duplicate would arrive now
    finally:
        stop.set()
        ended = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
        await redis.aclose()
    assert [e for e in ended if e is not None] == []

    moved = [f for f in followers if f.first_node == node_a]
    stayed = [f for f in followers if f.first_node == node_b]
    print(
        f"\n{len(followers)} clients ({len(moved)} on the killed node) connected in "
        f"{connected - started:.1f} s; {ROUNDS} rounds in {published - connected:.1f} s, "
        f"node killed after {killed - connected:.1f} s; caught up "
        f"{caught_up - published:.2f} s after the last publish; "
        f"{sum(len(f.drops) for f in moved)} connections lost, "
        f"{sum(len(f.refusals) for f in followers)} attempts failed, "
        f"{sum(f.unavailable for f in followers)} subscriptions answered unavailable"
    )
    assert [f.problems for f in followers if f.problems] == []
    # Everyone on the killed node noticed, came back through nginx on the other
    # node, and every resubscription recovered; nobody on the survivor noticed.
    assert all(f.drops for f in moved)
    assert Counter(f.last_node for f in moved) == {node_b: len(moved)}
    assert all(len(f.resubscribed) >= len(CHANNELS) and all(f.resubscribed) for f in moved), [
        f.resubscribed for f in moved if not all(f.resubscribed)
    ][:5]
    assert all(not f.drops and len(f.upstreams) == 1 for f in stayed)

    wrong = [
        f"client {f.index} ({'moved' if f in moved else 'stayed'}) {channel}: {problem}"
        for f in followers
        for channel in CHANNELS
        if (problem := compare(f.received[channel], producer.published[(f.church, channel)]))
    ]
    assert wrong == [], f"{len(wrong)} wrong streams, e.g. {wrong[:5]}"
    assert time.monotonic() - started < 60


@pytest.mark.anyio
async def test_sse_through_nginx_is_not_buffered(
    stack: Stack, cluster: Cluster, churches: list[Church]
) -> None:
    church = churches[0]
    redis = aredis.Redis.from_url(stack.env["REDIS_URL"])
    producer = Producer(EventPublisher(redis), [church.id], 5)
    latencies: list[float] = []
    try:
        async with (
            httpx.AsyncClient(timeout=10) as client,
            client.stream(
                "GET",
                f"{cluster.http_url}/v1/events",
                params={"channel": "inbox"},
                headers={"Authorization": f"Bearer {church.key}"},
            ) as stream,
        ):
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            lines = stream.aiter_lines()

            async def line_with(text: str) -> None:
                async for line in lines:
                    if text in line:
                        return
                raise AssertionError(f"stream ended before {text!r}")

            await asyncio.wait_for(line_with("event: ready"), 5)
            for seq in range(1, 6):
                (channel, event), _ = producer.events(seq)
                sent = time.monotonic()
                await producer.publisher.publish(uuid.UUID(church.id), channel, event)
                # Buffered by nginx, a small event would wait for more data.
                await asyncio.wait_for(line_with(event.id), 2)
                latencies.append(time.monotonic() - sent)
                await asyncio.sleep(0.1)
    finally:
        await redis.aclose()
    assert max(latencies) < 0.5, latencies
