"""Who is here, in Redis: each church's staff connections and what they view.

One hash per church (``kn:pr:{c:<church>}``, the church's hash tag: one slot on a
cluster) maps every staff connection, on any web node, to its expiry, its node,
its user, the conversation it views and since when. A node refreshes its own
connections of a church every few seconds with one call that states them all
(``sync``): whatever the node no longer lists is gone, whatever it lists is valid
for ``ttl`` from Redis's clock. A node that dies stops refreshing; its entries
expire, and the next call for that church from anyone (another node's refresh,
``GET /v1/presence``) removes them. A hash rather than a sorted set by expiry:
every call reads the whole church anyway to tell what changed.

The same script publishes ``staff.presence`` and ``conversation.viewers`` for
what each call changed (realtime only: pub/sub, never history, never the outbox),
so changes from two nodes reach clients in the order Redis applied them
(storage/redis/lua/presence_sync.lua).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

import msgspec

from storage.domain.ids import uuid7
from storage.redis import key_names
from storage.redis.publisher import HISTORY_TTL_S, EventPublisher, new_epoch
from storage.redis.scripts import Call, lua

_SYNC_LUA = lua("presence_sync")


def presence_key(church_id: uuid.UUID) -> str:
    """The church's hash of staff connections."""
    return f"{key_names.PREFIX}:pr:{key_names.church_tag(church_id)}"


def realtime_prefix(church_id: uuid.UUID) -> str:
    """What ``key_names.channel_history`` and its siblings put before ``h:<channel>``,
    ``e:<channel>`` and ``p:<channel>``: the script names the channels' keys itself."""
    return f"{key_names.PREFIX}:rt:{key_names.church_tag(church_id)}:"


def timestamp(at: datetime | None = None) -> str:
    """The events' time format, fixed width so that the script can order by it."""
    moment = at or datetime.now(UTC)
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Connection(msgspec.Struct, frozen=True):
    """One staff connection as a node states it."""

    id: str
    """The connection's id (random, unique across nodes)."""
    user_id: uuid.UUID
    conversation_id: uuid.UUID | None = None
    since: str = ""
    """When it started viewing ``conversation_id`` (``timestamp``)."""


class Snapshot(msgspec.Struct, frozen=True):
    """``GET /v1/presence``: who is online, and who views which conversation."""

    online: list[uuid.UUID]
    viewers: dict[str, list[uuid.UUID]]
    """Conversation id → its viewers, the earliest first."""


class PresenceStore:
    """The calls of storage/redis/lua/presence_sync.lua, on the publisher's scripts."""

    def __init__(self, publisher: EventPublisher) -> None:
        self._publisher = publisher
        self._sha = publisher.scripts.register(_SYNC_LUA)

    def _call(
        self,
        mode: str,
        church_id: uuid.UUID,
        node: str,
        ttl_ms: int,
        connections: Iterable[Connection] = (),
    ) -> Call:
        args: list[str | int] = [
            mode,
            node,
            ttl_ms,
            realtime_prefix(church_id),
            timestamp(),
            str(uuid7())[:-4],
            self._publisher.publish_command,
            new_epoch(),
            HISTORY_TTL_S,
        ]
        for c in connections:
            conversation = "" if c.conversation_id is None else str(c.conversation_id)
            args += [c.id, str(c.user_id), conversation, c.since if conversation else ""]
        return (self._sha, [presence_key(church_id)], args)

    def sync_call(
        self, church_id: uuid.UUID, node: str, connections: Iterable[Connection], ttl_ms: int
    ) -> Call:
        """State that ``node``'s staff connections in the church are ``connections``
        (none: the node has left), valid for ``ttl_ms``; sweeps expired entries."""
        return self._call("sync", church_id, node, ttl_ms, connections)

    async def run(self, calls: Sequence[Call]) -> None:
        """Several churches' syncs in one round trip (each in its church's slot)."""
        if calls:
            await self._publisher.scripts.run(calls)

    async def read(self, church_id: uuid.UUID) -> Snapshot:
        """The church's presence now, expired entries swept (and their changes
        published) first."""
        raw = await self._publisher.scripts.run_one(*self._call("read", church_id, "", 0))
        return snapshot(_text(v) for v in raw)


def snapshot(flat: Iterable[str]) -> Snapshot:
    """The read script's answer (user, conversation, since per connection) as a
    Snapshot: users once each, viewers ordered like the event's."""
    values = list(flat)
    online: set[str] = set()
    views: dict[str, dict[str, str]] = {}
    for i in range(0, len(values) - 2, 3):
        user, conversation, since = values[i : i + 3]
        online.add(user)
        if conversation:
            seen = views.setdefault(conversation, {})
            if user not in seen or since < seen[user]:
                seen[user] = since
    return Snapshot(
        online=[uuid.UUID(u) for u in sorted(online)],
        viewers={
            conversation: [
                uuid.UUID(u) for u, _ in sorted(seen.items(), key=lambda item: (item[1], item[0]))
            ]
            for conversation, seen in sorted(views.items())
        },
    )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
