"""Per-connection state, with no I/O: subscriptions, offsets, the send queue, limits.

The WebSocket and SSE endpoints pump it: the hub delivers events into a
connection's ``Subscription`` sinks, which append to one bounded send queue;
the endpoint's sender drains the queue onto the socket. Everything here is
synchronous and deterministic (time is passed in), so it is tested without
sockets.

Close codes (realtime/close_codes.py, docs/protocol.md): decisions that end a
connection set ``close_code``; the endpoint sends it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

import msgspec

from realtime.close_codes import CloseCode
from realtime.history import ZERO, Position
from realtime.hub import HubEvent

T = TypeVar("T")
T_contra = TypeVar("T_contra", contravariant=True)

_IDLE: deque[Any] = deque(maxlen=0)
"""The queue of every connection with nothing to send: a deque costs ~760 bytes
even empty, so one is made when a connection has something to queue and dropped
when its sender has emptied it (memory per idle connection: bench/connections.py)."""


class Limits(msgspec.Struct, frozen=True, kw_only=True):
    send_queue: int = 1000
    """Frames waiting to be written; one more marks a slow consumer (4008)."""
    max_subscriptions: int = 100
    """Channels per connection (WebSocket) or per stream (SSE)."""
    frame_rate: float = 20.0
    """Client frames per second, sustained."""
    frame_burst: float = 100.0
    """Client frames allowed at once (a dashboard subscribing to many channels)."""
    max_rate_limited: int = 50
    """Frames refused for rate before the connection is closed (4029)."""
    max_bad_frames: int = 10
    """Malformed frames before the connection is closed (1008)."""
    max_frame_bytes: int = 65_536
    """Largest client frame (1009 above)."""


class DirectWriter(Protocol[T_contra]):
    def write_now(self, item: T_contra) -> bool:
        """Write ``item`` to the client now if that needs no waiting (True), else
        leave it to be queued (False). Called only while nothing is queued."""


class Connection(Generic[T]):
    """One client's state. ``T`` is what the send queue holds: text frames for a
    WebSocket, ``HubEvent``s for SSE (whose ids are computed as they are sent)."""

    __slots__ = (
        "_refilled_at",
        "_tokens",
        "_wake",
        "bad_frames",
        "close_code",
        "convert",
        "direct",
        "id",
        "limits",
        "queue",
        "rate_limited",
        "subscriptions",
    )

    def __init__(
        self,
        connection_id: str,
        limits: Limits,
        *,
        convert: Callable[[HubEvent], T],
        wake: Callable[[], None],
        now: float,
    ) -> None:
        self.id = connection_id
        self.limits = limits
        # Turns a shared HubEvent into this connection's queue item without copying.
        self.convert = convert
        # Called when the queue goes from empty to non-empty, or on close: wakes the sender.
        self._wake = wake
        # Frames waiting to be written; the shared empty _IDLE while there are none.
        self.queue: deque[T] = _IDLE
        # Takes an item straight to the socket while the queue is _IDLE (no sender
        # holds a frame, so nothing can be overtaken); None: always queue.
        self.direct: DirectWriter[T] | None = None
        self.subscriptions: dict[str, Subscription[T]] = {}
        self.close_code: CloseCode | None = None
        self.bad_frames = 0
        self.rate_limited = 0
        self._tokens = limits.frame_burst
        self._refilled_at = now

    # -- sending ---------------------------------------------------------------

    def push(self, item: T) -> None:
        """Queue one outgoing item; overflowing the queue closes with 4008."""
        if self.close_code is not None:
            return
        queue = self.queue
        if queue is _IDLE:
            direct = self.direct
            if direct is not None and direct.write_now(item):
                return
            queue = self.queue = deque()
        elif len(queue) >= self.limits.send_queue:
            self.close(CloseCode.SLOW_CONSUMER, drop=True)
            return
        queue.append(item)
        if len(queue) == 1:
            self._wake()

    def release(self) -> None:
        """The sender emptied the queue: give its memory back until the next frame."""
        if not self.queue:
            self.queue = _IDLE

    @property
    def room(self) -> int:
        """Items that can still be queued before the connection overflows."""
        return self.limits.send_queue - len(self.queue)

    def close(self, code: CloseCode, *, drop: bool = False) -> None:
        """Decide to close; the first decision wins. Frames already queued are still
        sent first (an error frame explains the close), unless ``drop``: a slow
        consumer's backlog is what we are closing it for."""
        if self.close_code is not None:
            return
        self.close_code = code
        if drop:
            self.queue.clear()
        self._wake()

    def revoke(self) -> None:
        """Credentials revoked or expired: close with 4001, sending nothing more."""
        self.close(CloseCode.REVOKED, drop=True)

    # -- receiving -------------------------------------------------------------

    def accept_frame(self, size: int, now: float) -> bool:
        """Whether to process a client frame of ``size`` bytes arriving at ``now``.

        Too large closes (1009). Over the rate the frame is refused (the endpoint
        answers ``rate_limited``) and, refused too often, the connection closes (4029).
        """
        if size > self.limits.max_frame_bytes:
            self.close(CloseCode.TOO_BIG)
            return False
        limits = self.limits
        tokens = min(
            limits.frame_burst, self._tokens + (now - self._refilled_at) * limits.frame_rate
        )
        self._refilled_at = now
        if tokens < 1.0:
            self._tokens = tokens
            self.rate_limited += 1
            if self.rate_limited >= limits.max_rate_limited:
                self.close(CloseCode.TOO_MANY)
            return False
        self._tokens = tokens - 1.0
        return True

    def bad_frame(self) -> None:
        """Count a malformed frame; the endpoint answers it unless this one closed (1008)."""
        self.bad_frames += 1
        if self.bad_frames >= self.limits.max_bad_frames:
            self.close(CloseCode.POLICY)

    # -- subscriptions ---------------------------------------------------------

    def can_subscribe(self, channel: str) -> bool:
        return (
            channel in self.subscriptions or len(self.subscriptions) < self.limits.max_subscriptions
        )

    def open(self, channel: str) -> Subscription[T]:
        """A new subscription, holding events until ``go_live``; replaces any
        previous one to the same channel (the caller unsubscribes that from the hub)."""
        subscription = Subscription(self, channel)
        self.subscriptions[channel] = subscription
        return subscription

    def drop(self, channel: str) -> Subscription[T] | None:
        return self.subscriptions.pop(channel, None)


class Subscription(Generic[T]):
    """A connection's sink for one channel (``realtime.hub.Sink``).

    Until ``go_live`` it holds events, so that history can be read and sent
    first; afterwards it passes on events newer than the last one it passed on.

    An ephemeral event (typing) passes only while live and only when its offset
    is the one the subscription stands at: it repeats the channel's latest
    stored offset, so a client that keeps the offset of every frame it reads
    never moves backwards, and ``since`` set from it recovers exactly what
    followed. One that is older (published before the replay this subscription
    started from) or comes while events are held is dropped.
    """

    __slots__ = ("channel", "connection", "epoch", "pending", "position")

    def __init__(self, connection: Connection[T], channel: str) -> None:
        self.connection = connection
        self.channel = channel
        self.epoch = ""
        self.position: Position = ZERO
        self.pending: list[HubEvent] | None = []

    def deliver(self, event: HubEvent) -> None:
        pending = self.pending
        if event.ephemeral:
            if pending is None and event.position == self.position and event.epoch == self.epoch:
                connection = self.connection
                connection.push(connection.convert(event))
            return
        if pending is not None:
            if len(pending) >= self.connection.limits.send_queue:
                self.connection.close(CloseCode.SLOW_CONSUMER, drop=True)
            else:
                pending.append(event)
            return
        # The hub delivers in order and once, but a subscription that started from
        # history may be handed events it already sent while the hub fills a gap.
        if event.position <= self.position and event.epoch == self.epoch:
            return
        self.epoch = event.epoch
        self.position = event.position
        connection = self.connection
        connection.push(connection.convert(event))

    def go_live(self, epoch: str, position: Position) -> None:
        """Start passing events on, after (epoch, position): what the client has."""
        self.epoch = epoch
        self.position = position
        pending, self.pending = self.pending, None
        for event in pending or ():
            self.deliver(event)
