"""Fixtures for the realtime tests: one real Redis (Valkey) per session, never a mock."""

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


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = open_redis(RedisSettings(url=redis_url))
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
async def hub(redis_url: str, redis: Redis, publisher: EventPublisher) -> AsyncIterator[Hub]:
    node = Hub(RedisSettings(url=redis_url), publisher, redis)
    await node.start()
    yield node
    await node.stop()
