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


def open_redis(settings: RedisSettings, *, max_connections: int = 64) -> Redis:
    """A pooled client for commands (bytes responses; callers decode what they need)."""
    return aredis.Redis.from_url(
        settings.url,
        retry=_retry(),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        max_connections=max_connections,
        health_check_interval=15,
        socket_keepalive=True,
    )


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
