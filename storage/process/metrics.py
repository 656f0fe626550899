"""Prometheus metrics: one ``Metrics`` object per process, and its ``/metrics`` server.

Web, worker and scheduler each serve Prometheus text at ``GET /metrics`` on a port
of their own (``KOINONIA_{WEB,WORKER,SCHEDULER}_METRICS_PORT``, docs/operations.md
"Metrics"). A port set to ``off`` turns the server off and the instrumentation with
it: no ``Metrics`` object exists (``services.metrics`` is None) and every
instrumentation site tests ``if (m := services.metrics) is not None``.

- **Hot paths** (a request, a send, an event written to a client) touch children
  bound to their labels once, at start-up or on first use (``.labels()`` is never
  called per event or per recipient).
- **Gauges of live state** (the pool, queue backlogs, the circuit, whether the
  stores answer, cache counters) are refreshed by the process's ``Sampler`` every
  ``KOINONIA_METRICS_SAMPLE_S``, never per request.
- **Several web workers** (``koinonia web --workers N``) run in prometheus_client's
  multiprocess mode: each worker's values live in files under
  ``PROMETHEUS_MULTIPROC_DIR`` (the command makes and removes it), and the parent
  serves them all, summed, on the one port. Gauges say how they combine.

The server is a small HTTP server on a thread of its own (``MetricsServer``), so a
scrape never waits for the event loop and works in uvicorn's supervisor too.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import hmac
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client import multiprocess as _multiprocess
from prometheus_client.registry import Collector

from storage.process.settings import Settings, metrics_port, metrics_port_variable

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from storage.pg.database import Pool
    from storage.redis.cache import Cache
    from storage.redis.connection import Redis

log = logging.getLogger("koinonia.metrics")

prometheus_multiprocess: Any = _multiprocess
"""prometheus_client's multiprocess helpers (untyped)."""

# No ``<counter>_created`` series beside every counter and histogram: Prometheus
# does not need them, and they double what every scrape carries.
disable_created_metrics()  # type: ignore[no-untyped-call]

HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
ACCEPT_TO_SENT_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0)
REALTIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
RECEIPT_BUCKETS = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
PROVIDER_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
"""Methods kept as a label value; any other is counted as ``other`` (bounded labels)."""

CIRCUIT_VALUES = {"closed": 0, "half_open": 1, "open": 2}

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

COMMON = (
    "store_up",
    "db_pool_connections",
    "db_pool_waiting",
    "db_pool_waits",
    "db_queries",
    "replica_lag",
    "cache_hits",
    "cache_misses",
)
WEB = (
    "http_requests",
    "http_duration",
    "realtime_connections",
    "realtime_delivered",
    "slow_consumer_closes",
    "recoveries",
    "publish_to_write",
    "receipt_latency",
)
WORKER = (
    "queue_backlog",
    "queue_oldest_age",
    "accept_to_sent",
    "sends",
    "send_retries",
    "dead_letters",
    "dead_letter_backlog",
    "circuit_state",
    "provider_duration",
    "webhook_deliveries",
    "webhook_backlog",
    "webhook_endpoints_disabled",
)
SERIES: dict[str, tuple[str, ...]] = {
    "web": WEB + COMMON,
    "worker": WORKER + COMMON,
    # The scheduler looks receipts up at the provider.
    "scheduler": ("provider_duration", *COMMON),
}
"""What each process type exports from start-up (its ``/metrics`` lists them even
before they move); another process that uses one of the others registers it then."""


class Metrics:
    """Every metric of one process, on its own ``CollectorRegistry``.

    Each metric is created (and registered) on first use; ``create`` makes the ones
    of its process at once. In a multiprocess web worker ``registry`` is that
    worker's own (never served): the parent serves them all, aggregated.
    """

    def __init__(self, process: str, registry: CollectorRegistry) -> None:
        self.process = process
        self.registry = registry
        self._http: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self._realtime: dict[str, RealtimeMetrics] = {}

    @classmethod
    def create(cls, process: str, registry: CollectorRegistry | None = None) -> Metrics:
        if registry is None:
            registry = CollectorRegistry()
            if not os.environ.get(MULTIPROC_ENV):
                # The process itself: CPU, memory, open files, the collector (one
                # process per registry, so not in multiprocess mode).
                for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
                    registry.register(collector)
        metrics = cls(process, registry)
        for name in SERIES.get(process, COMMON):
            getattr(metrics, name)
        metrics._bind_known_labels()
        return metrics

    @classmethod
    def for_process(cls, settings: Settings, process: str) -> Metrics | None:
        """The process's metrics, or None when its port is ``off``."""
        if settings.metrics.port(process) == "off":
            return None
        return cls.create(process)

    def _bind_known_labels(self) -> None:
        """Children of bounded label sets exist from the start, at zero, so a rate
        over them is defined before the first event."""
        known = {**_COMMON_LABELS, **_KNOWN_LABELS.get(self.process, {})}
        for name, values in known.items():
            metric = getattr(self, name)
            for labels in values:
                metric.labels(*labels)

    # -- web -----------------------------------------------------------------------

    @functools.cached_property
    def http_requests(self) -> Counter:
        return Counter(
            "koinonia_http_requests_total",
            "HTTP requests answered, by route template, method and status",
            ("route", "method", "status"),
            registry=self.registry,
        )

    @functools.cached_property
    def http_duration(self) -> Histogram:
        return Histogram(
            "koinonia_http_request_duration_seconds",
            "Time to answer an HTTP request, by route template and method "
            "(event streams excluded: they last as long as the client stays)",
            ("route", "method"),
            buckets=HTTP_BUCKETS,
            registry=self.registry,
        )

    @functools.cached_property
    def realtime_connections(self) -> Gauge:
        return Gauge(
            "koinonia_realtime_connections",
            "Open realtime connections on this node, by transport",
            ("transport",),
            multiprocess_mode="livesum",
            registry=self.registry,
        )

    @functools.cached_property
    def realtime_delivered(self) -> Counter:
        return Counter(
            "koinonia_realtime_events_delivered_total",
            "Live events written to realtime clients (one per event and client), by transport",
            ("transport",),
            registry=self.registry,
        )

    @functools.cached_property
    def slow_consumer_closes(self) -> Counter:
        return Counter(
            "koinonia_realtime_slow_consumer_closes_total",
            "Realtime connections closed because their send queue overflowed",
            registry=self.registry,
        )

    @functools.cached_property
    def recoveries(self) -> Counter:
        return Counter(
            "koinonia_realtime_recoveries_total",
            "Channels resumed from an offset: recovered from history, or reset "
            "(the history no longer reaches back)",
            ("outcome",),
            registry=self.registry,
        )

    @functools.cached_property
    def publish_to_write(self) -> Histogram:
        return Histogram(
            "koinonia_event_publish_to_write_seconds",
            "From an event's publication (its offset's time) to its frame written "
            "to a client on this node (the first client to get it)",
            buckets=REALTIME_BUCKETS,
            registry=self.registry,
        )

    @functools.cached_property
    def receipt_latency(self) -> Histogram:
        return Histogram(
            "koinonia_receipt_latency_seconds",
            "From a text's sent_at (as the provider reports it) to its delivered receipt recorded",
            buckets=RECEIPT_BUCKETS,
            registry=self.registry,
        )

    # -- worker --------------------------------------------------------------------

    @functools.cached_property
    def queue_backlog(self) -> Gauge:
        return Gauge(
            "koinonia_queue_backlog",
            "Queue entries not finished: send (per ready shard, over a sample of its "
            "churches) and materialize (shard -)",
            ("queue", "shard"),
            multiprocess_mode="livemax",
            registry=self.registry,
        )

    @functools.cached_property
    def queue_oldest_age(self) -> Gauge:
        return Gauge(
            "koinonia_queue_oldest_age_seconds",
            "Age of the oldest unfinished queue entry (0 when none)",
            ("queue",),
            multiprocess_mode="livemax",
            registry=self.registry,
        )

    @functools.cached_property
    def accept_to_sent(self) -> Histogram:
        return Histogram(
            "koinonia_accept_to_sent_seconds",
            "From a message's acceptance to the provider accepting one of its texts "
            "(messages sent at once: scheduled and recurring ones wait by design)",
            buckets=ACCEPT_TO_SENT_BUCKETS,
            registry=self.registry,
        )

    @functools.cached_property
    def sends(self) -> Counter:
        return Counter(
            "koinonia_sends_total",
            "Recipients through the send step, by outcome: sent (the provider took it), "
            "failed (final), retried (another attempt scheduled), skipped (not sendable)",
            ("outcome",),
            registry=self.registry,
        )

    @functools.cached_property
    def send_retries(self) -> Counter:
        return Counter(
            "koinonia_send_retries_total",
            "Queue entries scheduled again after a failed attempt (with backoff)",
            registry=self.registry,
        )

    @functools.cached_property
    def dead_letters(self) -> Counter:
        return Counter(
            "koinonia_dead_letters_total",
            "Entries added to the dead-letter stream (recipients out of attempts)",
            registry=self.registry,
        )

    @functools.cached_property
    def dead_letter_backlog(self) -> Gauge:
        return Gauge(
            "koinonia_dead_letter_backlog",
            "Entries in the dead-letter stream",
            multiprocess_mode="livemax",
            registry=self.registry,
        )

    @functools.cached_property
    def circuit_state(self) -> Gauge:
        return Gauge(
            "koinonia_circuit_state",
            "The provider circuit: 0 closed, 1 half-open, 2 open",
            multiprocess_mode="livemax",
            registry=self.registry,
        )

    @functools.cached_property
    def provider_duration(self) -> Histogram:
        return Histogram(
            "koinonia_provider_request_duration_seconds",
            "One provider request, by operation (send, lookup) and outcome "
            "(ok: a 2xx answer; error: any other answer, a timeout, a broken connection)",
            ("operation", "outcome"),
            buckets=PROVIDER_BUCKETS,
            registry=self.registry,
        )

    @functools.cached_property
    def webhook_deliveries(self) -> Counter:
        return Counter(
            "koinonia_webhook_deliveries_total",
            "Outgoing webhook attempts, by outcome: delivered, failed (a retry is due), "
            "gave_up (no retry left, or the endpoint is gone)",
            ("outcome",),
            registry=self.registry,
        )

    @functools.cached_property
    def webhook_backlog(self) -> Gauge:
        return Gauge(
            "koinonia_webhook_backlog",
            "Webhook deliveries due now and not yet attempted (counted up to 100,000)",
            multiprocess_mode="livemax",
            registry=self.registry,
        )

    @functools.cached_property
    def webhook_endpoints_disabled(self) -> Counter:
        return Counter(
            "koinonia_webhook_endpoints_disabled_total",
            "Webhook endpoints disabled for failing",
            registry=self.registry,
        )

    # -- every process -------------------------------------------------------------

    @functools.cached_property
    def store_up(self) -> Gauge:
        return Gauge(
            "koinonia_store_up",
            "1 when the store answered the last check of this process, else 0",
            ("store",),
            multiprocess_mode="livemin",
            registry=self.registry,
        )

    @functools.cached_property
    def db_pool_connections(self) -> Gauge:
        return Gauge(
            "koinonia_db_pool_connections",
            "Postgres pool connections of this process, by state",
            ("state",),
            multiprocess_mode="livesum",
            registry=self.registry,
        )

    @functools.cached_property
    def db_pool_waiting(self) -> Gauge:
        return Gauge(
            "koinonia_db_pool_waiting",
            "Requests waiting for a pooled Postgres connection now",
            multiprocess_mode="livesum",
            registry=self.registry,
        )

    @functools.cached_property
    def db_pool_waits(self) -> Counter:
        return Counter(
            "koinonia_db_pool_waits_total",
            "Requests that had to wait for a pooled Postgres connection",
            registry=self.registry,
        )

    @functools.cached_property
    def db_queries(self) -> Counter:
        return Counter(
            "koinonia_db_queries_total",
            "Statements sent to Postgres, by target",
            ("target",),
            registry=self.registry,
        )

    @functools.cached_property
    def replica_lag(self) -> Gauge:
        return Gauge(
            "koinonia_db_replica_lag_seconds",
            "How long ago the primary was where each read replica has replayed to, as "
            "this process last measured (storage/pg/replicas.py)",
            ("replica",),
            multiprocess_mode="livemax",
            registry=self.registry,
        )

    @functools.cached_property
    def cache_hits(self) -> Counter:
        return Counter(
            "koinonia_cache_hits_total",
            "Cache-aside reads served from Redis",
            registry=self.registry,
        )

    @functools.cached_property
    def cache_misses(self) -> Counter:
        return Counter(
            "koinonia_cache_misses_total",
            "Cache-aside reads that computed the value",
            registry=self.registry,
        )

    # -- helpers for the hot paths -------------------------------------------------

    def http_request(self, route: str, method: str, status: int, seconds: float | None) -> None:
        """Count one answered request (``seconds`` None: not timed, an event stream)."""
        if method not in HTTP_METHODS:
            method = "other"
        key = (route, method, status)
        children = self._http.get(key)
        if children is None:
            children = self._http[key] = (
                self.http_requests.labels(route, method, str(status)),
                self.http_duration.labels(route, method),
            )
        children[0].inc()
        if seconds is not None:
            children[1].observe(seconds)

    def realtime(self, transport: str) -> RealtimeMetrics:
        """The series of one realtime transport (``websocket``, ``sse``), bound once."""
        bound = self._realtime.get(transport)
        if bound is None:
            bound = self._realtime[transport] = RealtimeMetrics(self, transport)
        return bound

    def realtime_bound(self) -> list[RealtimeMetrics]:
        """The transports' series bound so far (the sampler flushes their counts)."""
        return list(self._realtime.values())

    def counted_query(self) -> Callable[[], None]:
        """What the pool's cursors call for each statement (``target="primary"``)."""
        return self.db_queries.labels("primary").inc


class SendMetrics:
    """The worker's send counters, bound to their labels once (delivery/worker.py)."""

    def __init__(self, metrics: Metrics) -> None:
        sends = metrics.sends
        self._sent = sends.labels("sent")
        self._failed = sends.labels("failed")
        self._retried = sends.labels("retried")
        self._skipped = sends.labels("skipped")
        self._retries = metrics.send_retries
        self._dead_letters = metrics.dead_letters
        self._accept_to_sent = metrics.accept_to_sent

    def sent(self, count: int, accepted_at: float | None) -> None:
        """``count`` texts the provider took; ``accepted_at`` (epoch seconds) when their
        message was accepted, None when it is not measured (scheduled, recurring)."""
        self._sent.inc(count)
        if accepted_at is not None:
            took = max(0.0, time.time() - accepted_at)
            observe = self._accept_to_sent.observe
            for _ in range(count):
                observe(took)

    def failed(self, count: int) -> None:
        self._failed.inc(count)

    def skipped(self, count: int) -> None:
        if count:
            self._skipped.inc(count)

    def retried(self, count: int) -> None:
        """``count`` recipients of one entry go back for another attempt."""
        self._retried.inc(count)
        self._retries.inc()

    def dead_lettered(self, count: int) -> None:
        """``count`` recipients out of attempts: failed, and one dead-letter entry."""
        self._failed.inc(count)
        self._dead_letters.inc()


class RealtimeMetrics:
    """One transport's realtime series, bound once (realtime/websocket.py,
    realtime/event_stream.py). Per write burst of a connection: one ``inc``; the
    publish-to-write latency is observed once per event and node (the first
    connection to write it), not once per connection of a fan-out.

    Deliveries are added up in a plain integer and moved to the counter by
    ``flush`` (the sampler, every ``KOINONIA_METRICS_SAMPLE_S``): a counter's
    ``inc`` takes a lock, about 0.4 µs, which is 2-3 % of a fan-out delivery's whole
    CPU cost when every connection writes one event per burst."""

    def __init__(self, metrics: Metrics, transport: str) -> None:
        self.connections = metrics.realtime_connections.labels(transport)
        self._delivered = metrics.realtime_delivered.labels(transport)
        self._pending = 0
        self.slow_consumer_closes = metrics.slow_consumer_closes
        self.recovered = metrics.recoveries.labels("recovered")
        self.reset = metrics.recoveries.labels("reset")
        self._publish_to_write = metrics.publish_to_write
        self._last: object = None

    def written(self, events: int, position: tuple[int, int] | None) -> None:
        """``events`` live events just written to one client; ``position``: the last
        one's offset (milliseconds of its publication, sequence), the very object
        every connection got, or None (none had one, e.g. typing indicators)."""
        self._pending += events
        if position is not None and position is not self._last:
            self._last = position
            self._publish_to_write.observe(max(0.0, time.time() - position[0] / 1000))

    def flush(self) -> None:
        """Move the deliveries counted since the last flush to the counter (on the
        event loop, like ``written``, so no count is lost between the two)."""
        pending, self._pending = self._pending, 0
        if pending:
            self._delivered.inc(pending)

    def resumed(self, recovered: bool) -> None:
        (self.recovered if recovered else self.reset).inc()


Labels = tuple[tuple[str, ...], ...]

_COMMON_LABELS: dict[str, Labels] = {
    "store_up": (("postgres",), ("redis",)),
    "db_pool_connections": (("used",), ("idle",)),
    "db_queries": (("primary",),),
}
_KNOWN_LABELS: dict[str, dict[str, Labels]] = {
    "web": {
        "realtime_connections": (("websocket",), ("sse",)),
        "realtime_delivered": (("websocket",), ("sse",)),
        "recoveries": (("recovered",), ("reset",)),
    },
    "worker": {
        "sends": (("sent",), ("failed",), ("retried",), ("skipped",)),
        "provider_duration": (("send", "ok"), ("send", "error")),
        "webhook_deliveries": (("delivered",), ("failed",), ("gave_up",)),
        "queue_oldest_age": (("send",), ("materialize",)),
    },
    "scheduler": {"provider_duration": (("lookup", "ok"), ("lookup", "error"))},
}


# -- the sampler ------------------------------------------------------------------


class Sampler:
    """Refreshes the gauges of live state every ``KOINONIA_METRICS_SAMPLE_S`` in the
    process that owns them: stores, pool and cache in every process; queue, dead
    letters, circuit and webhook backlog in the worker."""

    def __init__(
        self, metrics: Metrics, settings: Settings, pool: Pool, redis: Redis, cache: Cache
    ) -> None:
        self.metrics = metrics
        self.settings = settings
        self.pool = pool
        self.redis = redis
        self.cache = cache
        self._task: asyncio.Task[None] | None = None
        self._pool_waits = 0
        self._cache_hits = 0
        self._cache_misses = 0
        m = metrics
        self._postgres_up = m.store_up.labels("postgres")
        self._redis_up = m.store_up.labels("redis")
        self._used = m.db_pool_connections.labels("used")
        self._idle = m.db_pool_connections.labels("idle")

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="metrics-sampler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for realtime in self.metrics.realtime_bound():
            realtime.flush()

    async def _run(self) -> None:
        every = max(0.1, self.settings.metrics.sample_s)
        while True:
            try:
                await self.sample()
            except Exception:
                log.warning("metrics sample failed", exc_info=True)
            await asyncio.sleep(every)

    async def sample(self) -> None:
        """One refresh of every gauge this process owns."""
        self._sample_pool()
        self._sample_cache()
        for realtime in self.metrics.realtime_bound():
            realtime.flush()
        checks = [self._check_postgres(), self._check_redis()]
        if self.metrics.process == "worker":
            checks += [self._sample_queues(), self._sample_webhooks()]
        await asyncio.gather(*checks, return_exceptions=True)

    def _sample_pool(self) -> None:
        stats = self.pool.get_stats()
        size, available = stats.get("pool_size", 0), stats.get("pool_available", 0)
        self._used.set(max(0, size - available))
        self._idle.set(available)
        self.metrics.db_pool_waiting.set(stats.get("requests_waiting", 0))
        queued = stats.get("requests_queued", 0)
        if queued > self._pool_waits:
            self.metrics.db_pool_waits.inc(queued - self._pool_waits)
        self._pool_waits = queued

    def _sample_cache(self) -> None:
        stats = self.cache.stats
        if stats.hits > self._cache_hits:
            self.metrics.cache_hits.inc(stats.hits - self._cache_hits)
        if stats.misses > self._cache_misses:
            self.metrics.cache_misses.inc(stats.misses - self._cache_misses)
        self._cache_hits, self._cache_misses = stats.hits, stats.misses

    async def _check_postgres(self) -> None:
        from storage.pg.database import ping

        try:
            async with asyncio.timeout(2.0):
                async with self.pool.connection(timeout=2.0) as conn:
                    await ping(conn)
        except Exception:
            self._postgres_up.set(0)
            raise
        self._postgres_up.set(1)

    async def _check_redis(self) -> None:
        try:
            async with asyncio.timeout(2.0):
                await self.redis.ping()
        except Exception:
            self._redis_up.set(0)
            raise
        self._redis_up.set(1)

    async def _sample_queues(self) -> None:
        from storage.redis.queue import queue_backlog
        from storage.redis.send_limits import account_id, circuit_snapshot

        m = self.metrics
        backlog = await queue_backlog(self.redis, self.settings.delivery.shards)
        for shard, entries in enumerate(backlog.send):
            m.queue_backlog.labels("send", str(shard)).set(entries)
        m.queue_backlog.labels("materialize", "-").set(backlog.materialize)
        m.queue_oldest_age.labels("send").set(backlog.send_oldest_age_s)
        m.queue_oldest_age.labels("materialize").set(backlog.materialize_oldest_age_s)
        m.dead_letter_backlog.set(backlog.dead_letters)
        circuit = await circuit_snapshot(self.redis, account_id(self.settings.provider))
        m.circuit_state.set(CIRCUIT_VALUES.get(str(circuit.get("state")), 0))

    async def _sample_webhooks(self) -> None:
        from storage.pg.webhook_outbox import due_backlog

        async with asyncio.timeout(2.0):
            async with self.pool.connection(timeout=2.0) as conn:
                self.metrics.webhook_backlog.set(await due_backlog(conn))


# -- the /metrics server ------------------------------------------------------------


class MetricsPortInUse(Exception):
    """The metrics port is taken; the message names the variable that set it."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    registry: CollectorRegistry
    token: bytes


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != "/metrics":
            self._answer(404, b"not found: the metrics are at /metrics\n")
            return
        token = self.server.token
        if token:
            scheme, _, value = (self.headers.get("Authorization") or "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token):
                self._answer(401, b"missing or wrong Bearer token\n", authenticate=True)
                return
        try:
            body = generate_latest(self.server.registry)
        except Exception:
            log.exception("metrics collection failed")
            self._answer(500, b"metrics collection failed\n")
            return
        self._answer(200, body, content_type=CONTENT_TYPE_LATEST)

    def _answer(
        self,
        status: int,
        body: bytes,
        *,
        content_type: str = "text/plain; charset=utf-8",
        authenticate: bool = False,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if authenticate:
            self.send_header("WWW-Authenticate", 'Bearer realm="metrics"')
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged."""


class MetricsServer:
    """``GET /metrics`` on ``host:port`` (0: any free port), on a daemon thread."""

    def __init__(
        self, host: str, port: int, registry: CollectorRegistry, *, token: str = ""
    ) -> None:
        server_class = _Server6 if ":" in host else _Server
        self._server = server_class((host, port), _Handler)
        self._server.registry = registry
        self._server.token = token.encode()
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics-server", daemon=True
        )

    @property
    def address(self) -> str:
        """``host:port`` as bound (the port a 0 picked)."""
        host, port = self._server.server_address[:2]
        text = host.decode() if isinstance(host, bytes) else str(host)
        return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def close(self) -> None:
        """Release the socket of a server never started."""
        self._server.server_close()


def serve_metrics(
    settings: Settings, process: str, registry: CollectorRegistry
) -> MetricsServer | None:
    """Start ``process``'s ``/metrics`` server, or None when its port is ``off``.

    Raises MetricsPortInUse (naming the variable) when the port is taken. The bound
    address is logged and, with ``KOINONIA_METRICS_ADDRESS_FILE``, written there."""
    config = settings.metrics
    port = config.port(process)
    if port == "off":
        return None
    try:
        server = _bind_metrics(settings, int(port), registry)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        raise MetricsPortInUse(
            f"metrics port {port} on {config.host} is in use "
            f"({metrics_port_variable(process)}: set another port, 0 for any free one, "
            "or off; `--metrics-port` overrides it)"
        ) from None
    server.start()
    if config.address_file:
        _write_address(Path(config.address_file), server.address)
    log.info(
        "metrics served",
        extra={"process_type": process, "url": f"http://{server.address}/metrics"},
    )
    return server


def _bind_metrics(settings: Settings, port: int, registry: CollectorRegistry) -> MetricsServer:
    """The metrics server on ``port``; for 0, on a free port that is not one of the
    deployment's own ports. Those (``KOINONIA_HTTP_PORT``, ``KOINONIA_SIM_PORT``) are
    often chosen free a moment before the web or the simulator binds them, and the
    kernel may hand the same number to a ``bind(0)`` in between (a web node failed to
    start on its own metrics port so)."""
    config = settings.metrics
    if port != 0:
        return MetricsServer(config.host, port, registry, token=config.token)
    avoid = {settings.http.port, settings.simulator.port}
    refused: list[MetricsServer] = []
    try:
        while True:
            # Keeping a refused one bound until the end makes the kernel pick another.
            server = MetricsServer(config.host, 0, registry, token=config.token)
            if int(server.address.rsplit(":", 1)[1]) not in avoid or len(refused) >= 5:
                return server
            refused.append(server)
    finally:
        for other in refused:
            other.close()


def with_metrics_port(settings: Settings, process: str, port: str | None) -> Settings:
    """``settings`` with ``process``'s metrics port replaced (``--metrics-port``)."""
    if port is None:
        return settings
    value = metrics_port(port, "--metrics-port")
    changed = msgspec.structs.replace(settings.metrics, **{f"{process}_port": value})
    return msgspec.structs.replace(settings, metrics=changed)


def _write_address(path: Path, address: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(address + "\n")
    os.replace(tmp, path)


# -- several web workers, one port ------------------------------------------------------


class _LiveWorkers(Collector):
    """Every worker's values from the multiprocess directory; the live gauges of
    workers that have died (uvicorn starts new ones) are removed first."""

    _PID = re.compile(r"^gauge_live\w+?_(\d+)\.db$")

    def __init__(self, path: Path) -> None:
        self.path = path
        self._inner = prometheus_multiprocess.MultiProcessCollector(None, path=str(path))

    def collect(self) -> Iterable[Metric]:
        for entry in os.listdir(self.path):
            match = self._PID.match(entry)
            if match is not None and not _alive(int(match.group(1))):
                prometheus_multiprocess.mark_process_dead(int(match.group(1)), str(self.path))
        collected: Iterable[Metric] = self._inner.collect()
        return collected


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def multiprocess_registry(path: Path) -> CollectorRegistry:
    """The registry the parent of several web workers serves: all of them, summed."""
    registry = CollectorRegistry()
    registry.register(_LiveWorkers(path))
    return registry


class MultiprocessDir:
    """A clean ``PROMETHEUS_MULTIPROC_DIR`` for one run of several web workers, set in
    the environment so the workers started after it inherit it: the one set already
    (emptied now and at the end), else a new temporary one (removed at the end)."""

    def __init__(self) -> None:
        given = os.environ.get(MULTIPROC_ENV)
        self.ours = not given
        if given:
            self.path = Path(given)
            self.path.mkdir(parents=True, exist_ok=True)
            _empty(self.path)
        else:
            self.path = Path(tempfile.mkdtemp(prefix="koinonia-metrics-"))
            os.environ[MULTIPROC_ENV] = str(self.path)

    def remove(self) -> None:
        if self.ours:
            shutil.rmtree(self.path, ignore_errors=True)
        else:
            _empty(self.path)


def _empty(path: Path) -> None:
    for entry in path.glob("*.db"):
        with contextlib.suppress(FileNotFoundError):
            entry.unlink()
