"""Redis clients with explicit retries (redis-py 8 retries nothing by default)."""

from __future__ import annotations

import redis.asyncio as aredis
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
    since a subscription blocks reading for as long as the node lives."""
    return aredis.Redis.from_url(
        settings.url,
        retry=_retry(),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        health_check_interval=0,
        socket_keepalive=True,
    )
