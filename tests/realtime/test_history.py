"""Recovery decisions against a real Redis: standalone and the session's Redis Cluster
(``redis_kind`` below parametrizes the conftest's ``redis``), same assertions."""

from __future__ import annotations

import uuid

import pytest

from realtime.history import position, recover
from storage.domain.events import ConversationTyping, ConversationTypingEvent
from storage.redis import key_names
from storage.redis.connection import Redis
from storage.redis.publisher import EventPublisher
from tests.realtime.conftest import REDIS_KINDS

pytestmark = pytest.mark.anyio


@pytest.fixture(params=REDIS_KINDS)
def redis_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def publish_many(publisher: EventPublisher, church_id: uuid.UUID, count: int) -> list[str]:
    data = ConversationTyping(conversation_id=uuid.uuid4(), user_id=uuid.uuid4())
    return [
        (await publisher.publish(church_id, "inbox", ConversationTypingEvent.new(data))).offset
        for _ in range(count)
    ]


def test_offsets_compare_as_integers() -> None:
    assert position("10-0") > position("9-5")
    assert position(b"10-2") == (10, 2)
    with pytest.raises(ValueError, match="malformed"):
        position("10")


async def test_without_since_starts_at_the_head(
    redis: Redis, publisher: EventPublisher, church_id: uuid.UUID
) -> None:
    empty = await recover(redis, publisher, church_id, "inbox", None)
    assert (empty.recovered, empty.entries) == (False, [])
    offsets = await publish_many(publisher, church_id, 2)
    head = await recover(redis, publisher, church_id, "inbox", None)
    assert head.offset == offsets[-1]
    assert not head.entries


async def test_since_replays_after_the_offset_exclusive(
    redis: Redis, publisher: EventPublisher, church_id: uuid.UUID
) -> None:
    offsets = await publish_many(publisher, church_id, 4)
    epoch = (await publisher.head(church_id, "inbox")).epoch
    replay = await recover(redis, publisher, church_id, "inbox", (offsets[1], epoch))
    assert replay.recovered
    assert [e.offset for e in replay.entries] == offsets[2:]
    assert replay.offset == offsets[-1]
    assert replay.entries[0].type == "conversation.typing"
    caught_up = await recover(redis, publisher, church_id, "inbox", (offsets[-1], epoch))
    assert caught_up.recovered
    assert (caught_up.entries, caught_up.offset) == ([], offsets[-1])


async def test_unrecoverable_when_trimmed_past_the_offset_or_epoch_changed(
    redis: Redis, publisher: EventPublisher, church_id: uuid.UUID
) -> None:
    offsets = await publish_many(publisher, church_id, 5)
    epoch = (await publisher.head(church_id, "inbox")).epoch
    await redis.xtrim(key_names.channel_history(church_id, "inbox"), maxlen=2, approximate=False)
    trimmed = await recover(redis, publisher, church_id, "inbox", (offsets[1], epoch))
    assert not trimmed.recovered
    assert trimmed.entries == []
    assert trimmed.offset == offsets[-1]
    # The client's own last entry trimmed: the next one may have gone too; refuse.
    edge = await recover(redis, publisher, church_id, "inbox", (offsets[2], epoch))
    assert not edge.recovered
    kept = await recover(redis, publisher, church_id, "inbox", (offsets[3], epoch))
    assert kept.recovered
    assert [e.offset for e in kept.entries] == offsets[4:]
    other_epoch = await recover(redis, publisher, church_id, "inbox", (offsets[3], "0000"))
    assert not other_epoch.recovered
    assert other_epoch.epoch == epoch
    future = await recover(redis, publisher, church_id, "inbox", ("99999999999999-0", epoch))
    assert not future.recovered
    garbage = await recover(redis, publisher, church_id, "inbox", ("nope", epoch))
    assert not garbage.recovered


async def test_a_client_that_saw_an_empty_channel_recovers_its_first_events(
    redis: Redis, publisher: EventPublisher, church_id: uuid.UUID
) -> None:
    empty = await publisher.head(church_id, "inbox")
    offsets = await publish_many(publisher, church_id, 2)
    replay = await recover(redis, publisher, church_id, "inbox", (empty.offset, empty.epoch))
    assert replay.recovered
    assert [e.offset for e in replay.entries] == offsets
    assert replay.epoch == empty.epoch


async def test_a_client_whose_own_entry_was_the_only_one_trimmed_recovers(
    redis: Redis, publisher: EventPublisher, church_id: uuid.UUID
) -> None:
    offsets = await publish_many(publisher, church_id, 3)
    epoch = (await publisher.head(church_id, "inbox")).epoch
    await redis.xtrim(key_names.channel_history(church_id, "inbox"), maxlen=2, approximate=False)
    replay = await recover(redis, publisher, church_id, "inbox", (offsets[0], epoch))
    assert replay.recovered
    assert [e.offset for e in replay.entries] == offsets[1:]
