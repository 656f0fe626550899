"""``GET /v1/operations/stats``: the owners' live operating figures.

Against the real stack: who may read them, that they are labelled by scope, that
they move with real traffic, and that nothing in them belongs to a church. The
node's rate arithmetic (ring of snapshots, histogram quantile) is checked
in-process on a registry of its own.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import msgspec
import pytest

from api.operations_stats import (
    MIN_WINDOW_S,
    NodeRing,
    NodeStats,
    OperationsStats,
    metrics_off,
    quantile,
    snapshot,
)
from deploy.stack import Stack
from storage.process.metrics import Metrics
from tests.api.staff_support import error_of, join
from tests.conftest import Church, unique_phone, wait_until

PATH = "/v1/operations/stats"
UUID = re.compile(r"[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}", re.I)


def stats(client: httpx.Client) -> dict[str, Any]:
    answer = client.get(PATH)
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    assert body["success"] is True
    # The answer is exactly the documented type (no stray fields).
    msgspec.convert(body["data"], OperationsStats, strict=False)
    data: dict[str, Any] = body["data"]
    return data


@pytest.fixture(scope="module")
def owner(base_url: str) -> Iterator[Church]:
    church = Church(base_url)
    yield church
    church.close()


def test_an_owner_reads_both_scopes(owner: Church) -> None:
    data = stats(owner.session)
    deployment, node = data["deployment"], data["node"]
    assert deployment["scope"] == "deployment"
    assert node["scope"] == "node"
    assert deployment["unavailable"] == []
    assert deployment["window_s"] == 60
    for name in ("queue_depth", "send_queue", "materialize_queue", "dead_letters"):
        assert isinstance(deployment[name], int), name
        assert deployment[name] >= 0, name
    assert deployment["queue_depth"] == deployment["send_queue"] + deployment["materialize_queue"]
    assert deployment["oldest_age_s"] >= 0
    assert deployment["provider_circuit"] in ("closed", "half_open", "open")
    for name in ("sent_per_s", "finalized_per_s", "received_per_s"):
        assert deployment[name] >= 0, name
    assert node["hostname"]
    assert isinstance(node["pid"], int)
    if node["metrics"]:
        assert node["websocket_clients"] >= 0
        assert node["sse_clients"] >= 0
    else:
        figures = ("requests_per_s", "p95_ms", "error_rate", "websocket_clients", "sse_clients")
        assert [node[name] for name in figures] == [None] * len(figures)


def test_only_signed_in_owners(owner: Church, stack: Stack, base_url: str) -> None:
    # API keys act as admins, never as owners: refused whatever their scopes.
    assert error_of(owner.api.get(PATH)) == (403, "forbidden")
    staff, _ = join(owner, stack, base_url, "staff")
    admin, _ = join(owner, stack, base_url, "admin")
    second_owner, _ = join(owner, stack, base_url, "owner")
    try:
        for below in (staff, admin):
            assert error_of(below.get(PATH)) == (403, "forbidden")
        stats(second_owner)
    finally:
        for client in (staff, admin, second_owner):
            client.close()
    assert error_of(httpx.get(owner.session.base_url.join(PATH))) == (401, "unauthorized")


def test_figures_move_with_traffic_and_name_no_church(
    owner: Church, other_church: Church, stack: Stack
) -> None:
    """Another church's broadcast shows in the deployment's figures (they are
    everyone's), yet nothing in the answer identifies it, or any church."""
    group = other_church.group("Ushers")
    phones = [unique_phone() for _ in range(3)]
    members = [other_church.member(phone, [group]) for phone in phones]
    message = other_church.broadcast(group, "Ushers meet at 9")
    done = other_church.counts_when(message, lambda c: c["delivered"] == 3)
    assert done["delivered"] == 3, done

    def sent_seen() -> bool:
        return float(stats(owner.session)["deployment"]["sent_per_s"]) > 0

    wait_until(sent_seen, 10, "the sends of the last minute")
    answer = owner.session.get(PATH)
    data = answer.json()["data"]
    assert data["deployment"]["finalized_per_s"] > 0
    text = msgspec.json.encode(data).decode()
    secrets = [
        other_church.id,
        other_church.phone_number,
        other_church.email,
        other_church.user_id,
        owner.id,
        owner.phone_number,
        owner.email,
        message,
        group,
        *members,
        *phones,
        "Grace Chapel",
        "Ushers",
    ]
    for secret in secrets:
        assert secret not in text, secret
    assert not UUID.search(text), text
    # Both churches' owners read the same kind of figures: the deployment's.
    theirs = stats(other_church.session)
    assert set(theirs["deployment"]) == set(data["deployment"])
    assert set(theirs["node"]) == set(data["node"])


def test_this_nodes_requests_and_clients(owner: Church, base_url: str) -> None:
    first = stats(owner.session)["node"]
    # The suite's stack serves metrics on every process (tests/conftest.py).
    assert first["metrics"], "metrics are off on the test stack's web node"
    with httpx.Client(base_url=base_url, timeout=10.0) as events:
        headers = {"Authorization": f"Bearer {owner.key}"}
        with events.stream("GET", "/v1/events?channel=dashboard", headers=headers) as stream:
            assert stream.status_code == 200
            for _ in range(5):
                owner.api.get("/v1/church")
            time.sleep(MIN_WINDOW_S + 0.6)
            node = stats(owner.session)["node"]
    assert node["sse_clients"] >= 1
    assert node["window_s"] is not None
    assert node["window_s"] >= MIN_WINDOW_S
    assert node["requests_per_s"] > 0
    assert node["p95_ms"] is not None
    assert node["p95_ms"] > 0
    assert 0 <= node["error_rate"] <= 1


# -- the node's arithmetic, in-process ------------------------------------------------


def answered(metrics: Metrics, route: str, method: str, status: int, seconds: float | None) -> None:
    """One request as the middleware counts it (``seconds`` None: an event stream)."""
    metrics.http_requests.labels(route, method, str(status)).inc()
    if seconds is not None:
        metrics.http_duration.labels(route, method).observe(seconds)


def test_rates_and_p95_over_the_window() -> None:
    metrics = Metrics.create("web")
    ring = NodeRing()
    first = ring.figures(metrics, 100.0)
    assert (first.requests_per_s, first.p95_ms, first.error_rate) == (None, None, None)
    assert first.metrics is True
    assert (first.websocket_clients, first.sse_clients) == (0, 0)

    for _ in range(90):
        answered(metrics, "/v1/members", "GET", 200, 0.004)  # bucket le=0.005
    for _ in range(8):
        answered(metrics, "/v1/messages", "POST", 202, 0.15)  # bucket le=0.2
    for _ in range(2):
        answered(metrics, "/v1/messages", "POST", 503, 0.4)  # bucket le=0.5
    for _ in range(50):
        answered(metrics, "/health/live", "GET", 200, 3.0)  # probes: left out
    answered(metrics, "/v1/events", "GET", 200, None)  # a stream: counted, not timed
    metrics.realtime_connections.labels("websocket").inc(3)
    metrics.realtime_connections.labels("sse").inc()

    later = ring.figures(metrics, 110.0)
    assert later.window_s == 10.0
    assert later.requests_per_s == pytest.approx(101 / 10)
    assert later.error_rate == pytest.approx(2 / 101, abs=1e-5)
    # 100 timed: rank 95 falls in (0.1, 0.2] between 90 and 98 -> 0.1 + 0.1 * 5/8.
    assert later.p95_ms == pytest.approx(162.5)
    assert (later.websocket_clients, later.sse_clients) == (3, 1)

    # Over a minute later every snapshot has left the window: no rate until the next.
    assert ring.figures(metrics, 175.0).requests_per_s is None
    quiet = ring.figures(metrics, 177.0)
    assert quiet.window_s == 2.0
    assert quiet.requests_per_s == 0
    assert quiet.p95_ms is None
    assert quiet.error_rate is None


def test_quantile_edges() -> None:
    metrics = Metrics.create("web")
    start = snapshot(metrics, 0.0)
    assert quantile(0.95, start, snapshot(metrics, 1.0)) is None
    for _ in range(10):
        answered(metrics, "/v1/members", "GET", 200, 60.0)  # past the last bucket
    assert quantile(0.95, start, snapshot(metrics, 2.0)) == 10.0


def test_metrics_off_answers_nulls() -> None:
    off = metrics_off()
    assert isinstance(off, NodeStats)
    assert off.metrics is False
    assert off.scope == "node"
    assert [
        off.window_s,
        off.requests_per_s,
        off.p95_ms,
        off.error_rate,
        off.websocket_clients,
        off.sse_clients,
    ] == [None] * 6
