"""Redis clients with explicit retries (redis-py 8 retries nothing by default).

Standalone (``REDIS_URL``) or Redis Cluster (``REDIS_CLUSTER_NODES``). The cluster
client (``redis.asyncio.cluster.RedisCluster``) has the same command methods as
``redis.asyncio.Redis`` and is handed out typed as ``Redis`` so that callers keep one
type; what must differ on a cluster (sharded pub/sub, one slot per pipeline or
script, no MULTI across slots) asks ``is_cluster(client)``.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

import redis.asyncio as aredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import Connection, DefaultParser, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import AskError, ClusterError, MovedError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from storage.process.settings import RedisSettings

Redis = aredis.Redis
T = TypeVar("T")


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


class PubSubParser(DefaultParser):  # type: ignore[misc,valid-type]
    """redis-py's parser (hiredis when installed), handing pub/sub messages back as
    they are. redis-py's own handler logs each one (``getLogger`` and
    ``"Push response: " + str(message)``, built whatever the log level): ~5 µs per
    message on a node's pub/sub reader (bench/README.md "bench/fanout.py").
    Only pub/sub connections use it."""

    async def handle_pubsub_push_response(self, response: Any) -> Any:
        return response


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
        parser_class=PubSubParser,
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
    return _AskingOnOneConnection(
        startup_nodes=nodes,
        # During a failover the dead master's slots are briefly unserved; the
        # others must keep working (each church lives in one slot).
        require_full_coverage=False,
        # A MOVED reply names the slot's new owner, which redis-py then records; by
        # default every fifth MOVED also re-reads the whole slot map through
        # ``aclose()``, which disconnects every node's connections, those other tasks
        # are using included: while a church's slot migrated, concurrent requests
        # failed mid-command (AttributeError on a connection closed under them).
        # Connection errors still re-read the map.
        reinitialize_steps=0,
        max_connections=max_connections,
        retry=_retry(),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        health_check_interval=health_check_interval,
        socket_keepalive=True,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_timeout=socket_timeout,
        **options,
    )


class _LastFreeFirst(collections.deque[Connection]):
    """A node's free connections, handed out last-released first."""

    def popleft(self) -> Connection:
        return self.pop()


class _AskingOnOneConnection(RedisCluster):
    """redis-py's cluster client, with ``ASKING`` and the command it allows on one
    connection.

    On ``-ASK`` redis-py sends ``ASKING`` to the importing node and then the command,
    each through ``ClusterNode.execute_command``, which takes the oldest free
    connection and puts it back at the end: with two or more idle connections to that
    node the command goes out on another connection than ``ASKING``, the node answers
    ``MOVED`` back to the migrating one, which answers ``ASK`` again, until the
    redirect budget (16) is spent and the call fails with ``TTL exhausted`` (seen on
    every busy node while a church's slot migrated: plain ``GET``s answered 500).
    Handing out the connection released last makes the command take the one
    ``ASKING`` just used: nothing runs between the two (no await between the release
    and the next acquire). Only the node an ``ASK`` points at needs it; ``get_node``
    is how redis-py finds that node.
    """

    def get_node(
        self,
        host: str | None = None,
        port: int | None = None,
        node_name: str | None = None,
    ) -> ClusterNode | None:
        node = super().get_node(host, port, node_name)
        if node is not None and not isinstance(node._free, _LastFreeFirst):
            node._free = _LastFreeFirst(node._free, maxlen=node._free.maxlen)
        return node


SLOT_MOVING_WAIT_S = 5.0
"""How long a call is retried while its slot is being migrated (see ``slot_moving``)."""


def slot_moving(error: BaseException) -> bool:
    """Whether ``error`` says only that the call's slot is being migrated: the call
    did not run, and may run again once the keys are on one node.

    ``TRYAGAIN``: a multi-key command or script whose keys are split between the two
    nodes, or not all present on the importing one (a script's key that does not
    exist yet, such as an empty delayed set, counts as missing until the migration
    ends). redis-py retries it, and ``ASK``/``MOVED``, 16 times within about 0.3 s,
    then raises ``ClusterError("TTL exhausted.")``; a migration lasts as long as its
    keys take to move."""
    return isinstance(error, (TryAgainError, AskError, MovedError)) or type(error) is ClusterError


async def riding_slot_moves(call: Callable[[], Awaitable[T]]) -> T:
    """``call()``, again with a short backoff while ``slot_moving`` says its slot is
    being migrated, for at most ``SLOT_MOVING_WAIT_S``; then the last error.

    Also for a ``MULTI``/``EXEC``: redis-py's cluster transaction does not follow
    ``ASK`` and retries a redirection only briefly (its ``Retry``, about 0.75 s); a
    transaction met by a redirection ran nothing (the node refuses the ``EXEC``), so
    running it again is safe."""
    deadline = time.monotonic() + SLOT_MOVING_WAIT_S
    delay = 0.02
    while True:
        try:
            return await call()
        except Exception as error:
            if not slot_moving(error) or time.monotonic() + delay > deadline:
                raise
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.2)
