"""Redis clients with explicit retries (redis-py 8 retries nothing by default).

Standalone (``REDIS_URL``) or Redis Cluster (``REDIS_CLUSTER_NODES``). The cluster
client (``redis.asyncio.cluster.RedisCluster``) has the same command methods as
``redis.asyncio.Redis`` and is handed out typed as ``Redis`` so that callers keep one
type; what must differ on a cluster (sharded pub/sub, one slot per pipeline or
script, no MULTI across slots) asks ``is_cluster(client)``.
"""

from __future__ import annotations

from typing import Any, cast
from urllib.parse import urlsplit

import redis.asyncio as aredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from storage.process.settings import RedisSettings

Redis = aredis.Redis


def _retry() -> Retry:
    # About 0.75 s of retries in all (0.05 + 0.1 + 0.2 + 0.4, jittered): a blink is
    # ridden out, an outage fails fast so a request can answer 503 within seconds.
    return Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.4), retries=4)


POOL_WAIT_S = 2.0
CONNECT_TIMEOUT_S = 1.0
COMMAND_TIMEOUT_S = 5.0
"""No command waits longer (blocking reads block for at most 1 s)."""


def open_redis(settings: RedisSettings, *, max_connections: int = 64) -> Redis:
    """A pooled client for commands (bytes responses; callers decode what they need).

    The pool blocks (up to ``POOL_WAIT_S``) when every connection is busy: redis-py's
    default pool raises ``MaxConnectionsError`` at once instead, before any retry,
    which turned a burst of reconnecting WebSocket clients into errors.
    """
    if settings.cluster_nodes:
        return cast(Redis, open_redis_cluster(settings, max_connections=max_connections))
    pool = aredis.BlockingConnectionPool.from_url(
        settings.url,
        max_connections=max_connections,
        timeout=POOL_WAIT_S,
        retry=_retry(),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        health_check_interval=15,
        socket_keepalive=True,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_timeout=COMMAND_TIMEOUT_S,
    )
    return aredis.Redis(connection_pool=pool)


def open_pubsub_client(settings: RedisSettings) -> Redis:
    """A separate client for the node's single pub/sub connection; no command timeout,
    since a subscription blocks reading for as long as the node lives.

    On a cluster: a cluster client whose ``pubsub()`` gives a ``ClusterPubSub``
    (``SSUBSCRIBE`` opens one connection per shard it subscribes on)."""
    if settings.cluster_nodes:
        return cast(
            Redis,
            open_redis_cluster(
                settings, max_connections=8, socket_timeout=None, health_check_interval=0
            ),
        )
    return aredis.Redis.from_url(
        settings.url,
        retry=_retry(),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        health_check_interval=0,
        socket_keepalive=True,
    )


def is_cluster(client: Redis | RedisCluster) -> bool:
    """Whether ``client`` (from ``open_redis``) speaks to a Redis Cluster."""
    return isinstance(client, RedisCluster)


def seed_nodes(cluster_nodes: tuple[str, ...]) -> tuple[list[ClusterNode], dict[str, Any]]:
    """``REDIS_CLUSTER_NODES`` entries as startup nodes, plus the connection options
    (credentials, TLS, client name) of the first entry given as a URL: every node of
    one cluster takes the same ones."""
    nodes: list[ClusterNode] = []
    options: dict[str, Any] = {}
    for entry in cluster_nodes:
        if "://" in entry:
            parts = urlsplit(entry)
            if parts.scheme not in ("redis", "rediss") or not parts.hostname:
                raise ValueError(f"REDIS_CLUSTER_NODES: not a redis:// URL: {entry!r}")
            host, port = parts.hostname, parts.port or 6379
            if not options:
                options = dict(parse_url(entry))
                # A cluster has no databases; the URL's path (``/0``) means nothing.
                options.pop("db", None)
                options.pop("host", None)
                options.pop("port", None)
                if options.pop("connection_class", None) is aredis.SSLConnection:
                    options["ssl"] = True
        else:
            host, sep, port_text = entry.rpartition(":")
            if not sep or not host or not port_text.isdigit():
                raise ValueError(f"REDIS_CLUSTER_NODES: expected host:port, got {entry!r}")
            port = int(port_text)
        nodes.append(ClusterNode(host.strip("[]"), port))
    return nodes, options


def open_redis_cluster(
    settings: RedisSettings,
    *,
    max_connections: int = 64,
    socket_timeout: float | None = COMMAND_TIMEOUT_S,
    health_check_interval: float = 15,
) -> RedisCluster:
    """A cluster client for ``settings.cluster_nodes``, with the standalone client's
    timeouts, keepalive, health checks and retry count.

    Differences redis-py imposes: ``max_connections`` is per node, and a node whose
    connections are all busy raises ``MaxConnectionsError`` at once (the cluster
    client has no blocking pool). The cluster client uses its ``Retry`` for the
    number of attempts only: each attempt after a connection error or CLUSTER DOWN
    re-reads the slot map (from the other nodes) and tries again, with no backoff,
    and ``MOVED`` / ``ASK`` are followed without counting as attempts.
    """
    nodes, options = seed_nodes(settings.cluster_nodes)
    return RedisCluster(
        startup_nodes=nodes,
        # During a failover the dead master's slots are briefly unserved; the
        # others must keep working (each church lives in one slot).
        require_full_coverage=False,
        max_connections=max_connections,
        retry=_retry(),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        health_check_interval=health_check_interval,
        socket_keepalive=True,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_timeout=socket_timeout,
        **options,
    )
