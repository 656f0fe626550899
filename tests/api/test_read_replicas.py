"""Read replicas through the API: web nodes with ``DATABASE_REPLICA_URLS`` set.

Two web nodes read from the session's replica (tests/replica_support.py) with a
fast health poll, nginx in front of them: ``a`` with a lag limit of 5 s (a test
that pauses replay has time to look before the replica is skipped for lagging),
``b`` with 200 ms. Where a read ran is told by the replica's and the
primary's own statistics, or by a node's ``koinonia_db_queries_total{target}``.

Tests that pause replay or kill the replica put it back as they found it.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
import redis

from deploy.nginx import Nginx, NginxError, find_nginx
from deploy.stack import Stack, free_ports
from storage.redis import key_names
from tests.conftest import MONITORING, Church, unique_phone
from tests.replica_support import Replicas

POLL_S = "0.05"
UPSTREAM = "X-Upstream"


class Node:
    def __init__(self, name: str, port: int, metrics: str) -> None:
        self.name = name
        self.url = f"http://127.0.0.1:{port}"
        self.address = f"127.0.0.1:{port}"
        self.metrics = metrics

    def client(self, church: Church) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, timeout=10.0, headers={"Authorization": f"Bearer {church.key}"}
        )

    def queries(self, target: str) -> float:
        """Statements this node has sent to ``target`` (``primary``, ``replica``)."""
        return self.sample(f'koinonia_db_queries_total{{target="{target}"}}') or 0.0

    def sample(self, series: str) -> float | None:
        text = httpx.get(f"http://{self.metrics}/metrics", headers=MONITORING, timeout=5).text
        found = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
        return float(found.group(1)) if found else None


class Nodes:
    def __init__(self, a: Node, b: Node, nginx: Nginx) -> None:
        self.a, self.b = a, b
        self.nginx = nginx
        self.url = f"http://127.0.0.1:{nginx.port}"


@pytest.fixture(scope="module")
def nodes(
    stack: Stack, pg_replicas: Replicas, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Nodes]:
    if find_nginx() is None:
        raise NginxError(
            "nginx is not installed: the read-your-writes test runs Debian's nginx in front "
            "of two web nodes (apt-get install nginx; .ci/run does this)"
        )
    ports = free_ports(3)
    limits = {"a": "5000", "b": "200"}
    names = {key: f"replica_web_{key}" for key in limits}
    try:
        for (key, limit), port in zip(limits.items(), ports, strict=False):
            env = {
                **stack.env,
                "DATABASE_REPLICA_URLS": pg_replicas.url,
                "KOINONIA_REPLICA_POLL_S": POLL_S,
                "KOINONIA_REPLICA_MAX_LAG_MS": limit,
                "KOINONIA_HTTP_PORT": str(port),
                "KOINONIA_WEB_METRICS_PORT": "0",
            }
            stack.spawn(names[key], "web", env=env)
        for port in ports[:2]:
            stack.wait_ready(f"http://127.0.0.1:{port}/health/ready")
        metrics = stack.learn_metrics(time.monotonic() + 30)
        a, b = (
            Node(names[key], port, metrics[names[key]])
            for key, port in zip(limits, ports, strict=False)
        )
        nginx = Nginx(
            Path(tmp_path_factory.mktemp("replica_nginx")),
            [a.address, b.address],
            ports[2],
            upstream_header=UPSTREAM,
        )
        nginx.start()
        try:
            yield Nodes(a, b, nginx)
        finally:
            nginx.stop()
    finally:
        for name in names.values():
            stack.stop_process(name)


@pytest.fixture
def replica(pg_replicas: Replicas) -> Iterator[Replicas]:
    """The session's replica, put back running, replaying and caught up."""
    yield pg_replicas
    try:
        pg_replicas.resume_replay()
    except Exception:
        pg_replicas.start()
    pg_replicas.wait_caught_up()


def caught_up(replica: Replicas, nodes: Nodes, church: Church) -> None:
    """The replica has everything, and both nodes read the church's lists from it
    (a node starts watching its replicas at its first stale-tolerant read)."""
    replica.wait_caught_up()
    for node in (nodes.a, nodes.b):
        with node.client(church) as client:
            before = node.queries("replica")
            deadline = time.monotonic() + 10
            while node.queries("replica") == before:
                assert time.monotonic() < deadline, f"{node.name} never read the replica"
                member_ids(client)
                time.sleep(float(POLL_S))


def member_ids(client: httpx.Client) -> set[str]:
    answer = client.get("/v1/members", params={"limit": 100})
    assert answer.status_code == 200, answer.text
    return {m["id"] for m in answer.json()["data"]}


@pytest.mark.slow
def test_list_reads_under_traffic_go_to_the_replica(
    nodes: Nodes, replica: Replicas, church: Church
) -> None:
    for _ in range(5):
        church.member(unique_phone())
    caught_up(replica, nodes, church)
    client = nodes.a.client(church)
    stop = threading.Event()
    answers: list[int] = []

    def traffic() -> None:
        while not stop.is_set():
            answers.append(client.get("/v1/members").status_code)

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        # Counters are published by each backend at most once a second: compare two
        # readings taken while the traffic runs.
        time.sleep(1.5)
        before = (replica.stats(), replica.primary_stats())
        time.sleep(3.0)
        after = (replica.stats(), replica.primary_stats())
    finally:
        stop.set()
        worker.join()
        client.close()
    assert set(answers) == {200}
    on_replica = after[0]["scans:member"] - before[0]["scans:member"]
    on_primary = after[1]["scans:member"] - before[1]["scans:member"]
    assert on_replica >= 50, (on_replica, on_primary, len(answers))
    assert on_replica / (on_replica + on_primary) >= 0.8, (on_replica, on_primary)


def test_a_write_is_read_back_on_the_other_node_while_replay_is_paused(
    nodes: Nodes, replica: Replicas, church: Church, other_church: Church
) -> None:
    caught_up(replica, nodes, church)
    replica.pause_replay()
    with httpx.Client(
        base_url=nodes.url, timeout=10.0, headers={"Authorization": f"Bearer {church.key}"}
    ) as through_nginx:
        # A template logs no event: only the node's own record of the write (the
        # guard's) can send the other node's read to the primary.
        answer = through_nginx.post("/v1/templates", json={"name": "Welcome", "body": "Hi"})
        assert answer.status_code == 201, answer.text
        written_by = answer.headers[UPSTREAM].rsplit(",", 1)[-1].strip()
        template = answer.json()["data"]["id"]
        served: set[str] = set()
        for _ in range(6):
            listed = through_nginx.get("/v1/templates", params={"limit": 100})
            assert listed.status_code == 200, listed.text
            assert template in {t["id"] for t in listed.json()["data"]}
            served.add(listed.headers[UPSTREAM].rsplit(",", 1)[-1].strip())
    assert served - {written_by}, f"every read went to {written_by}, the writer"
    # The replica has not replayed the write: it was never asked.
    with psycopg.connect(replica.url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM message_template WHERE id = %s", (template,)
        ).fetchone()
    assert row == (0,)


def test_read_your_writes_on_one_node_while_other_churches_keep_the_replica(
    nodes: Nodes, replica: Replicas, church: Church, other_church: Church
) -> None:
    mine, theirs = nodes.a.client(church), nodes.a.client(other_church)
    try:
        caught_up(replica, nodes, church)
        lag = nodes.a.sample('koinonia_db_replica_lag_seconds{replica="replica-1"}')
        assert lag is not None
        assert lag < 1.0
        replica.pause_replay()
        answer = mine.post("/v1/templates", json={"name": "Welcome", "body": "Hi"})
        assert answer.status_code == 201, answer.text
        time.sleep(4 * float(POLL_S))
        before = nodes.a.queries("replica")
        listed = mine.get("/v1/templates", params={"limit": 100})
        assert answer.json()["data"]["id"] in {t["id"] for t in listed.json()["data"]}
        assert nodes.a.queries("replica") == before, "the writer's church read the replica"
        member_ids(theirs)
        assert nodes.a.queries("replica") > before, "another church's read left the replica"
    finally:
        mine.close()
        theirs.close()


def completed(store: redis.Redis, history: str) -> bool:
    """``message.completed`` is in the message channel's history (it was published)."""
    entries: list[tuple[bytes, dict[bytes, bytes]]] = store.xrange(history)  # type: ignore[assignment]
    return any(fields.get(b"t") == b"message.completed" for _, fields in entries)


def test_a_workers_write_is_read_back_once_its_event_is_out(
    nodes: Nodes, replica: Replicas, church: Church, stack: Stack
) -> None:
    """The worker's and the receipts' writes reach no API request's guard: the relay
    records the church's position in the round trip that publishes their events."""
    group = church.group()
    church.member(unique_phone(), [group])
    caught_up(replica, nodes, church)
    replica.pause_replay()
    message_id = church.broadcast(group)
    history = key_names.channel_history(uuid.UUID(church.id), f"message:{message_id}")
    store = redis.Redis.from_url(stack.env["REDIS_URL"])
    client = nodes.a.client(church)
    try:
        deadline = time.monotonic() + 20
        while not completed(store, history):
            assert time.monotonic() < deadline, "the broadcast did not complete in 20 s"
            time.sleep(0.01)
        # The replica has replayed none of it: whatever serves this read has it all.
        shown = client.get(f"/v1/messages/{message_id}")
        assert shown.status_code == 200, shown.text
        assert shown.json()["data"]["status"] == "completed"
    finally:
        client.close()
        store.close()


@pytest.mark.slow
def test_a_replica_lagging_beyond_the_limit_is_skipped(
    nodes: Nodes, replica: Replicas, church: Church, other_church: Church
) -> None:
    writer, reader = nodes.b.client(church), nodes.b.client(other_church)
    try:
        caught_up(replica, nodes, church)
        before = nodes.b.queries("replica")
        member_ids(reader)
        assert nodes.b.queries("replica") > before
        replica.pause_replay()
        # Another church's write moves the primary on; the replica stays behind.
        assert writer.post("/v1/groups", json={"name": "Deacons"}).status_code == 201
        time.sleep(0.2 + 6 * float(POLL_S))
        before = nodes.b.queries("replica")
        for _ in range(5):
            member_ids(reader)
        assert nodes.b.queries("replica") == before, "a replica past the lag limit was read"
        replica.resume_replay()
        deadline = time.monotonic() + 10
        while nodes.b.queries("replica") == before:
            assert time.monotonic() < deadline, "the caught-up replica was not used again"
            member_ids(reader)
            time.sleep(0.05)
    finally:
        writer.close()
        reader.close()


@pytest.mark.slow
def test_a_killed_replica_is_skipped_then_used_again_after_restart(
    nodes: Nodes, replica: Replicas, church: Church
) -> None:
    client = nodes.a.client(church)
    try:
        caught_up(replica, nodes, church)
        replica.kill()
        for _ in range(10):
            member_ids(client)
        stopped = nodes.a.queries("replica")
        for _ in range(5):
            member_ids(client)
        assert nodes.a.queries("replica") == stopped, "a dead replica was read"
        replica.start()
        restarted = time.monotonic()
        while nodes.a.queries("replica") == stopped:
            assert time.monotonic() - restarted < 10, "not used again within 10 s"
            member_ids(client)
            time.sleep(0.05)
    finally:
        client.close()
