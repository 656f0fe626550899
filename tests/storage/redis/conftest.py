"""``redis``: a flushed asyncio client, once on a standalone Redis of the module's
own and once on the session's Redis Cluster (tests/redis_cluster_support.py), so a
storage test parametrized by it makes the same assertions on both."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from deploy.embedded_redis import EmbeddedRedis
from storage.process.settings import RedisSettings
from storage.redis.connection import Redis, open_redis


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = EmbeddedRedis(Path(tmp_path_factory.mktemp("redis")), persist=False)
    yield server.start()
    server.stop()


@pytest.fixture(params=["standalone", "cluster"])
async def redis(request: pytest.FixtureRequest) -> AsyncIterator[Redis]:
    if request.param == "cluster":
        settings: RedisSettings = request.getfixturevalue("redis_cluster").settings
    else:
        settings = RedisSettings(url=request.getfixturevalue("redis_url"))
    client = open_redis(settings)
    await client.flushdb()  # on a cluster: every master
    yield client
    await client.aclose()
