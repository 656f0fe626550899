"""Publishing events: one Lua call per event into a channel's history and pub/sub.

Publishing is one Lua call per event (one Redis Cluster slot, thanks to the
church hash tag): it appends the event to the channel's capped history stream,
which assigns the offset, and publishes the finished WebSocket ``event`` frame on
pub/sub. The frame is assembled once, in Redis, so every node forwards the same
bytes to every connection without re-encoding.

A channel's epoch is a random token stored beside its history; it is replaced
whenever the history stream is found missing (Redis restarted, flushed, or the
channel expired), which tells a client with an old offset that recovery is
impossible.

On a Redis Cluster the frame goes out with SPUBLISH (sharded pub/sub): classic
PUBLISH is copied to every node of the cluster, so every web node's cost would grow
with the whole cluster's traffic. The channel carries the church's hash tag, so it
hashes to the slot of the history stream and the script may publish to it. A
standalone Redis keeps classic PUBLISH (see ``realtime.hub``).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from typing import Any

import msgspec

from storage.domain.events import AnyEvent, encode
from storage.redis import key_names
from storage.redis.connection import Redis, is_cluster
from storage.redis.read_positions import ReadPositions
from storage.redis.scripts import Call, ScriptRunner, lua

HISTORY_MAXLEN = 2000
"""Events kept per channel for recovery (approximate trimming)."""
HISTORY_TTL_S = 24 * 3600
"""A channel's history and epoch expire this long after its last event."""


_PUBLISH_LUA = lua("publish")

_HEAD_LUA = lua("channel_head")


class Published(msgspec.Struct, frozen=True):
    offset: str
    epoch: str


class ChannelHead(msgspec.Struct, frozen=True):
    epoch: str
    offset: str


class EventPublisher:
    """Publishes events to a church's channels; shared by web nodes and workers."""

    def __init__(self, redis: Redis) -> None:
        self.scripts = ScriptRunner(redis)
        self.publish_command = pubsub_publish_command(redis)
        """PUBLISH, or SPUBLISH on a cluster: passed to the scripts that publish."""
        self._publish = self.scripts.register(_PUBLISH_LUA)
        self._head = self.scripts.register(_HEAD_LUA)
        self.positions = ReadPositions(self.scripts)
        """Churches' read positions, recorded in the round trip that publishes their
        events (the relay), so a client that sees an event reads what it announced."""

    def publish_call(self, church_id: uuid.UUID, channel: str, event: AnyEvent) -> Call:
        """The script call that publishes ``event``, to batch with other calls."""
        return self.publish_encoded_call(church_id, channel, event.type, encode(event))

    def publish_encoded_call(
        self, church_id: uuid.UUID, channel: str, event_type: str, event_json: bytes
    ) -> Call:
        """The same for an event already encoded (the event log's relay)."""
        return (
            self._publish,
            [
                key_names.channel_history(church_id, channel),
                key_names.channel_epoch(church_id, channel),
            ],
            [
                key_names.channel_pubsub(church_id, channel),
                encode(channel),
                event_json,
                HISTORY_MAXLEN,
                new_epoch(),
                event_type,
                HISTORY_TTL_S,
                self.publish_command,
            ],
        )

    async def publish(self, church_id: uuid.UUID, channel: str, event: AnyEvent) -> Published:
        return (await self.publish_many(church_id, [(channel, event)]))[0]

    async def publish_many(
        self, church_id: uuid.UUID, items: Sequence[tuple[str, AnyEvent]]
    ) -> list[Published]:
        """Publish several events of one church in one round trip, in order."""
        if not items:
            return []
        results = await self.scripts.run(
            [self.publish_call(church_id, channel, event) for channel, event in items]
        )
        return [published(r) for r in results]

    async def head(self, church_id: uuid.UUID, channel: str) -> ChannelHead:
        result = await self.scripts.run_one(
            self._head,
            [
                key_names.channel_history(church_id, channel),
                key_names.channel_epoch(church_id, channel),
            ],
            [new_epoch(), HISTORY_TTL_S],
        )
        return ChannelHead(epoch=_text(result[0]), offset=_text(result[1]))


def pubsub_publish_command(redis: Redis) -> str:
    """PUBLISH on a standalone Redis, SPUBLISH (sharded) on a cluster."""
    return "SPUBLISH" if is_cluster(redis) else "PUBLISH"


def published(result: Any) -> Published:
    return Published(offset=_text(result[0]), epoch=_text(result[1]))


def new_epoch() -> str:
    return os.urandom(6).hex()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
