"""The node-local hub: one Redis pub/sub connection fanning events out to local sinks.

Every web node opens exactly one pub/sub connection, whatever the number of
WebSocket and SSE clients it serves (docs/architecture.md "No broadcaster"):

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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from typing import Any, Protocol

import msgspec
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from realtime.errors import HubStopped
from realtime.history import ZERO, Position, entry_from_stream, position
from realtime.protocol import wire_frame
from realtime.revocation import Revocations
from storage.domain.events import frame_bytes
from storage.process.settings import RedisSettings
from storage.redis import key_names
from storage.redis.connection import Redis, open_pubsub_client
from storage.redis.publisher import EventPublisher

log = logging.getLogger("koinonia.realtime.hub")

_BACKOFF_MIN_S = 0.05
_BACKOFF_MAX_S = 2.0
_IDLE_S = 15.0
"""With no traffic for this long the reader sends PING; another silent period
means the connection is dead even if TCP has not noticed."""
_SUBSCRIBE_CHUNK = 1000
_MAX_HELD = 10_000
"""Live events held per channel while its gap is read; beyond that they are
dropped and read back from history instead."""


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


_REVOCATIONS = key_names.CREDENTIAL_REVOCATIONS.encode()


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


class Hub:
    def __init__(
        self, redis_settings: RedisSettings, publisher: EventPublisher, redis: Redis
    ) -> None:
        self._settings = redis_settings
        self.publisher = publisher
        """Kept for publishing realtime-only events (typing) from the endpoints."""
        self._redis = redis
        """Pooled client for history reads; never the pub/sub connection."""
        self._client: Redis | None = None
        self._conn: AbstractConnection | None = None
        # True between a completed (re)connection and the next failure; commands
        # are only written then, so none interleave with the connection handshake.
        self._live = False
        self._channels: dict[bytes, _Channel] = {}
        # SUBSCRIBE replies still expected per name: a channel counts as confirmed
        # only by the reply to its latest SUBSCRIBE, never by a stale one.
        self._inflight: dict[bytes, int] = {}
        self._unsubscribe: set[bytes] = set()
        self._to_fill: set[_Channel] = set()
        self._reader: asyncio.Task[None] | None = None
        self._filler: asyncio.Task[None] | None = None
        self._flusher: asyncio.Task[None] | None = None
        self.revocations = Revocations()
        """The node's connections by credential, closed (4001) when those are revoked."""
        self._connections = 0
        self._rechecker: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Open the node's pub/sub connection and start its reader."""
        self._client = open_pubsub_client(self._settings)
        self._conn = self._client.connection_pool.make_connection()  # type: ignore[no-untyped-call]
        await self._connect()
        self._reader = asyncio.create_task(self._run(), name="realtime-hub-reader")

    async def stop(self) -> None:
        self._live = False
        for task in (self._reader, self._filler, self._flusher, self._rechecker):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._reader = self._filler = self._flusher = self._rechecker = None
        if self._conn is not None:
            await self._conn.disconnect(nowait=True)
        if self._client is not None:
            await self._client.aclose()
        self._conn = self._client = None

    # -- subscriptions ---------------------------------------------------------

    async def subscribe(self, church_id: uuid.UUID, channel: str, sink: Sink) -> None:
        """Add a sink to a channel; returns once Redis confirmed the subscription."""
        if self._reader is None:
            raise HubStopped("the hub is not running")
        name = key_names.channel_pubsub(church_id, channel).encode()
        ch = self._channels.get(name)
        if ch is None:
            ch = self._channels[name] = _Channel(name, church_id, channel)
            self._unsubscribe.discard(name)
            ch.sinks[sink] = None
            await self._send_subscribe([name])
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
        self._unsubscribe.add(name)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_unsubscribes())

    def subscriber_count(self, church_id: uuid.UUID, channel: str) -> int:
        ch = self._channels.get(key_names.channel_pubsub(church_id, channel).encode())
        return 0 if ch is None else len(ch.sinks)

    # -- connection ------------------------------------------------------------

    async def _connect(self) -> None:
        conn = self._conn
        if conn is None:
            raise HubStopped("the hub is not running")
        await conn.disconnect(nowait=True)
        await conn.connect()  # type: ignore[no-untyped-call]
        # A fresh connection holds no subscriptions and owes no replies.
        self._inflight.clear()
        self._unsubscribe.clear()
        for ch in self._channels.values():
            ch.ready.clear()
        self._live = True
        self._connections += 1
        await self._send_subscribe([_REVOCATIONS, *self._channels])

    async def _run(self) -> None:
        delay = _BACKOFF_MIN_S
        while True:
            try:
                if not self._live:
                    await self._connect()
                    log.info("pub/sub reconnected; resubscribed %d channels", len(self._channels))
                    delay = _BACKOFF_MIN_S
                await self._read()
            except (RedisError, OSError) as exc:
                log.warning("pub/sub connection lost (%s); retrying in %.2fs", exc, delay)
            except Exception:
                # A bug must not silence the node: start afresh, and the gap
                # read after reconnecting delivers whatever was skipped.
                log.exception("pub/sub reader failed; reconnecting in %.2fs", delay)
            self._live = False
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, _BACKOFF_MAX_S)

    async def _read(self) -> None:
        conn = self._conn
        assert conn is not None  # set by start(), cleared only by stop() after cancelling us
        pinged = False
        while True:
            reply = await conn.read_response(timeout=_IDLE_S, push_request=True)
            if reply is None:
                if pinged:
                    raise RedisConnectionError("pub/sub connection silent after PING")
                pinged = True
                await self._send("PING")
                continue
            pinged = False
            # RESP3 pushes come as a list subclass (hiredis PushNotification).
            if isinstance(reply, list) and len(reply) >= 3:
                kind = reply[0]
                if kind == b"message":
                    self._on_message(reply[1], reply[2])
                elif kind == b"subscribe":
                    self._on_subscribed(reply[1])

    async def _send(self, *args: bytes | str) -> None:
        if not self._live or self._conn is None:
            return  # the next (re)connection subscribes every channel anyway
        try:
            await self._conn.send_command(*args, check_health=False)
        except (RedisError, OSError, AttributeError) as exc:
            # The reader sees the same broken connection and reconnects. (redis-py
            # writes from a task of its own: a disconnect by the reader in between
            # leaves it without a writer, an AttributeError.)
            log.debug("pub/sub write failed: %r", exc)

    async def _send_subscribe(self, names: list[bytes]) -> None:
        if not self._live:
            return
        for i in range(0, len(names), _SUBSCRIBE_CHUNK):
            chunk = names[i : i + _SUBSCRIBE_CHUNK]
            for name in chunk:
                self._inflight[name] = self._inflight.get(name, 0) + 1
            await self._send("SUBSCRIBE", *chunk)

    async def _flush_unsubscribes(self) -> None:
        while self._unsubscribe:
            # Take a chunk right before writing it: a channel subscribed again
            # meanwhile has left the set, and its SUBSCRIBE is already on the wire.
            count = min(len(self._unsubscribe), _SUBSCRIBE_CHUNK)
            chunk = [self._unsubscribe.pop() for _ in range(count)]
            await self._send("UNSUBSCRIBE", *chunk)

    # -- the reader's two events -----------------------------------------------

    def _on_subscribed(self, name: bytes) -> None:
        left = self._inflight.get(name, 0) - 1
        if left > 0:
            self._inflight[name] = left
            return
        self._inflight.pop(name, None)
        if name == _REVOCATIONS:
            if self._connections > 1 and (self._rechecker is None or self._rechecker.done()):
                self._rechecker = asyncio.create_task(self._recheck(), name="realtime-recheck")
            return
        ch = self._channels.get(name)
        if ch is None:
            return
        # Hold live events until history has been read up to them.
        if ch.held is None:
            ch.held = []
        self._schedule_fill(ch)

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
            for ch, (epoch, entries) in zip(batch, results, strict=True):
                if self._channels.get(ch.name) is not ch:
                    continue
                try:
                    self._apply_fill(ch, epoch, entries)
                except Exception:
                    # Never leave a channel holding events forever.
                    log.exception("gap fill failed on %r", ch.name)
                    if ch.last is None:
                        ch.last = ZERO
                    self._to_fill.discard(ch)
                    self._release(ch)

    async def _read_history(self, batch: list[_Channel]) -> list[tuple[str | None, list[Any]]]:
        """Per channel: its epoch and the entries after its last offset (for a
        channel without one yet: its newest entry, which becomes the baseline)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for ch in batch:
                pipe.get(key_names.channel_epoch(ch.church_id, ch.channel))
                if ch.last is None:
                    pipe.xrevrange(ch.history, "+", "-", count=1)
                else:
                    pipe.xrange(ch.history, f"({ch.last[0]}-{ch.last[1]}", "+")
            replies = await pipe.execute()
        results: list[tuple[str | None, list[Any]]] = []
        stale: list[int] = []
        for i, ch in enumerate(batch):
            raw_epoch, entries = replies[2 * i], replies[2 * i + 1]
            epoch = raw_epoch.decode() if isinstance(raw_epoch, bytes) else raw_epoch
            if ch.last is not None and None not in (epoch, ch.epoch) and epoch != ch.epoch:
                stale.append(i)  # history recreated: all of it is news, whatever its offsets
            results.append((epoch, entries))
        if stale:
            async with self._redis.pipeline(transaction=False) as pipe:
                for i in stale:
                    pipe.xrange(batch[i].history, "-", "+")
                for i, entries in zip(stale, await pipe.execute(), strict=True):
                    results[i] = (results[i][0], entries)
        return results

    def _apply_fill(self, ch: _Channel, epoch: str | None, entries: list[Any]) -> None:
        if ch.last is None:
            ch.epoch = epoch
            ch.last = position(entries[0][0]) if entries else ZERO
        elif epoch is not None:
            for entry_id, fields in entries:
                entry = entry_from_stream(entry_id, fields)
                frame = frame_bytes(ch.channel, entry.offset, entry.event_json)
                self._accept(ch, _event(ch.channel, entry.type, epoch, entry.offset, frame))
        if ch in self._to_fill:
            return  # reconnected again meanwhile: keep holding until that gap is read
        self._release(ch)

    def _release(self, ch: _Channel) -> None:
        """Deliver the held live events newer than the fill, then go live."""
        held, ch.held = ch.held, None
        for event in held or ():
            self._accept(ch, event)
        ch.ready.set()
