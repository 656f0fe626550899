"""The node-local hub: one Redis pub/sub connection per Redis shard, fanning events
out to local sinks.

Every web node opens one pub/sub connection per shard (one in all on a standalone
Redis; one per master on a Redis Cluster), whatever the number of WebSocket and
SSE clients it serves (docs/architecture.md "No broadcaster"):

- on a standalone Redis channels use classic SUBSCRIBE (and publishers PUBLISH): the
  operations tooling and tests count subscribers with PUBSUB NUMSUB, and nothing
  is gained by sharding one server. On a cluster they use SSUBSCRIBE (publishers
  SPUBLISH, ``storage.redis.publisher``): classic PUBLISH is copied to every node
  of the cluster, sharded messages stay on the shard owning the channel's slot.
  The code path is one; only the command names differ (``_Mode``);
- on a cluster each channel is routed to the connection of the master owning its
  slot (the cluster client's slot map). When that connection fails (failover),
  or the server ends a subscription because its slot moved (a ``sunsubscribe``
  push) or answers MOVED, the hub refreshes the slot map, resubscribes the
  affected channels on their new owner and reads their gap from history exactly
  as after a reconnection;

- subscriptions are reference-counted per pub/sub channel: SUBSCRIBE when the
  first local sink arrives, UNSUBSCRIBE when the last one leaves;
- the reader task parses each message's header (``type\\nepoch\\noffset\\nframe``,
  written by ``storage.events``) once into a ``HubEvent`` and hands that same
  object, and so the same frame bytes, to every sink: nothing is re-encoded
  per connection;
- the hub remembers the last offset it delivered per channel. After the
  connection drops it reconnects with backoff, resubscribes every channel and
  reads the gap from the channel's history stream (XRANGE after the last
  offset, exclusive) while holding back live events, so sinks see every event
  once and in offset order.

``subscribe`` returns only once Redis has confirmed the subscription and the
hub knows where the channel stands, so a caller can then read history
without leaving a gap. Sinks must not block or raise: ``deliver`` queues.

Two more kinds of message share the connection:

- ephemeral events (``conversation.typing``, published by ``realtime.typing_indicator``):
  pub/sub only, never in history. Their header's offset is ``~<offset>``: the
  channel's latest stored offset, repeated, not a new one. The hub passes them
  to the sinks while the channel is live and drops them while a gap is being
  filled (a typing indicator is stale by then); it never records their offset;
- credential revocations (``key_names.CREDENTIAL_REVOCATIONS``, subscribed with every
  (re)connection), handed to ``revocations``; after a reconnection the hub asks
  it to recheck the node's credentials, since messages sent meanwhile are lost.
  They stay classic pub/sub on a cluster too (a PUBLISH reaches every node, and
  they are rare), subscribed on every shard's connection: a copy per shard, which
  ``revocations`` applies idempotently, and one shard failing loses none.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
import uuid
from typing import Any, Protocol

import msgspec
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.crc import key_slot
from redis.exceptions import AskError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

from realtime.errors import HubStopped
from realtime.frames import Subscribed, encode_text
from realtime.history import ZERO, Position, entry_from_stream, position, recoverable
from realtime.protocol import wire_frame
from realtime.revocation import Revocations
from storage.domain.events import frame_bytes
from storage.process.settings import RedisSettings
from storage.redis import key_names
from storage.redis.connection import PubSubParser, Redis, open_pubsub_client
from storage.redis.publisher import EventPublisher

log = logging.getLogger("koinonia.realtime.hub")

_BACKOFF_MIN_S = 0.05
_BACKOFF_MAX_S = 2.0
_CLUSTER_BACKOFF_MAX_S = 0.5
"""A cluster link's reconnection is paced lower: each failure refreshes the slot map,
and until the hub finds the replica promoted after a failover, the relay may be
publishing its backlog there, which history keeps only 2,000 entries of."""
_IDLE_S = 15.0
"""With no traffic for about this long (``_Watchdog``: 7.5 to 15 s) the reader sends
PING; another silent period means the connection is dead even if TCP has not
noticed."""
_SUBSCRIBE_CHUNK = 1000
_REROUTE_MIN_INTERVAL_S = 0.2
_MAX_HELD = 10_000
"""Live events held per channel while its gap is read; beyond that they are
dropped and read back from history instead."""
_SLICE = 200
"""Events handed to the sinks between two yields to the event loop, when a gap fill
or a burst of messages delivers many at once: each connection's sender then writes
what was queued, so a burst never piles up past a connection's send queue (1,000
frames, then 4008) just because the senders never got to run. After a failover a
busy channel's gap is thousands of events (the relay's backlog)."""


class HubEvent(msgspec.Struct, frozen=True, gc=False):
    """One published event as every local sink receives it (one object per event)."""

    channel: str
    """The channel name relative to its church, e.g. ``inbox``."""
    type: str
    epoch: str
    offset: str
    position: Position
    frame: bytes
    """The WebSocket ``event`` frame, byte for byte as published."""
    text: str
    """The same frame as text, for ASGI ``websocket.send``."""
    wire: bytes = b""
    """The same frame as a whole server-to-client WebSocket message on the wire
    (unmasked, one final text frame): built once here by ``realtime.protocol.wire_frame``,
    written as is to every connection by that protocol, instead of framed again per
    connection."""
    ephemeral: bool = False
    """Realtime only (typing): ``offset`` repeats the channel's latest stored one."""
    lost: bool = False
    """Not an event: the hub could not read the channel's gap from history (trimmed
    while it was cut off), so its sinks lack the events before ``offset``. ``text``
    and ``wire`` are the WebSocket ``subscribed`` frame with ``recovered: false``;
    ``type`` and ``frame`` are SSE's ``recovery_failed`` record (``_lost``)."""


def _event(
    channel: str,
    type_: str,
    epoch: str,
    offset: str | bytes,
    frame: bytes,
    ephemeral: bool = False,
) -> HubEvent:
    text = offset.decode() if isinstance(offset, bytes) else offset
    return HubEvent(
        channel=channel,
        type=type_,
        epoch=epoch,
        offset=text,
        position=position(text),
        frame=frame,
        text=frame.decode(),
        wire=wire_frame(frame),
        ephemeral=ephemeral,
    )


def _lost(channel: str, epoch: str, offset: str) -> HubEvent:
    """The notice that a channel's events up to ``offset`` could not be recovered:
    what a failed resume tells a client (``recovered: false``), sent on the live
    subscription instead (docs/protocol.md "Realtime")."""
    notice = Subscribed(channel=channel, offset=offset, epoch=epoch, recovered=False)
    text = encode_text(notice)
    frame = text.encode()
    return HubEvent(
        channel=channel,
        type="recovery_failed",
        epoch=epoch,
        offset=offset,
        position=position(offset),
        frame=msgspec.json.encode({"channels": [channel]}),
        text=text,
        wire=wire_frame(frame),
        lost=True,
    )


_REVOCATIONS = key_names.CREDENTIAL_REVOCATIONS.encode()


class _Mode(msgspec.Struct, frozen=True):
    """The pub/sub commands and push kinds for channels: classic or sharded."""

    subscribe: str
    unsubscribe: str
    message: bytes
    subscribed: bytes
    unsubscribed: bytes


_CLASSIC = _Mode("SUBSCRIBE", "UNSUBSCRIBE", b"message", b"subscribe", b"unsubscribe")
_SHARDED = _Mode("SSUBSCRIBE", "SUNSUBSCRIBE", b"smessage", b"ssubscribe", b"sunsubscribe")


class _Link:
    """One pub/sub connection: to the standalone Redis, or to one cluster master."""

    __slots__ = (
        "conn",
        "connections",
        "flusher",
        "inflight",
        "key",
        "live",
        "reader",
        "unsubscribe",
        "unsubscribing",
    )

    def __init__(self, key: str, conn: AbstractConnection) -> None:
        self.key = key
        """The master's ``host:port`` on a cluster; empty on a standalone Redis."""
        self.conn = conn
        # True between a completed (re)connection and the next failure; commands
        # are only written then, so none interleave with the connection handshake.
        self.live = False
        # SUBSCRIBE replies still expected per name: a channel counts as confirmed
        # only by the reply to its latest SUBSCRIBE, never by a stale one.
        self.inflight: dict[bytes, int] = {}
        self.unsubscribe: set[bytes] = set()
        # UNSUBSCRIBE replies still expected per name: any other unsubscribe reply
        # is the server ending a subscription (its slot moved away).
        self.unsubscribing: dict[bytes, int] = {}
        self.reader: asyncio.Task[None] | None = None
        self.flusher: asyncio.Task[None] | None = None
        self.connections = 0


class _Watchdog:
    """Notices a pub/sub connection gone silent, without a timeout per read: every
    ``_IDLE_S / 2`` it looks whether the reader heard anything since its last look.
    After one silent period it sends PING (its reply is heard); after another it
    cancels the reader, which takes the connection for dead even if TCP has not
    noticed, and reconnects."""

    __slots__ = ("_handle", "_hub", "_link", "_pinged", "_reader", "_seen", "fired", "heard")

    def __init__(self, hub: Hub, link: _Link, reader: asyncio.Task[Any]) -> None:
        self._hub = hub
        self._link = link
        self._reader = reader
        self.heard = 0
        """Replies the reader has read (it counts them)."""
        self._seen = 0
        self._pinged: asyncio.Task[None] | None = None
        self.fired = False
        """Set when the watchdog cancelled the reader."""
        self._handle = asyncio.get_running_loop().call_later(_IDLE_S / 2, self._look)

    def _look(self) -> None:
        if self.heard != self._seen:
            self._seen = self.heard
            self._pinged = None
        elif self._pinged is None:
            self._pinged = asyncio.create_task(self._hub._send(self._link, "PING"))
        else:
            self.fired = True
            self._reader.cancel()
            return
        self._handle = asyncio.get_running_loop().call_later(_IDLE_S / 2, self._look)

    def stop(self) -> None:
        self._handle.cancel()


class Sink(Protocol):
    def deliver(self, event: HubEvent) -> None:
        """Take one event; must not block or raise."""


class _Channel:
    """The hub's state for one pub/sub channel."""

    __slots__ = (
        "channel",
        "church_id",
        "epoch",
        "held",
        "history",
        "last",
        "link",
        "name",
        "ready",
        "sinks",
    )

    def __init__(self, name: bytes, church_id: uuid.UUID, channel: str) -> None:
        self.name = name
        self.church_id = church_id
        self.channel = channel
        self.history = key_names.channel_history(church_id, channel)
        # Insertion-ordered, O(1) removal even with thousands of sinks on one channel.
        self.sinks: dict[Sink, None] = {}
        # Last offset and epoch delivered; None until the first history read.
        self.last: Position | None = None
        self.epoch: str | None = None
        # Live events held back while history is read; None when delivering live.
        self.held: list[HubEvent] | None = []
        # Set when the subscription is confirmed and the gap (if any) filled.
        self.ready = asyncio.Event()
        # The connection this channel is subscribed on (its slot's master).
        self.link: _Link | None = None


class _Fill:
    """What a gap fill read for one channel."""

    __slots__ = ("entries", "epoch", "lost_to")

    def __init__(self, epoch: str | None, entries: list[Any]) -> None:
        self.epoch = epoch
        self.entries = entries
        self.lost_to: str | None = None
        """Set when entries after the channel's last offset were trimmed: the newest
        offset the stream has issued, where its sinks resume."""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _no_such_key(error: Exception) -> bool:
    """XINFO STREAM's answer for a stream that does not exist."""
    return isinstance(error, ResponseError) and "no such key" in str(error).lower()


class Hub:
    def __init__(
        self, redis_settings: RedisSettings, publisher: EventPublisher, redis: Redis
    ) -> None:
        self._settings = redis_settings
        self.publisher = publisher
        """Kept for publishing realtime-only events (typing) from the endpoints."""
        self._redis = redis
        """Pooled client for history reads; never a pub/sub connection."""
        # On a cluster the pooled client's slot map routes each channel to a master.
        cluster: object = redis
        self._cluster = cluster if isinstance(cluster, RedisCluster) else None
        self._mode = _CLASSIC if self._cluster is None else _SHARDED
        self._client: Redis | None = None
        self._links: dict[str, _Link] = {}
        self._running = False
        self._channels: dict[bytes, _Channel] = {}
        self._to_fill: set[_Channel] = set()
        self._filler: asyncio.Task[None] | None = None
        self._rerouter: asyncio.Task[None] | None = None
        self._refresh_lock = asyncio.Lock()
        self._last_reroute = 0.0
        self._reroute_again = False
        self.moved_channels = 0
        self.lost_gaps = 0
        """Gap fills that found part of their gap trimmed (sinks told ``recovered:
        false``); a diagnostic for tests and logs."""
        """Channels resubscribed on another master after a failover or a slot move
        (a diagnostic: tests show with it that a move did happen under traffic)."""
        self.revocations = Revocations()
        """The node's connections by credential, closed (4001) when those are revoked."""
        self._rechecker: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Open the node's pub/sub connections (one per shard) and start their readers."""
        self._running = True
        if self._cluster is None:
            self._client = open_pubsub_client(self._settings)
            conn = self._client.connection_pool.make_connection()  # type: ignore[no-untyped-call]
            link = self._links[""] = _Link("", conn)
            await self._connect(link)
            link.reader = asyncio.create_task(self._run(link), name="realtime-hub-reader")
        else:
            # The cluster client reads its slot map on first use; the hub needs it now.
            await self._cluster.initialize()
            for node in self._cluster.get_primaries():
                link = self._open_link(node, start_reader=False)
                with contextlib.suppress(RedisError, OSError):
                    await self._connect(link)  # a master down at start: its reader retries
                link.reader = asyncio.create_task(
                    self._run(link), name=f"realtime-hub-reader {link.key}"
                )

    async def stop(self) -> None:
        self._running = False
        links = list(self._links.values())
        self._links.clear()
        for link in links:
            link.live = False
        tasks = [self._filler, self._rerouter, self._rechecker]
        for link in links:
            tasks += [link.reader, link.flusher]
        for task in tasks:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._filler = self._rerouter = self._rechecker = None
        for link in links:
            await link.conn.disconnect(nowait=True)
        if self._client is not None:
            await self._client.aclose()
        self._client = None

    def _open_link(self, node: ClusterNode, *, start_reader: bool = True) -> _Link:
        """A pub/sub connection to one master; its reader (started here unless the
        caller connects first) connects it and subscribes its channels."""
        # The cluster client's own connection settings, but never a read timeout:
        # a subscription blocks reading for as long as the node lives.
        kwargs = {
            **node.connection_kwargs,
            "socket_timeout": None,
            "health_check_interval": 0,
            "parser_class": PubSubParser,
        }
        link = self._links[node.name] = _Link(node.name, node.connection_class(**kwargs))
        if start_reader:
            link.reader = asyncio.create_task(
                self._run(link), name=f"realtime-hub-reader {node.name}"
            )
        return link

    # -- subscriptions ---------------------------------------------------------

    async def subscribe(self, church_id: uuid.UUID, channel: str, sink: Sink) -> None:
        """Add a sink to a channel; returns once Redis confirmed the subscription."""
        if not self._running:
            raise HubStopped("the hub is not running")
        name = key_names.channel_pubsub(church_id, channel).encode()
        ch = self._channels.get(name)
        if ch is None:
            ch = self._channels[name] = _Channel(name, church_id, channel)
            ch.sinks[sink] = None
            link = ch.link = self._route(name)
            if link is None:
                self._schedule_reroute()  # its slot has no master yet (a failover)
            else:
                link.unsubscribe.discard(name)
                await self._send_subscribe(link, [name])
        else:
            ch.sinks[sink] = None
        try:
            await ch.ready.wait()
        except BaseException:
            self.unsubscribe(church_id, channel, sink)
            raise

    def unsubscribe(self, church_id: uuid.UUID, channel: str, sink: Sink) -> None:
        """Remove a sink; the last one out unsubscribes the node (batched, in the
        background, so a closing connection's cleanup never waits on Redis)."""
        name = key_names.channel_pubsub(church_id, channel).encode()
        ch = self._channels.get(name)
        if ch is None or sink not in ch.sinks:
            return
        del ch.sinks[sink]
        if ch.sinks:
            return
        del self._channels[name]
        self._to_fill.discard(ch)
        link = ch.link
        if link is None or self._links.get(link.key) is not link:
            return
        link.unsubscribe.add(name)
        if link.flusher is None or link.flusher.done():
            link.flusher = asyncio.create_task(self._flush_unsubscribes(link))

    def subscriber_count(self, church_id: uuid.UUID, channel: str) -> int:
        ch = self._channels.get(key_names.channel_pubsub(church_id, channel).encode())
        return 0 if ch is None else len(ch.sinks)

    def subscribed_channels(self) -> dict[str, list[bytes]]:
        """The channels this node is subscribed to, per pub/sub connection (for tests
        and diagnostics): ``host:port`` of each master, ``""`` on a standalone Redis."""
        out: dict[str, list[bytes]] = {key: [] for key in self._links}
        for name, ch in self._channels.items():
            if ch.link is not None and ch.link.key in out:
                out[ch.link.key].append(name)
        return out

    # -- routing (cluster) -----------------------------------------------------

    def _route(self, name: bytes) -> _Link | None:
        """The connection a channel belongs on: its slot's master on a cluster (None
        while the slot map knows no master for it: a failover under way)."""
        if self._cluster is None:
            return self._links[""]
        try:
            node = self._cluster.nodes_manager.get_node_from_slot(key_slot(name))
        except (RedisError, LookupError):
            return None
        link = self._links.get(node.name)
        return link if link is not None else self._open_link(node)

    def _schedule_reroute(self) -> None:
        if self._cluster is None:
            return
        # A request during a running reroute may come after its slot map refresh:
        # that reroute then runs once more.
        self._reroute_again = True
        if self._rerouter is None or self._rerouter.done():
            self._rerouter = asyncio.create_task(self._reroute(), name="realtime-hub-reroute")

    async def _reroute(self) -> None:
        while self._reroute_again and self._running:
            self._reroute_again = False
            try:
                await self._reroute_once()
            except Exception:
                # Never stop rerouting for good: channels would stay unsubscribed.
                log.exception("pub/sub reroute failed; retrying")
                self._reroute_again = True

    async def _reroute_once(self) -> None:
        """Refresh the slot map; move every channel whose slot changed owner to its new
        master's connection, and close connections to nodes no longer masters."""
        cluster = self._cluster
        assert cluster is not None
        # Paced: until the cluster's nodes agree on a moved slot, a resubscription
        # may meet MOVED again, and that must not become a busy loop.
        wait = self._last_reroute + _REROUTE_MIN_INTERVAL_S - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        self._last_reroute = time.monotonic()
        delay = _BACKOFF_MIN_S
        while self._running:
            try:
                async with self._refresh_lock:
                    await cluster.nodes_manager.initialize()
                break
            except (RedisError, OSError) as exc:
                log.warning("cluster slot map refresh failed (%s); retrying", exc)
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, _BACKOFF_MAX_S)
        if not self._running:
            return
        masters = {node.name: node for node in cluster.get_primaries()}
        for node in masters.values():
            if node.name not in self._links:
                self._open_link(node)
        moved: dict[_Link, list[bytes]] = {}
        for name, ch in self._channels.items():
            link = self._route(name)
            if link is None:
                ch.link = None
                self._reroute_again = True
            elif ch.link is not link:
                ch.link = link
                ch.ready.clear()
                moved.setdefault(link, []).append(name)
        for key in [key for key in self._links if key not in masters]:
            old = self._links.pop(key)
            old.live = False
            for task in (old.reader, old.flusher):
                if task is not None:
                    task.cancel()
            await old.conn.disconnect(nowait=True)
        for link, names in moved.items():
            self.moved_channels += len(names)
            log.info("resubscribing %d channels on %s after a slot moved", len(names), link.key)
            # Confirmation starts each one's gap fill (see _on_subscribed).
            await self._send_subscribe(link, names)

    # -- connection ------------------------------------------------------------

    async def _connect(self, link: _Link) -> None:
        conn = link.conn
        await conn.disconnect(nowait=True)
        await conn.connect()  # type: ignore[no-untyped-call]
        # A fresh connection holds no subscriptions and owes no replies.
        link.inflight.clear()
        link.unsubscribe.clear()
        link.unsubscribing.clear()
        names = [name for name, ch in self._channels.items() if ch.link is link]
        for name in names:
            self._channels[name].ready.clear()
        link.live = True
        link.connections += 1
        link.inflight[_REVOCATIONS] = link.inflight.get(_REVOCATIONS, 0) + 1
        await self._send(link, "SUBSCRIBE", _REVOCATIONS)
        await self._send_subscribe(link, names)

    async def _run(self, link: _Link) -> None:
        delay = _BACKOFF_MIN_S
        while self._links.get(link.key) is link:
            try:
                if not link.live:
                    await self._connect(link)
                    log.info(
                        "pub/sub %sreconnected; resubscribed %d channels",
                        f"{link.key} " if link.key else "",
                        sum(1 for ch in self._channels.values() if ch.link is link),
                    )
                    delay = _BACKOFF_MIN_S
                await self._read(link)
            except (RedisError, OSError) as exc:
                log.warning("pub/sub connection lost (%s); retrying in %.2fs", exc, delay)
            except Exception:
                # A bug must not silence the node: start afresh, and the gap
                # read after reconnecting delivers whatever was skipped.
                log.exception("pub/sub reader failed; reconnecting in %.2fs", delay)
            link.live = False
            # On a cluster a lost connection may be a failed master: its slots
            # have a new owner once a replica is promoted.
            self._schedule_reroute()
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(
                delay * 2, _BACKOFF_MAX_S if self._cluster is None else _CLUSTER_BACKOFF_MAX_S
            )

    async def _read(self, link: _Link) -> None:
        conn = link.conn
        mode = self._mode
        unyielded = 0
        reader = asyncio.current_task()
        assert reader is not None
        watchdog = _Watchdog(self, link, reader)
        try:
            while True:
                try:
                    # No timeout per read (an ``asyncio.timeout`` entered and left per
                    # message showed in node B's profile, bench/README.md
                    # "bench/fanout.py"): the watchdog notices a silent connection.
                    reply = await conn.read_response(timeout=math.inf, push_request=True)
                except AskError as exc:
                    # SSUBSCRIBE sent to a node that does not own the slot (MOVED): the
                    # slot map is stale, and that slot's channels are subscribed nowhere.
                    log.info("pub/sub redirected (%s); refreshing the slot map", exc)
                    for name, ch in self._channels.items():
                        if ch.link is link and key_slot(name) == exc.slot_id:
                            ch.link = None
                            link.inflight.pop(name, None)
                    self._schedule_reroute()
                    continue
                except ResponseError as exc:
                    log.warning("pub/sub command failed: %s", exc)
                    continue
                watchdog.heard += 1
                # RESP3 pushes come as a list subclass (hiredis PushNotification).
                if isinstance(reply, list) and len(reply) >= 3:
                    kind = reply[0]
                    if kind == mode.message or kind == b"message":
                        self._on_message(reply[1], reply[2])
                        # Replies already buffered are parsed without yielding: after a
                        # burst (a relay's backlog) let the senders write (see _SLICE).
                        unyielded += 1
                        if unyielded >= _SLICE:
                            unyielded = 0
                            await asyncio.sleep(0)
                    elif kind == mode.subscribed or kind == b"subscribe":
                        self._on_subscribed(link, reply[1])
                    elif kind == mode.unsubscribed:
                        self._on_unsubscribed(link, reply[1])
        except asyncio.CancelledError:
            if not watchdog.fired:
                raise
            reader.uncancel()
            raise RedisConnectionError("pub/sub connection silent after PING") from None
        finally:
            watchdog.stop()

    async def _send(self, link: _Link, *args: bytes | str) -> None:
        if not link.live:
            return  # the next (re)connection subscribes every channel anyway
        try:
            await link.conn.send_command(*args, check_health=False)
        except (RedisError, OSError, AttributeError) as exc:
            # The reader sees the same broken connection and reconnects. (redis-py
            # writes from a task of its own: a disconnect by the reader in between
            # leaves it without a writer, an AttributeError.)
            log.debug("pub/sub write failed: %r", exc)

    async def _send_subscribe(self, link: _Link, names: list[bytes]) -> None:
        if not link.live:
            return
        for chunk in self._chunks(names):
            for name in chunk:
                link.inflight[name] = link.inflight.get(name, 0) + 1
            await self._send(link, self._mode.subscribe, *chunk)

    def _chunks(self, names: list[bytes]) -> list[list[bytes]]:
        """Names in commands of at most ``_SUBSCRIBE_CHUNK``; on a cluster one command
        per slot (SSUBSCRIBE / SUNSUBSCRIBE refuse channels of several slots, and a
        church's channels share its slot)."""
        if self._cluster is None:
            groups = [names]
        else:
            by_slot: dict[int, list[bytes]] = {}
            for name in names:
                by_slot.setdefault(key_slot(name), []).append(name)
            groups = list(by_slot.values())
        return [
            group[i : i + _SUBSCRIBE_CHUNK]
            for group in groups
            for i in range(0, len(group), _SUBSCRIBE_CHUNK)
        ]

    async def _flush_unsubscribes(self, link: _Link) -> None:
        while link.unsubscribe:
            # Take a chunk right before writing it: a channel subscribed again
            # meanwhile has left the set, and its SUBSCRIBE is already on the wire.
            count = min(len(link.unsubscribe), _SUBSCRIBE_CHUNK)
            taken = [link.unsubscribe.pop() for _ in range(count)]
            for chunk in self._chunks(taken):
                if link.live:
                    for name in chunk:
                        link.unsubscribing[name] = link.unsubscribing.get(name, 0) + 1
                await self._send(link, self._mode.unsubscribe, *chunk)

    # -- the reader's events ---------------------------------------------------

    def _on_subscribed(self, link: _Link, name: bytes) -> None:
        left = link.inflight.get(name, 0) - 1
        if left > 0:
            link.inflight[name] = left
            return
        link.inflight.pop(name, None)
        if name == _REVOCATIONS:
            if link.connections > 1 and (self._rechecker is None or self._rechecker.done()):
                self._rechecker = asyncio.create_task(self._recheck(), name="realtime-recheck")
            return
        ch = self._channels.get(name)
        if ch is None or ch.link is not link:
            return
        # Hold live events until history has been read up to them.
        if ch.held is None:
            ch.held = []
        self._schedule_fill(ch)

    def _on_unsubscribed(self, link: _Link, name: bytes) -> None:
        left = link.unsubscribing.get(name, 0) - 1
        if left >= 0:
            if left:
                link.unsubscribing[name] = left
            else:
                link.unsubscribing.pop(name, None)
            return
        # Not ours: the server ended the subscription because the channel's slot
        # moved to another master. Resubscribe there and fill the gap.
        ch = self._channels.get(name)
        if self._cluster is not None and ch is not None and ch.link is link:
            log.info("pub/sub %s dropped %r (slot moved); rerouting", link.key, name)
            ch.link = None
            self._schedule_reroute()

    def _on_message(self, name: bytes, data: bytes) -> None:
        ch = self._channels.get(name)
        if ch is None:
            if name == _REVOCATIONS:
                self.revocations.revoke(data)
            return
        parts = data.split(b"\n", 3)
        if len(parts) != 4:
            log.error("malformed pub/sub message on %r", name)
            return
        offset = parts[2]
        ephemeral = offset[:1] == b"~"
        if ephemeral:
            if ch.held is not None:
                return  # a gap is being filled: the indicator would be stale
            offset = offset[1:]
        try:
            event = _event(
                ch.channel, parts[0].decode(), parts[1].decode(), offset, parts[3], ephemeral
            )
        except ValueError:
            log.error("malformed offset on %r", name)
            return
        if ephemeral:
            for sink in ch.sinks:
                sink.deliver(event)
            return
        held = ch.held
        if held is None:
            self._accept(ch, event)
        elif len(held) < _MAX_HELD:
            held.append(event)
        else:
            held.clear()  # the gap read after this one fetches them from history
            self._schedule_fill(ch)

    @staticmethod
    def _accept(ch: _Channel, event: HubEvent) -> None:
        """Deliver an event unless the channel already had it (same epoch, not newer)."""
        if event.epoch != ch.epoch:
            # History was recreated under a new epoch; its offsets start afresh.
            ch.epoch = event.epoch
        elif ch.last is not None and event.position <= ch.last:
            return
        ch.last = event.position
        for sink in ch.sinks:
            sink.deliver(event)

    async def _recheck(self) -> None:
        try:
            await self.revocations.recheck(self._redis)
        except Exception:
            log.exception("credential recheck after reconnecting failed")

    # -- filling gaps from history ---------------------------------------------

    def _schedule_fill(self, ch: _Channel) -> None:
        self._to_fill.add(ch)
        if self._filler is None or self._filler.done():
            self._filler = asyncio.create_task(self._fill_loop(), name="realtime-hub-fill")

    async def _fill_loop(self) -> None:
        delay = _BACKOFF_MIN_S
        while self._to_fill:
            batch = [ch for ch in self._to_fill if self._channels.get(ch.name) is ch]
            self._to_fill.clear()
            try:
                results = await self._read_history(batch)
            except (RedisError, OSError) as exc:
                log.warning("history read failed (%s); retrying in %.2fs", exc, delay)
                self._to_fill.update(batch)
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, _BACKOFF_MAX_S)
                continue
            delay = _BACKOFF_MIN_S
            for ch, fill in zip(batch, results, strict=True):
                if self._channels.get(ch.name) is not ch:
                    continue
                try:
                    await self._apply_fill(ch, fill)
                except Exception:
                    # Never leave a channel holding events forever.
                    log.exception("gap fill failed on %r", ch.name)
                    if ch.last is None:
                        ch.last = ZERO
                    self._to_fill.discard(ch)
                    self._release(ch)

    async def _read_history(self, batch: list[_Channel]) -> list[_Fill]:
        """Per channel: its epoch, the entries after its last offset (for a channel
        without one yet: its newest entry, which becomes the baseline), and whether
        those are all there were."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for ch in batch:
                pipe.get(key_names.channel_epoch(ch.church_id, ch.channel))
                if ch.last is None:
                    pipe.xrevrange(ch.history, "+", "-", count=1)
                else:
                    pipe.xrange(ch.history, f"({ch.last[0]}-{ch.last[1]}", "+")
                # Asked after the read: trimming only ever moves the oldest entry
                # forward, so if everything after the last offset is still kept now,
                # the read above got all of it. (A cut-off hub's gap can outgrow the
                # history: a failover while the relay publishes a busy broadcast.)
                pipe.xinfo_stream(ch.history)
            replies = await pipe.execute(raise_on_error=False)
        results: list[_Fill] = []
        stale: list[int] = []
        for i, ch in enumerate(batch):
            raw_epoch, entries, info = replies[3 * i : 3 * i + 3]
            for reply in (raw_epoch, entries, info):
                # A failed read is read again (a master dying between the replies
                # fails only the later ones); a stream that does not exist is news
                # of nothing, as before this check.
                if isinstance(reply, Exception) and not _no_such_key(reply):
                    raise reply
            epoch = raw_epoch.decode() if isinstance(raw_epoch, bytes) else raw_epoch
            fill = _Fill(epoch, entries)
            if ch.last is not None and None not in (epoch, ch.epoch) and epoch != ch.epoch:
                stale.append(i)  # history recreated: all of it is news, whatever its offsets
            elif ch.last is not None and isinstance(info, dict) and not recoverable(ch.last, info):
                newest = _text(info["last-generated-id"])
                # Behind the hub (a replica promoted without the tail it delivered):
                # its sinks already have what history lacks, nothing to tell.
                if position(newest) > ch.last:
                    fill.lost_to = newest
            results.append(fill)
        if stale:
            async with self._redis.pipeline(transaction=False) as pipe:
                for i in stale:
                    pipe.xrange(batch[i].history, "-", "+")
                for i, entries in zip(stale, await pipe.execute(), strict=True):
                    results[i].entries = entries
        return results

    async def _apply_fill(self, ch: _Channel, fill: _Fill) -> None:
        epoch, entries = fill.epoch, fill.entries
        if ch.last is None:
            ch.epoch = epoch
            ch.last = position(entries[0][0]) if entries else ZERO
        elif epoch is not None and fill.lost_to is not None:
            # Part of the gap was trimmed: tell the sinks, as a failed resume would,
            # and go on from the newest offset (the client reloads from REST, which
            # holds everything published up to it).
            self.lost_gaps += 1
            log.warning(
                "pub/sub gap on %r outgrew its history; sinks told recovered: false", ch.name
            )
            self._accept(ch, _lost(ch.channel, epoch, fill.lost_to))
        elif epoch is not None:
            for i, (entry_id, fields) in enumerate(entries):
                if i and not i % _SLICE:
                    await asyncio.sleep(0)  # let the senders write (see _SLICE)
                    if self._channels.get(ch.name) is not ch:
                        return  # its last sink left meanwhile
                entry = entry_from_stream(entry_id, fields)
                frame = frame_bytes(ch.channel, entry.offset, entry.event_json)
                self._accept(ch, _event(ch.channel, entry.type, epoch, entry.offset, frame))
        await self._release_gradually(ch)

    async def _release_gradually(self, ch: _Channel) -> None:
        """Deliver the held live events newer than the fill, a slice at a time, then
        go live. Live events arriving meanwhile are still held, behind the rest."""
        while ch.held is not None and len(ch.held) > _SLICE:
            if ch in self._to_fill or self._channels.get(ch.name) is not ch:
                return  # reconnected again (that fill releases) or no sink left
            held = ch.held
            ch.held = held[_SLICE:]
            for event in held[:_SLICE]:
                self._accept(ch, event)
            await asyncio.sleep(0)
        if ch in self._to_fill:
            return  # reconnected again meanwhile: keep holding until that gap is read
        self._release(ch)

    def _release(self, ch: _Channel) -> None:
        """Deliver the held live events newer than the fill, then go live."""
        held, ch.held = ch.held, None
        for event in held or ():
            self._accept(ch, event)
        ch.ready.set()
