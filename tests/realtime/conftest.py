"""Fixtures for the realtime tests: one real Redis (Valkey) per session, never a mock.

``redis``, ``publisher`` and ``hub`` use a standalone Redis unless the module
overrides ``redis_kind``: test_hub.py and test_history.py parametrize it so that
each of their tests runs on the standalone Redis and on the session's Redis Cluster
(tests/redis_cluster_support.py), with the same assertions. The other modules'
servers are built for a standalone Redis (tests/realtime/test_endpoints.py
``serving``) and keep it."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from deploy.embedded_redis import EmbeddedRedis
from realtime.hub import Hub
from storage.process.settings import RedisSettings
from storage.redis.connection import Redis, open_redis
from storage.redis.publisher import EventPublisher


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = EmbeddedRedis(Path(tmp_path_factory.mktemp("redis")), persist=False)
    url = server.start()
    yield url
    server.stop()


REDIS_KINDS = ["standalone", "cluster"]


@pytest.fixture
def redis_kind() -> str:
    """``standalone``; a module overriding it with ``params=REDIS_KINDS`` runs on both."""
    return "standalone"


CLIENT_NAME = "koinonia-realtime-tests"
"""The name (CLIENT SETNAME) of every connection the clients and hubs of these
fixtures open: a test cutting its hub's pub/sub connections finds them by it, and
leaves alone those of other processes on the session's cluster (the cluster stack's
web node holds a pub/sub connection on every master, for revocations)."""


@pytest.fixture
def redis_settings(redis_kind: str, request: pytest.FixtureRequest) -> RedisSettings:
    """The settings a web node would have: a URL, or the cluster's seed nodes (its hub
    then subscribes with SSUBSCRIBE, one connection per master)."""
    if redis_kind == "cluster":
        first, *others = request.getfixturevalue("redis_cluster").nodes
        # The first seed as a URL gives its options to every node's connections.
        return RedisSettings(cluster_nodes=(f"redis://{first}?client_name={CLIENT_NAME}", *others))
    return RedisSettings(url=f"{request.getfixturevalue('redis_url')}?client_name={CLIENT_NAME}")


@pytest.fixture
async def redis(redis_settings: RedisSettings) -> AsyncIterator[Redis]:
    client = open_redis(redis_settings)
    yield client
    await client.aclose()


@pytest.fixture
def publisher(redis: Redis) -> EventPublisher:
    return EventPublisher(redis)


@pytest.fixture
def church_id() -> uuid.UUID:
    """A church of its own per test, so tests never see each other's channels."""
    return uuid.uuid4()


@pytest.fixture
async def hub(
    redis_settings: RedisSettings, redis: Redis, publisher: EventPublisher
) -> AsyncIterator[Hub]:
    node = Hub(redis_settings, publisher, redis)
    await node.start()
    yield node
    await node.stop()
