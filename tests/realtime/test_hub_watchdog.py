"""The hub's watchdog: a pub/sub connection that goes silent (the server answers
nothing, not even PING, while TCP stays up) is taken for dead and replaced, and
nothing published meanwhile is lost (standalone Redis: ``CLIENT PAUSE`` silences it);
and the parser its connections read with."""

from __future__ import annotations

import asyncio
import uuid

import anyio
import pytest

from realtime import hub as hub_module
from realtime.hub import Hub
from storage.process.settings import RedisSettings
from storage.redis.connection import PubSubParser, Redis
from storage.redis.publisher import EventPublisher
from tests.realtime.conftest import REDIS_KINDS
from tests.realtime.test_hub import Recorder, publish

pytestmark = pytest.mark.anyio


async def test_a_silent_pub_sub_connection_is_pinged_then_replaced(
    redis_settings: RedisSettings,
    redis: Redis,
    publisher: EventPublisher,
    church_id: uuid.UUID,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(hub_module, "_IDLE_S", 0.4)
    node = Hub(redis_settings, publisher, redis)
    await node.start()
    try:
        [link] = node._links.values()
        recorder = Recorder()
        await node.subscribe(church_id, "inbox", recorder)
        first = await publish(publisher, church_id, "inbox")
        await recorder.wait_for(1)
        # Quiet but alive: PINGs are answered, the connection stays.
        await asyncio.sleep(1.0)
        assert link.connections == 1
        # Silent: nothing is answered for 1.5 s, the PING neither.
        await redis.execute_command("CLIENT", "PAUSE", "1500", "ALL")
        missed = await publish(publisher, church_id, "inbox")  # waits out the pause
        with anyio.fail_after(10):
            while link.connections < 2:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        after = await publish(publisher, church_id, "inbox")
        await recorder.wait_for(3)
        await asyncio.sleep(0.05)  # a duplicate would arrive now
        assert recorder.offsets == [first, missed, after]
    finally:
        await node.stop()


@pytest.mark.parametrize("redis_kind", REDIS_KINDS)
async def test_pub_sub_messages_skip_redis_py_s_push_logging(hub: Hub) -> None:
    # redis-py's own handler builds a log line per message, whatever the level.
    assert hub._links
    for link in hub._links.values():
        assert isinstance(link.conn._parser, PubSubParser)
    message = [b"message", b"channel", b"data"]
    assert await PubSubParser(65_536).handle_pubsub_push_response(message) is message
