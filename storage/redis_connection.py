"""Redis clients with explicit retries (redis-py 8 retries nothing by default)."""

from __future__ import annotations

import redis.asyncio as aredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from storage.settings import RedisSettings

Redis = aredis.Redis


def _retry() -> Retry:
    return Retry(ExponentialWithJitterBackoff(base=0.05, cap=2.0), retries=8)


POOL_WAIT_S = 5.0


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
