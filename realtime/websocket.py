"""The WebSocket endpoint, ``GET /v1/realtime`` (docs/protocol.md "Realtime over WebSocket").

A raw ASGI app, so the handshake can be refused with HTTP 401 before it is
accepted and the hot path sends the hub's shared frame text with no wrapper in
between. Each connection runs the ASGI task, which receives and answers client
frames; a sender task, which drains the connection's bounded queue onto the
socket, exists only while there is something to send (an idle connection holds
no task of its own: memory per connection, see bench/connections.py). Nothing
else is created per connection or per event.

Served by the lean route (``realtime.routes.realtime_lean_routes``: uvicorn's
``LeanWSProtocol`` sends straight to the socket, nothing wraps it), an event the
hub delivers while the connection's queue is empty is written there and then,
from the hub's reader (``_Session.write_now``): no task, no ASGI message. Only
what cannot be written at once (the client reads slowly and the transport has
paused writing) is queued, and everything after it queues behind it, so frames
keep their order and the queue's limit still closes a slow consumer.

Credentials: the connection is watched by the hub's ``Revocations`` for as long
as it lives, and closes with 4001 when its session or API key is revoked (on
any node) or its session's TTL runs out (``realtime.revocation``).

Typing (``realtime.typing_indicator``): a session's ``typing`` frame for a conversation
of its church publishes ``conversation.typing`` (at most once a second per
conversation, more dropped silently); a conversation that is not the church's,
or does not exist, answers ``forbidden``, and so does any typing frame from an
API key, which has no user to name.

Who is here (``realtime.presence``): a connection of a staff session counts its
user online from the moment it is accepted until it ends; its ``viewing`` frame
(``{"conversation_id": <id> | null}``) names the one conversation it views,
authorized like typing (``forbidden`` for API keys and for a conversation that is
not the church's, the view unchanged). Leaving is a null, or closing.

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
import secrets
import uuid
from collections.abc import Awaitable, Coroutine, Iterable
from typing import Any

from redis.exceptions import RedisError
from starlette.types import Message, Receive, Scope, Send

from realtime import channels
from realtime.channels import ChannelRef
from realtime.close_codes import CloseCode
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
    Viewing,
    Welcome,
    decode_client,
    encode_text,
)
from realtime.handshake import authenticate, lifetime, refuse_websocket
from realtime.history import recover
from realtime.hub import Hub, HubEvent
from realtime.presence import Presence, presence_of
from realtime.protocol import WIRE, LeanWSProtocol
from realtime.typing_indicator import TypingGate, publish_typing
from storage.domain.events import frame_bytes
from storage.pg.credentials import Principal
from storage.process.metrics import RealtimeMetrics
from storage.process.services import Services

HEARTBEAT_S = 25
SUBSCRIBE_TIMEOUT_S = 10.0
"""A subscription Redis cannot confirm in this time answers ``unavailable``."""


# A C-level getter: the per-event, per-connection step of the hot path.
def _same_event(event: HubEvent) -> HubEvent:
    """Queue the shared event itself: the sender writes its prebuilt wire frame."""
    return event


def _measured(services: Services | None) -> RealtimeMetrics | None:
    """The WebSocket series of this process, None when it measures nothing."""
    metrics = getattr(services, "metrics", None)
    return metrics.realtime("websocket") if metrics is not None else None


_SCOPE_KEPT = ("type", "path", "app")


def _spend(scope: Scope) -> None:
    """Empty the handshake's scope once the connection is accepted: the server, its
    wrappers and this endpoint keep the dict for the connection's life, and nothing
    reads it again on the lean route (no middleware ends with it), but its headers,
    nested dicts and table were ~3 KB per idle connection (bench/connections.py).
    ``clear`` gives the table back; popping keys would not."""
    kept = {key: scope[key] for key in _SCOPE_KEPT if key in scope}
    scope.clear()
    scope.update(kept)


def _finish(task: asyncio.Task[None]) -> None:
    """Stop a helper task without awaiting it (awaiting a cancelled task cannot be
    told apart from our own cancellation); a failure it ended with is consumed:
    a failed send only means the client went away."""
    if not task.done():
        task.cancel()
    elif not task.cancelled():
        task.exception()


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
            session.conn.close(CloseCode.DRAINING)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._empty.wait(), timeout_s)
        return count


class RealtimeEndpoint:
    """ASGI app for ``WebSocketRoute("/v1/realtime", RealtimeEndpoint())``."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Coroutine[Any, Any, None]:
        # Not a coroutine function: it hands back the session's own coroutine, so an
        # idle connection holds one frame of ours (memory: bench/connections.py).
        return _Session(receive, send, self.limits).serve(scope)


class _Session:
    __slots__ = (
        "conn",
        "drained",
        "ended",
        "hub",
        "loop",
        "measured",
        "presence",
        "principal",
        "protocol",
        "receive",
        "send",
        "sender",
        "services",
        "sessions",
        "typing",
    )
    hub: Hub
    principal: Principal
    services: Services

    def __init__(self, receive: Receive, send: Send, limits: Limits) -> None:
        self.receive = receive
        self.send = send
        self.loop = asyncio.get_running_loop()
        self.conn: Connection[str | HubEvent] = Connection(
            secrets.token_urlsafe(12),
            limits,
            convert=_same_event,
            wake=self._wake,
            now=self.loop.time(),
        )
        # Resolved by the sender when a replay waiting for room may continue.
        self.drained: asyncio.Future[None] | None = None
        # Runs only while the queue has frames (or a close is to be written).
        self.sender: asyncio.Task[None] | None = None
        # Set when a write failed (the client is gone) or the session ended: no more senders.
        self.ended = False
        # Created on the first typing frame.
        self.typing: TypingGate | None = None
        # The node's open sessions, once this one is counted among them.
        self.sessions: Sessions | None = None
        # Who is here: set once the connection is open (and so to be closed there).
        self.presence: Presence | None = None
        # This process's WebSocket series, None when it measures nothing.
        self.measured: RealtimeMetrics | None = None
        # uvicorn's protocol, when ``send`` is its own (the lean route: nothing wraps
        # the frames): events are then written from the hub's delivery (``write_now``).
        self.protocol: LeanWSProtocol | None = None

    async def serve(self, scope: Scope) -> None:
        """The whole connection: handshake, then client frames until it ends. The
        loop is here, not in a coroutine of its own: one frame per idle connection."""
        if not await self._open(scope):
            return
        conn, receive, principal, hub = self.conn, self.receive, self.principal, self.hub
        self._reply(Welcome(connection_id=conn.id, heartbeat_s=HEARTBEAT_S))
        try:
            while conn.close_code is None:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    break
                work = self._on_message(message)
                if work is not None:
                    await work
                    # A finished coroutine still holds its frame: ~350 bytes kept by
                    # every idle connection that last subscribed (bench/connections.py).
                    work = None
            sender = self.sender
            if conn.close_code is not None and sender is not None and not sender.done():
                with contextlib.suppress(Exception):  # the client may be gone already
                    await sender  # it writes the close frame
        finally:
            self.ended = True
            church_id = principal.church_id
            for subscription in conn.subscriptions.values():
                hub.unsubscribe(church_id, subscription.channel, subscription)
            conn.subscriptions.clear()
            hub.revocations.unwatch(principal, conn)
            if self.presence is not None:
                self.presence.close(church_id, conn.id)
            if self.sessions is not None:
                self.sessions.discard(self)
            if self.sender is not None:
                _finish(self.sender)
            if (measured := self.measured) is not None:
                measured.connections.dec()

    async def _open(self, scope: Scope) -> bool:
        """Authenticate and accept (True), or refuse (401 before the upgrade; 4029
        beyond the node's or church's limits)."""
        receive, send = self.receive, self.send
        if scope["type"] != "websocket" or (await receive())["type"] != "websocket.connect":
            return False
        state = scope["app"].state
        services: Services = state.services
        principal = await authenticate(scope, services, websocket=True)
        expires_in = None
        if principal is not None:
            expires_in = await lifetime(services, principal)
            if expires_in == 0:
                principal = None  # a ticket whose session has ended since
        if principal is None:
            await refuse_websocket(scope, send)
            return False
        await send({"type": "websocket.accept"})
        self.services, self.principal = services, principal
        self.measured = _measured(services)
        protocol = getattr(send, "__self__", None)
        if isinstance(protocol, LeanWSProtocol):
            self.protocol = protocol
            self.conn.direct = self
            _spend(scope)
        self.hub = hub = state.hub
        self.sessions = sessions = getattr(state, "sessions", None)
        if sessions is not None and not sessions.add(self):
            self.sessions = None
            await send({"type": "websocket.close", "code": CloseCode.TOO_MANY})
            return False
        revocations = hub.revocations
        revocations.pool = getattr(services, "pool", None)
        # Revoked in the moment since authenticating: closes at once.
        revocations.watch(principal, self.conn, expires_in=expires_in)
        if (measured := self.measured) is not None:
            measured.connections.inc()
        self.presence = presence = presence_of(state)
        presence.open(principal.church_id, self.conn.id, principal.user_id)
        return True

    # -- sending ---------------------------------------------------------------

    def write_now(self, item: str | HubEvent) -> bool:
        """An event written to the socket from the hub's delivery, while nothing is
        queued (``Connection.direct``): most events of a live connection go out here,
        with no task, coroutine or ASGI message; a paused transport (the client reads
        slowly) refuses, and the event is queued behind which the sender waits, so
        the queue's limit still closes a slow consumer (4008). Replies stay queued:
        they are rare, and wsproto frames them."""
        protocol = self.protocol
        if protocol is None or self.ended or isinstance(item, str):
            return False
        if not protocol.write_now(item.wire):
            return False
        if (measured := self.measured) is not None:
            measured.written(1, None if item.ephemeral else item.position)
        return True

    def _wake(self) -> None:
        """The queue became non-empty or the connection is closing: start a sender
        unless one is running (it runs until the queue is empty)."""
        sender = self.sender
        if (sender is None or sender.done()) and not self.ended:
            self.sender = self.loop.create_task(self._send_loop())

    async def _send_loop(self) -> None:
        conn, queue, send = self.conn, self.conn.queue, self.send
        low_water = conn.limits.send_queue // 4
        # Live events written in this burst, and the last one's offset (metrics).
        events, position = 0, None
        try:
            while queue:
                item = queue.popleft()
                if isinstance(item, str):
                    await send({"type": "websocket.send", "text": item})
                else:
                    await send({"type": "websocket.send", "text": item.text, WIRE: item.wire})
                    events += 1
                    if not item.ephemeral:
                        position = item.position
                drained = self.drained
                if drained is not None and len(queue) <= low_water and not drained.done():
                    drained.set_result(None)
            # No await between the last check of the queue and returning: a frame
            # queued after it finds this task done and starts another.
            conn.release()
            measured = self.measured if events or conn.close_code else None
            if measured is not None:
                measured.written(events, position)
            if conn.close_code is not None:
                if measured is not None and conn.close_code == CloseCode.SLOW_CONSUMER:
                    measured.slow_consumer_closes.inc()
                self.ended = True
                await send({"type": "websocket.close", "code": conn.close_code})
        except Exception:
            # A failed write means the client is gone; the receive side sees it too.
            self.ended = True
            conn.queue.clear()
        finally:
            if self.drained is not None and not self.drained.done():
                self.drained.set_result(None)
            # A finished task still holds its coroutine and context (~750 bytes per
            # idle connection); the next frame starts a new one.
            if self.sender is asyncio.current_task():
                self.sender = None

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

    def _on_message(self, message: Message) -> Awaitable[None] | None:
        """Answer one client message; what needs I/O (subscribe, typing) comes back
        as an awaitable, so frames are still handled one at a time, in order."""
        if message["type"] != "websocket.receive":
            return None
        conn = self.conn
        data: str | bytes | None = message.get("text")
        if data is None:
            data = message.get("bytes") or b""
        size = len(data)
        if size > conn.limits.max_frame_bytes // 4 and isinstance(data, str):
            # A character is at most 4 UTF-8 bytes: only long text needs encoding to measure.
            size = len(data.encode())
        if not conn.accept_frame(size, self.loop.time()):
            if conn.close_code is None:
                self._reply(Error(code="rate_limited", message="too many frames; slow down"))
            return None
        try:
            frame = decode_client(data)
        except BadFrame as exc:
            conn.bad_frame()
            if conn.close_code is None:
                self._reply(Error(code="bad_frame", message=str(exc)))
            return None
        match frame:
            case Subscribe():
                return self._subscribe(frame)
            case Unsubscribe():
                self._unsubscribe(frame)
            case Ping():
                self._reply(Pong(id=frame.id))
            case Typing():
                return self._typing(frame)
            case Viewing():
                return self._viewing(frame)
        return None

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
        if since is not None and (measured := self.measured) is not None:
            measured.resumed(replay.recovered)
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

    async def _may_see(self, conversation_id: uuid.UUID) -> bool:
        """Whether the connection's church owns the conversation (its channel may be
        read); else a ``forbidden`` error frame, and False."""
        name = f"conversation:{conversation_id}"
        ref = ChannelRef(kind="conversation", id=conversation_id, name=name)
        try:
            await channels.authorize(self.services, self.principal, ref)
        except ChannelError as exc:
            self._reply(Error(code=exc.code, message=exc.message))
            return False
        return True

    async def _typing(self, frame: Typing) -> None:
        principal, conversation_id = self.principal, frame.conversation_id
        if principal.user_id is None:
            self._reply(Error(code="forbidden", message="only staff sessions send typing"))
            return
        gate = self.typing
        if gate is None:
            gate = self.typing = TypingGate()
        now = self.loop.time()
        if not gate.due(conversation_id, now):
            return  # the indicator is already showing
        if not gate.known(conversation_id) and not await self._may_see(conversation_id):
            return
        gate.sent(conversation_id, now)
        with contextlib.suppress(RedisError, OSError):  # an indicator lost is harmless
            await publish_typing(
                self.services.publisher, principal.church_id, conversation_id, principal.user_id
            )

    async def _viewing(self, frame: Viewing) -> None:
        principal, conversation_id = self.principal, frame.conversation_id
        if principal.user_id is None:
            self._reply(Error(code="forbidden", message="only staff sessions view conversations"))
            return
        if conversation_id is not None and not await self._may_see(conversation_id):
            return
        if self.presence is not None and self.conn.close_code is None:
            self.presence.view(principal.church_id, self.conn.id, conversation_id)

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
