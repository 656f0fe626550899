"""The WebSocket endpoint, ``GET /v1/realtime`` (PROTOCOL.md "Realtime over WebSocket").

A raw ASGI app, so the handshake can be refused with HTTP 401 before it is
accepted and the hot path sends the hub's shared frame text with no wrapper in
between. Each connection runs two coroutines: the ASGI task, which receives
and answers client frames, and one sender task, which drains the connection's
bounded queue onto the socket. Nothing else is created per connection or per
event.

Subscribing is race-free: the subscription is registered with the hub first
(it holds live events), then history is read and replayed, then ``subscribed``
is queued and the held events newer than the replay are released.

Heartbeats are the server's WebSocket pings (uvicorn: ``ws_ping_interval``;
the assembly sets it to ``HEARTBEAT_S``). The assembly should also set
``ws_max_size`` to ``Limits.max_frame_bytes`` so oversized frames are refused by
the protocol layer before they are buffered; the endpoint enforces it too.
"""

from __future__ import annotations

import asyncio
import contextlib
import operator
import secrets
import uuid
from collections.abc import Callable, Iterable
from typing import cast

from redis.exceptions import RedisError
from starlette.types import Receive, Scope, Send

from realtime import channels
from realtime.connection import Connection, Limits
from realtime.errors import ChannelError, HubStopped
from realtime.frames import (
    BadFrame,
    Error,
    Ping,
    Pong,
    ServerFrame,
    Subscribe,
    Subscribed,
    Typing,
    Unsubscribe,
    Unsubscribed,
    Welcome,
    decode_client,
    encode_text,
)
from realtime.handshake import authenticate, refuse_websocket
from realtime.history import recover
from realtime.hub import Hub, HubEvent
from storage.credentials import Principal
from storage.events import frame_bytes
from storage.services import Services

HEARTBEAT_S = 25
SUBSCRIBE_TIMEOUT_S = 10.0
"""A subscription Redis cannot confirm in this time answers ``unavailable``."""

# A C-level getter: the per-event, per-connection step of the hot path.
_text_of = cast(Callable[[HubEvent], str], operator.attrgetter("text"))


def _finish(task: asyncio.Task[None]) -> None:
    """Stop a helper task without awaiting it (awaiting a cancelled task cannot be
    told apart from our own cancellation); a failure it ended with is consumed:
    a failed send only means the client went away."""
    if not task.done():
        task.cancel()
    elif not task.cancelled():
        task.exception()


CLOSE_DRAINING = 1001
CLOSE_TOO_MANY = 4029


class Sessions:
    """A node's open WebSocket sessions: counted against the node's and each
    church's limits (4029 beyond them), and closed with 1001 when the server
    shuts down (clients reconnect elsewhere and recover with ``since``)."""

    def __init__(self, *, max_total: int = 20_000, max_per_church: int = 2_000) -> None:
        self._open: set[_Session] = set()
        self._per_church: dict[uuid.UUID, int] = {}
        self._max_total = max_total
        self._max_per_church = max_per_church
        self._empty = asyncio.Event()
        self._empty.set()

    def __len__(self) -> int:
        return len(self._open)

    def add(self, session: _Session) -> bool:
        """Admit the session; False when a limit is reached (it is not added)."""
        church = session.principal.church_id
        held = self._per_church.get(church, 0)
        if len(self._open) >= self._max_total or held >= self._max_per_church:
            return False
        self._open.add(session)
        self._per_church[church] = held + 1
        self._empty.clear()
        return True

    def discard(self, session: _Session) -> None:
        if session not in self._open:
            return
        self._open.discard(session)
        church = session.principal.church_id
        left = self._per_church[church] - 1
        if left:
            self._per_church[church] = left
        else:
            del self._per_church[church]
        if not self._open:
            self._empty.set()

    async def drain(self, timeout_s: float) -> int:
        """Close every session with 1001 and wait (at most ``timeout_s``) for them to
        end; returns how many were open."""
        count = len(self._open)
        for session in list(self._open):
            session.conn.close(CLOSE_DRAINING)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._empty.wait(), timeout_s)
        return count


class RealtimeEndpoint:
    """ASGI app for ``WebSocketRoute("/v1/realtime", RealtimeEndpoint())``."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket" or (await receive())["type"] != "websocket.connect":
            return
        state = scope["app"].state
        services: Services = state.services
        principal = await authenticate(scope, services, websocket=True)
        if principal is None:
            await refuse_websocket(scope, send)
            return
        await send({"type": "websocket.accept"})
        session = _Session(receive, send, services, state.hub, principal, self.limits)
        sessions: Sessions | None = getattr(state, "sessions", None)
        if sessions is None:
            await session.run()
            return
        if not sessions.add(session):
            await send({"type": "websocket.close", "code": CLOSE_TOO_MANY})
            return
        try:
            await session.run()
        finally:
            sessions.discard(session)


class _Session:
    __slots__ = (
        "conn",
        "drained",
        "hub",
        "loop",
        "principal",
        "receive",
        "send",
        "sender",
        "services",
        "wakeup",
    )

    def __init__(
        self,
        receive: Receive,
        send: Send,
        services: Services,
        hub: Hub,
        principal: Principal,
        limits: Limits,
    ) -> None:
        self.receive = receive
        self.send = send
        self.services = services
        self.hub = hub
        self.principal = principal
        self.loop = asyncio.get_running_loop()
        # Set by the connection when its queue becomes non-empty or it closes.
        self.wakeup = asyncio.Event()
        self.conn: Connection[str] = Connection(
            secrets.token_urlsafe(12),
            limits,
            convert=_text_of,
            wake=self.wakeup.set,
            now=self.loop.time(),
        )
        # Resolved by the sender when a replay waiting for room may continue.
        self.drained: asyncio.Future[None] | None = None
        self.sender: asyncio.Task[None] | None = None

    async def run(self) -> None:
        conn = self.conn
        self._reply(Welcome(connection_id=conn.id, heartbeat_s=HEARTBEAT_S))
        self.sender = sender = asyncio.create_task(self._send_loop())
        try:
            await self._receive_loop()
            if conn.close_code is not None and not sender.done():
                with contextlib.suppress(Exception):  # the client may be gone already
                    await sender  # it writes the close frame
        finally:
            church_id = self.principal.church_id
            for subscription in conn.subscriptions.values():
                self.hub.unsubscribe(church_id, subscription.channel, subscription)
            conn.subscriptions.clear()
            _finish(sender)

    # -- sending ---------------------------------------------------------------

    async def _send_loop(self) -> None:
        conn, queue, send, wakeup = self.conn, self.conn.queue, self.send, self.wakeup
        low_water = conn.limits.send_queue // 4
        try:
            while True:
                while queue:
                    await send({"type": "websocket.send", "text": queue.popleft()})
                    drained = self.drained
                    if drained is not None and len(queue) <= low_water and not drained.done():
                        drained.set_result(None)
                if conn.close_code is not None:
                    await send({"type": "websocket.close", "code": conn.close_code})
                    return
                wakeup.clear()
                await wakeup.wait()
        finally:
            if self.drained is not None and not self.drained.done():
                self.drained.set_result(None)

    def _reply(self, frame: ServerFrame) -> None:
        self.conn.push(encode_text(frame))

    async def _queue_replay(self, frames: Iterable[str]) -> bool:
        """Queue history frames, waiting for the sender whenever the queue is half
        full: a replay (up to the channel's history length) must not overflow it."""
        conn = self.conn
        high_water = conn.limits.send_queue // 2
        for text in frames:
            if len(conn.queue) >= high_water:
                if self.sender is None or self.sender.done():
                    return False
                self.drained = self.loop.create_future()
                try:
                    await self.drained
                finally:
                    self.drained = None
            if conn.close_code is not None:
                return False
            conn.push(text)
        return conn.close_code is None

    # -- receiving -------------------------------------------------------------

    async def _receive_loop(self) -> None:
        conn, loop = self.conn, self.loop
        max_chars = conn.limits.max_frame_bytes // 4
        while conn.close_code is None:
            message = await self.receive()
            kind = message["type"]
            if kind == "websocket.disconnect":
                return
            if kind != "websocket.receive":
                continue
            data: str | bytes | None = message.get("text")
            if data is None:
                data = message.get("bytes") or b""
            size = len(data)
            if size > max_chars and isinstance(data, str):
                # A character is at most 4 UTF-8 bytes: only long text needs encoding to measure.
                size = len(data.encode())
            if not conn.accept_frame(size, loop.time()):
                if conn.close_code is None:
                    self._reply(Error(code="rate_limited", message="too many frames; slow down"))
                continue
            try:
                frame = decode_client(data)
            except BadFrame as exc:
                conn.bad_frame()
                if conn.close_code is None:
                    self._reply(Error(code="bad_frame", message=str(exc)))
                continue
            match frame:
                case Subscribe():
                    await self._subscribe(frame)
                case Unsubscribe():
                    self._unsubscribe(frame)
                case Ping():
                    self._reply(Pong(id=frame.id))
                case Typing():
                    pass  # conversation.typing (realtime-only) is not published yet: issue 5

    async def _subscribe(self, frame: Subscribe) -> None:
        conn, hub, church_id = self.conn, self.hub, self.principal.church_id
        try:
            ref = channels.parse(frame.channel)
            if not conn.can_subscribe(ref.name):
                self._reply(
                    Error(id=frame.id, code="too_many_subscriptions", message="too many channels")
                )
                return
            await channels.authorize(self.services, self.principal, ref)
        except ChannelError as exc:
            self._reply(Error(id=frame.id, code=exc.code, message=exc.message))
            return
        name = ref.name
        previous = conn.drop(name)
        if previous is not None:
            hub.unsubscribe(church_id, name, previous)
        subscription = conn.open(name)
        since = None if frame.since is None else (frame.since.offset, frame.since.epoch)
        try:
            async with asyncio.timeout(SUBSCRIBE_TIMEOUT_S):
                await hub.subscribe(church_id, name, subscription)
                replay = await recover(
                    self.services.redis, self.services.publisher, church_id, name, since
                )
        except (RedisError, OSError, HubStopped, TimeoutError):
            conn.drop(name)
            hub.unsubscribe(church_id, name, subscription)
            self._reply(Error(id=frame.id, code="unavailable", message="try again shortly"))
            return
        if replay.entries:
            texts = (
                frame_bytes(name, entry.offset, entry.event_json).decode()
                for entry in replay.entries
            )
            if not await self._queue_replay(texts):
                return
        self._reply(
            Subscribed(
                id=frame.id,
                channel=name,
                offset=replay.offset,
                epoch=replay.epoch,
                recovered=replay.recovered,
            )
        )
        subscription.go_live(replay.epoch, replay.position)

    def _unsubscribe(self, frame: Unsubscribe) -> None:
        try:
            name = channels.parse(frame.channel).name
        except ChannelError as exc:
            self._reply(Error(id=frame.id, code=exc.code, message=exc.message))
            return
        subscription = self.conn.drop(name)
        if subscription is not None:
            self.hub.unsubscribe(self.principal.church_id, name, subscription)
        self._reply(Unsubscribed(id=frame.id, channel=name))
