"""Live operating figures for owners: ``GET /v1/operations/stats`` (the ``/operations``
page polls it every 2 s and draws them).

Two groups, each labelled with its scope, because they do not come from the same
place:

- **deployment**: every node, worker and scheduler together, read from the shared
  stores: queue depth and the age of the oldest queued entry, dead letters and the
  provider circuit (Redis, ``storage/redis/queue.py``), and the provider receipts of
  the last minute: texts sent, texts finalized (delivered or not), texts received
  (Postgres ``provider_event``, one bounded index range scan). Read at most once a
  second per process, however many owners watch.
- **node**: this web process only (its hostname and pid say which): API requests a
  second, p95 latency and the share of 5xx answers over about the last minute, and
  the WebSocket and SSE clients connected to it now, from the process's own
  Prometheus metrics (``services.metrics``). With metrics off on the node they are
  null (``metrics: false``). Rates come from a small ring of snapshots of the
  counters, taken when the figures are asked for: the first answer has no window yet.

Nothing here names a church: the figures are the deployment's or the node's, the
same for every owner who asks. API keys act as admins, never as owners, so the
operation is for signed-in owners only.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import time
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal, TypeVar

import msgspec
from prometheus_client import Counter, Gauge, Histogram
from starlette.requests import Request
from starlette.responses import Response

from api.listing import services_of
from api.operation import Operation
from storage.pg.provider_events import recent_provider_events
from storage.process.metrics import Metrics
from storage.process.services import Services
from storage.redis.queue import queue_backlog
from storage.redis.send_limits import account_id, circuit_snapshot
from storage.responses import ok

log = logging.getLogger("koinonia.api.operations")

WINDOW_S = 60
"""The rates are over the last minute."""
DEPLOYMENT_TTL_S = 1.0
"""Deployment figures are read from the stores at most this often per process."""
STORE_TIMEOUT_S = 2.0
SNAPSHOT_EVERY_S = 1.0
"""The node keeps at most one counter snapshot a second (about 60 in the ring)."""
MIN_WINDOW_S = 0.5
QUANTILE = 0.95
EXCLUDED_ROUTES = ("/health",)
"""Probes are left out of the API figures, as the alerts leave them out."""

HOSTNAME = socket.gethostname()

T = TypeVar("T")


class DeploymentStats(msgspec.Struct, frozen=True, kw_only=True):
    """The whole deployment's figures, from Redis and Postgres. A store that did not
    answer within 2 s is named in ``unavailable`` and its figures are null."""

    scope: Literal["deployment"] = "deployment"
    source: str = "Redis and Postgres, shared by every node"
    queue_depth: int | None
    """Queue entries not finished: send (in flight included, delayed retries not;
    over the up to 500 churches waiting longest) plus materialize."""
    send_queue: int | None
    materialize_queue: int | None
    oldest_age_s: float | None
    """Age of the oldest unfinished queue entry, send or materialize (0 when none)."""
    dead_letters: int | None
    """Entries in the dead-letter stream."""
    provider_circuit: str | None
    """``closed``, ``half_open`` or ``open``."""
    window_s: int = WINDOW_S
    sent_per_s: float | None
    """``message.sent`` provider receipts a second over ``window_s``: texts sent."""
    finalized_per_s: float | None
    """``message.finalized`` provider receipts a second: texts delivered, undelivered
    or failed at the carrier (the receipt that ends a text)."""
    received_per_s: float | None
    """Inbound texts a second."""
    unavailable: list[str] = []
    """``redis``, ``postgres``: the stores whose figures are missing."""


class NodeStats(msgspec.Struct, frozen=True, kw_only=True):
    """This web process's own figures (another node answers its own)."""

    scope: Literal["node"] = "node"
    hostname: str
    pid: int
    metrics: bool
    """False: metrics are off on this node (``KOINONIA_WEB_METRICS_PORT=off``) and
    every figure below is null."""
    window_s: float | None
    """The span the rates cover (up to 60 s; null until a second answer)."""
    requests_per_s: float | None
    """API requests answered a second (``/health*`` left out)."""
    p95_ms: float | None
    """95th percentile of the time to answer them (event streams left out); null
    without requests in the window."""
    error_rate: float | None
    """Share of those answers that were 5xx (0 to 1)."""
    websocket_clients: int | None
    sse_clients: int | None


class OperationsStats(msgspec.Struct, frozen=True):
    at: datetime
    deployment: DeploymentStats
    node: NodeStats


# -- the node: snapshots of this process's counters --------------------------------------


@dataclass(frozen=True)
class Snapshot:
    at: float
    """``time.monotonic()``"""
    requests: float
    errors: float
    buckets: tuple[tuple[float, float], ...]
    """(upper bound, cumulative count) of the latency histogram, summed over routes."""


def snapshot(metrics: Metrics, at: float) -> Snapshot:
    return Snapshot(
        at=at,
        requests=_requests(metrics.http_requests, errors=False),
        errors=_requests(metrics.http_requests, errors=True),
        buckets=_buckets(metrics.http_duration),
    )


def _counted(route: str) -> bool:
    return not route.startswith(EXCLUDED_ROUTES)


def _requests(counter: Counter, *, errors: bool) -> float:
    total = 0.0
    for family in counter.collect():
        for sample in family.samples:
            if not sample.name.endswith("_total") or not _counted(sample.labels["route"]):
                continue
            if not errors or sample.labels["status"].startswith("5"):
                total += sample.value
    return total


def _buckets(histogram: Histogram) -> tuple[tuple[float, float], ...]:
    summed: dict[float, float] = {}
    for family in histogram.collect():
        for sample in family.samples:
            if sample.name.endswith("_bucket") and _counted(sample.labels["route"]):
                bound = float(sample.labels["le"])
                summed[bound] = summed.get(bound, 0.0) + sample.value
    return tuple(sorted(summed.items()))


def quantile(q: float, start: Snapshot, end: Snapshot) -> float | None:
    """The ``q`` quantile (seconds) of the observations between two snapshots, as
    Prometheus's ``histogram_quantile`` interpolates it; None without observations."""
    before = dict(start.buckets)
    deltas = [(bound, max(0.0, count - before.get(bound, 0.0))) for bound, count in end.buckets]
    total = deltas[-1][1] if deltas else 0.0
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for bound, count in deltas:
        if count >= rank:
            if math.isinf(bound):
                return lower  # past the last finite bucket: its bound is all we know
            if count <= below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


def _gauge(gauge: Gauge) -> dict[str, int]:
    values: dict[str, int] = {}
    for family in gauge.collect():
        for sample in family.samples:
            transport = sample.labels.get("transport", "")
            values[transport] = values.get(transport, 0) + int(sample.value)
    return values


@dataclass
class NodeRing:
    """Snapshots of the last minute; a rate is the change from the oldest to now."""

    snapshots: deque[Snapshot] = field(default_factory=deque)

    def figures(self, metrics: Metrics, now: float) -> NodeStats:
        current = snapshot(metrics, now)
        ring = self.snapshots
        while ring and ring[0].at < now - WINDOW_S:
            ring.popleft()
        start = ring[0] if ring else None
        if not ring or now - ring[-1].at >= SNAPSHOT_EVERY_S:
            ring.append(current)
        clients = _gauge(metrics.realtime_connections)
        window = now - start.at if start is not None else 0.0
        rate = error_rate = p95 = None
        if start is not None and window >= MIN_WINDOW_S:
            requests = max(0.0, current.requests - start.requests)
            rate = round(requests / window, 3)
            if requests > 0:
                error_rate = round(max(0.0, current.errors - start.errors) / requests, 5)
            seconds = quantile(QUANTILE, start, current)
            p95 = round(seconds * 1000, 2) if seconds is not None else None
        return NodeStats(
            hostname=HOSTNAME,
            pid=os.getpid(),
            metrics=True,
            window_s=round(window, 2) if rate is not None else None,
            requests_per_s=rate,
            p95_ms=p95,
            error_rate=error_rate,
            websocket_clients=clients.get("websocket", 0),
            sse_clients=clients.get("sse", 0),
        )


def metrics_off() -> NodeStats:
    return NodeStats(
        hostname=HOSTNAME,
        pid=os.getpid(),
        metrics=False,
        window_s=None,
        requests_per_s=None,
        p95_ms=None,
        error_rate=None,
        websocket_clients=None,
        sse_clients=None,
    )


# -- the deployment: Redis and Postgres -------------------------------------------------


class _Queue(msgspec.Struct, frozen=True):
    send: int
    materialize: int
    oldest_age_s: float
    dead_letters: int
    circuit: str


async def _queue(services: Services) -> _Queue:
    redis = services.redis
    backlog = await queue_backlog(redis, services.settings.delivery.shards)
    circuit = await circuit_snapshot(redis, account_id(services.settings.provider))
    return _Queue(
        send=sum(backlog.send),
        materialize=backlog.materialize,
        oldest_age_s=round(max(backlog.send_oldest_age_s, backlog.materialize_oldest_age_s), 3),
        dead_letters=backlog.dead_letters,
        circuit=str(circuit.get("state", "closed")),
    )


async def _receipts(services: Services) -> dict[str, int]:
    async with services.pool.connection(timeout=STORE_TIMEOUT_S) as conn:
        return await recent_provider_events(conn, WINDOW_S)


async def _timed(name: str, work: Awaitable[T]) -> T | None:
    try:
        async with asyncio.timeout(STORE_TIMEOUT_S):
            return await work
    except Exception as exc:
        log.warning("operations figures unavailable", extra={"store": name, "error": repr(exc)})
        return None


async def deployment_stats(services: Services) -> DeploymentStats:
    queue, receipts = await asyncio.gather(
        _timed("redis", _queue(services)), _timed("postgres", _receipts(services))
    )

    def per_s(event_type: str) -> float | None:
        if receipts is None:
            return None
        return round(receipts.get(event_type, 0) / WINDOW_S, 3)

    return DeploymentStats(
        queue_depth=queue.send + queue.materialize if queue else None,
        send_queue=queue.send if queue else None,
        materialize_queue=queue.materialize if queue else None,
        oldest_age_s=queue.oldest_age_s if queue else None,
        dead_letters=queue.dead_letters if queue else None,
        provider_circuit=queue.circuit if queue else None,
        sent_per_s=per_s("message.sent"),
        finalized_per_s=per_s("message.finalized"),
        received_per_s=per_s("message.received"),
        unavailable=[
            name for name, got in (("redis", queue), ("postgres", receipts)) if got is None
        ],
    )


@dataclass
class StatsState:
    """What one process keeps between answers: the node's ring and the last
    deployment figures (shared by every owner who asks within a second)."""

    ring: NodeRing = field(default_factory=NodeRing)
    deployment: tuple[float, DeploymentStats] | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def deployment_figures(self, services: Services, now: float) -> DeploymentStats:
        async with self.lock:
            if self.deployment is None or now - self.deployment[0] >= DEPLOYMENT_TTL_S:
                self.deployment = (time.monotonic(), await deployment_stats(services))
            return self.deployment[1]


def _state(request: Request) -> StatsState:
    state = request.app.state
    found: StatsState | None = getattr(state, "operations_stats", None)
    if found is None:
        found = state.operations_stats = StatsState()
    return found


async def show_stats(request: Request) -> Response:
    services = services_of(request)
    state = _state(request)
    now = time.monotonic()
    metrics = services.metrics
    node = state.ring.figures(metrics, now) if metrics is not None else metrics_off()
    deployment = await state.deployment_figures(services, now)
    return ok(OperationsStats(at=datetime.now(UTC), deployment=deployment, node=node))


def operations_stats_operations() -> list[Operation]:
    return [
        Operation(
            "GET",
            "/v1/operations/stats",
            show_stats,
            "operations.stats",
            "Live operating figures: the deployment's queues and sends, this node's API "
            "latency, errors and connected clients",
            "operations",
            role="owner",
            session_only=True,
            response=OperationsStats,
            description="Deployment figures (`deployment`) are the same on every node: "
            "queue depth and oldest age, dead letters and the provider circuit from "
            "Redis, and the provider receipts of the last minute from Postgres. Node "
            "figures (`node`) are the answering web process's own (its `hostname` and "
            "`pid`), from its Prometheus metrics over about the last minute; null with "
            "metrics off on the node. No figure names a church. Signed-in owners only: "
            "API keys act as admins.",
        ),
    ]
