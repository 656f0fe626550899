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

Redis replication is asynchronous: a master may acknowledge a publish and die before
its replica received it. The promoted replica then lacks the tail of the history
stream while the channel's epoch survives, so a hub filling its gap, or a client
resuming with ``since``, would be told everything was recovered when it was not. On a
cluster ``run_replicated`` (the event relay's publish) therefore ends its pipeline
with ``WAIT 1`` on every master it wrote to, on the connection that wrote, and a
publish no replica acknowledged counts as failed: the relay keeps the events in
Postgres and publishes them again (same event ids; delivery is at least once).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Sequence
from typing import Any

import msgspec
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from storage.domain.events import AnyEvent, encode
from storage.redis import key_names
from storage.redis.connection import Redis, is_cluster
from storage.redis.read_positions import ReadPositions
from storage.redis.scripts import Call, ScriptRunner, lua

log = logging.getLogger("koinonia.storage.publisher")

HISTORY_MAXLEN = 2000
"""Events kept per channel for recovery (approximate trimming)."""
HISTORY_TTL_S = 24 * 3600
"""A channel's history and epoch expire this long after its last event."""


_PUBLISH_LUA = lua("publish")

_HEAD_LUA = lua("channel_head")

_READ_POSITION_LUA = lua("read_position")
"""storage/redis/read_positions.py's script, sent with the publishes by the relay."""

REPLICA_WAIT_MS = 500
"""How long a publish waits for a replica's acknowledgement. On one host or one
network a replica acknowledges within a millisecond or two; one that takes this long
is lagging (a full resync), and the relay's retry with backoff is the better wait."""
REPLICAS_TTL_S = 1.0
"""How long a master's count of connected replicas (``ROLE``) is trusted: a replica
that joins is waited for within this long."""


class NotReplicated(RedisError):
    """No replica acknowledged a publish although the master has one: a failover now
    could lose the events, so the publish counts as failed (the relay retries)."""


class Published(msgspec.Struct, frozen=True):
    offset: str
    epoch: str


class ChannelHead(msgspec.Struct, frozen=True):
    epoch: str
    offset: str


class EventPublisher:
    """Publishes events to a church's channels; shared by web nodes and workers."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        cluster: object = redis
        self._cluster = cluster if isinstance(cluster, RedisCluster) else None
        self._replicas: dict[str, tuple[float, int, bytes]] = {}
        """Per master (``host:port``): when its replicas were counted, how many, and
        its node id."""
        self.scripts = ScriptRunner(redis)
        self.publish_command = pubsub_publish_command(redis)
        """PUBLISH, or SPUBLISH on a cluster: passed to the scripts that publish."""
        self._publish = self.scripts.register(_PUBLISH_LUA)
        self._head = self.scripts.register(_HEAD_LUA)
        # What ``run_replicated`` may have to load after NOSCRIPT: the relay's calls.
        self._sources = {
            self._publish: _PUBLISH_LUA,
            self.scripts.register(_READ_POSITION_LUA): _READ_POSITION_LUA,
        }
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

    async def run_replicated(self, calls: Sequence[Call]) -> list[Any]:
        """Run script calls (publishes, read positions) like ``scripts.run``; on a
        cluster, return only once a replica of every master written holds their writes.

        Raises ``RedisError`` when that cannot be shown (the master died, the replica
        lags, a redirection moved a call to another connection): some calls may have
        been applied, and the caller runs them all again later.

        A master with no connected replica is not waited for: no replica can be
        promoted in its place, so nothing is lost behind an epoch that survives (if it
        dies its slots stay down until it returns, with its data or, without
        persistence, with no epoch at all, and clients are told ``recovered: false``).
        Waiting there would stall every publish for ``REPLICA_WAIT_MS`` or, refusing
        them, wedge the relay until an operator adds a replica.
        """
        cluster = self._cluster
        if cluster is None:
            return await self.scripts.run(calls)
        try:
            return await self._run_replicated(cluster, calls)
        except RedisClusterException as exc:
            # Raised by redis-py's cluster pipeline when its own retry after a
            # connection error reroutes the WAIT (see _pipeline): not a RedisError,
            # yet a Redis failure like any other for the caller.
            raise NotReplicated(f"publish not confirmed: {exc}") from exc

    async def _run_replicated(self, cluster: RedisCluster, calls: Sequence[Call]) -> list[Any]:
        results: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        for _ in range(2):  # the second round runs the calls that met NOSCRIPT
            replies = await self._pipeline(cluster, [calls[i] for i in todo])
            missing = []
            for i, reply in zip(todo, replies, strict=True):
                if isinstance(reply, NoScriptError):
                    missing.append(i)
                results[i] = reply
            if not missing:
                break
            for sha in {calls[i][0] for i in missing}:
                await self._redis.script_load(self._sources[sha])
            todo = missing
        for value in results:
            if isinstance(value, Exception):
                raise value
        return results

    async def _pipeline(self, cluster: RedisCluster, calls: Sequence[Call]) -> list[Any]:
        """The calls, then ``WAIT`` on each master written to that has a replica.

        redis-py's cluster pipeline sends each node's commands on one connection, in
        order (``ClusterNode.execute_pipeline``), so a ``WAIT`` given that node as
        ``target_nodes`` follows the node's writes on the connection that made them,
        which is what WAIT counts. Writes can leave that connection in two ways,
        both turned into a failure here:

        - a ``MOVED`` reply makes redis-py run the call again on its own, on another
          node: the slot map then names another master (checked below). (``ASK``,
          during a slot migration, is followed the same way but leaves the slot map
          as it is: a call redirected by it goes unconfirmed, a window as narrow as
          the migration of that key.)
        - a connection error while sending makes redis-py retry the node's commands
          on a new connection, and the retry has lost the ``target_nodes`` (redis-py
          pops them): a WAIT routed anew (redis-py 8.1 sends it to one node) would
          prove nothing about our writes. ``CLUSTER MYID`` beside it gives that away:
          redis-py 8.1 refuses to route it without a target
          (``RedisClusterException``), and should a later version send it somewhere,
          a reply from any node but the expected one fails the publish.
        """
        await cluster.initialize()  # a no-op unless the slot map is to be read (again)
        nodes: dict[str, ClusterNode] = {}
        placed: list[str] = []
        for _sha, keys, _args in calls:
            node = _master_of(cluster, keys[0])
            nodes.setdefault(node.name, node)
            placed.append(node.name)
        waited = [node for node in nodes.values() if await self._has_replica(node)]
        pipe = cluster.pipeline(transaction=False)
        for sha, keys, args in calls:
            pipe.execute_command("EVALSHA", sha, len(keys), *keys, *args)
        for node in waited:
            pipe.execute_command("CLUSTER MYID", target_nodes=node)
            pipe.execute_command("WAIT", 1, REPLICA_WAIT_MS, target_nodes=node)
        replies = list(await pipe.execute(raise_on_error=False))
        tail = replies[len(calls) :]
        for (_sha, keys, _args), name in zip(calls, placed, strict=True):
            if _master_of(cluster, keys[0]).name != name:
                raise NotReplicated(f"a publish was redirected away from {name}")
        for i, node in enumerate(waited):
            ran_on, ack = tail[2 * i], tail[2 * i + 1]
            for reply in (ran_on, ack):
                if isinstance(reply, Exception):
                    raise reply
            if _text(ran_on).encode() != self._replicas[node.name][2]:
                raise NotReplicated(f"the WAIT for {node.name} ran elsewhere (a retry)")
            if ack < 1 and await self._has_replica(node, fresh=True):
                raise NotReplicated(f"no replica of {node.name} acknowledged a publish")
        return replies[: len(calls)]

    async def _has_replica(self, node: ClusterNode, *, fresh: bool = False) -> bool:
        """Whether ``node`` has a connected replica (its ``ROLE``, cached briefly, with
        its node id)."""
        now = time.monotonic()
        known = self._replicas.get(node.name)
        if known is not None and not fresh and now - known[0] < REPLICAS_TTL_S:
            return known[1] > 0
        node_id = _text(await node.execute_command("CLUSTER MYID")).encode()
        role = await node.execute_command("ROLE")
        count = len(role[2]) if len(role) > 2 and role[0] in (b"master", "master") else 0
        if known is not None and (count > 0) != (known[1] > 0):
            log.warning(
                "replicas of %s now %d: publishes %s",
                node.name,
                count,
                "wait for one" if count else "no longer wait",
            )
        self._replicas[node.name] = (now, count, node_id)
        return count > 0

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


def _master_of(cluster: RedisCluster, key: str) -> ClusterNode:
    node = cluster.get_node_from_key(key)
    if node is None:  # the slot map knows no master: a failover under way
        raise NotReplicated(f"no master serves {key!r} now")
    return node


def pubsub_publish_command(redis: Redis) -> str:
    """PUBLISH on a standalone Redis, SPUBLISH (sharded) on a cluster."""
    return "SPUBLISH" if is_cluster(redis) else "PUBLISH"


def published(result: Any) -> Published:
    return Published(offset=_text(result[0]), epoch=_text(result[1]))


def new_epoch() -> str:
    return os.urandom(6).hex()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
