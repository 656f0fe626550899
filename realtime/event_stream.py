"""The SSE endpoint, ``GET /v1/events?channel=inbox&channel=dashboard``.

Same credentials and channels as the WebSocket; each event is sent as
``id: <resume token>``, ``event: <type>``, ``data: <the WebSocket event frame>``
using the hub's shared frame bytes. The resume token records, for every
channel of the stream, the (epoch, offset) sent last: base64url of msgpack,
compact and opaque. ``Last-Event-ID`` (or ``?last_event_id=``) resumes every
channel; the ones that cannot be recovered are named in ``recovery_failed``
before live events.

A raw ASGI response so nothing buffers: each batch of events is one body
message, written as soon as it is queued. One more task per stream waits for
the client to go away.

A stream whose credentials are revoked or whose session expires meanwhile just
ends (``realtime.revocation``); reconnecting with them answers 401.

A staff session's stream counts as the user being online for as long as it is
open (``realtime.presence``); an SSE client cannot send ``viewing`` frames.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import secrets
from urllib.parse import parse_qsl

import msgspec
from redis.exceptions import RedisError
from starlette.types import Message, Receive, Scope, Send

from realtime import channels
from realtime.close_codes import CloseCode
from realtime.connection import Connection, Limits
from realtime.errors import ChannelError, HubStopped
from realtime.handshake import authenticate, header, lifetime, send_error
from realtime.history import Replay, position, recover
from realtime.hub import Hub, HubEvent
from realtime.presence import Presence, presence_of
from storage.domain.envelope import FieldError
from storage.domain.events import frame_bytes
from storage.pg.credentials import Principal
from storage.process.services import Services

KEEPALIVE_S = 15.0
SUBSCRIBE_TIMEOUT_S = 10.0

Mark = tuple[str, int, int]
"""A channel's resume point: epoch, offset ms, offset seq."""

_token_encoder = msgspec.msgpack.Encoder()
_token_decoder: msgspec.msgpack.Decoder[dict[str, Mark]] = msgspec.msgpack.Decoder(dict[str, Mark])
_json = msgspec.json.Encoder()

_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


def encode_token(marks: dict[str, Mark]) -> bytes:
    return base64.urlsafe_b64encode(_token_encoder.encode(marks)).rstrip(b"=")


def decode_token(token: str) -> dict[str, Mark] | None:
    """The marks in a resume token; None when it is not one of ours."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        return _token_decoder.decode(raw)
    except (binascii.Error, ValueError, msgspec.DecodeError):
        return None


def _record(token: bytes, event: bytes, data: bytes) -> bytes:
    if b"\n" in data:  # SSE ends a field at a newline; frames have none, but never break the stream
        data = data.replace(b"\n", b"\ndata: ")
    return b"id: " + token + b"\nevent: " + event + b"\ndata: " + data + b"\n\n"


class EventStreamEndpoint:
    """ASGI app for ``Route("/v1/events", EventStreamEndpoint(), methods=["GET"])``."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = scope["app"].state
        services: Services = state.services
        principal = await authenticate(scope, services, websocket=False)
        expires_in = None
        if principal is not None:
            expires_in = await lifetime(services, principal)
            if expires_in == 0:
                principal = None  # a ticket whose session has ended since
        if principal is None:
            await send_error(send, "unauthorized", "missing or invalid credentials")
            return
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        requested = list(dict.fromkeys(value for key, value in query if key == "channel"))
        if not requested or len(requested) > self.limits.max_subscriptions:
            detail = f"between 1 and {self.limits.max_subscriptions} channels"
            await send_error(
                send, "validation_error", detail, details=[FieldError("channel", detail)]
            )
            return
        try:
            names = [(await channels.resolve(services, principal, n)).name for n in requested]
        except ChannelError as exc:
            # Unknown and forbidden alike: a stream cannot reveal what exists.
            await send_error(send, "forbidden", exc.message)
            return
        token = header(scope, b"last-event-id")
        if token is None:
            token = next((value for key, value in query if key == "last_event_id"), None)
        resume = None if token is None else (decode_token(token) or {})
        stream = _Stream(
            receive, send, services, state.hub, principal, self.limits, presence_of(state)
        )
        hub: Hub = state.hub
        revocations = hub.revocations
        revocations.pool = getattr(services, "pool", None)
        revocations.watch(principal, stream.conn, expires_in=expires_in)
        try:
            await stream.run(
                list(dict.fromkeys(names)), resume, head_only=scope["method"] == "HEAD"
            )
        finally:
            revocations.unwatch(principal, stream.conn)


class _Stream:
    def __init__(
        self,
        receive: Receive,
        send: Send,
        services: Services,
        hub: Hub,
        principal: Principal,
        limits: Limits,
        presence: Presence,
    ) -> None:
        self.receive = receive
        self.presence = presence
        self.send = send
        self.services = services
        self.hub = hub
        self.principal = principal
        self.wakeup = asyncio.Event()
        self.disconnected = False
        metrics = getattr(services, "metrics", None)
        self.measured = metrics.realtime("sse") if metrics is not None else None
        # Per channel, the (epoch, offset) last written: what the next id encodes.
        self.marks: dict[str, Mark] = {}
        self.conn: Connection[HubEvent] = Connection(
            secrets.token_urlsafe(12),
            limits,
            convert=lambda event: event,
            wake=self.wakeup.set,
            now=asyncio.get_running_loop().time(),
        )

    async def run(self, names: list[str], resume: dict[str, Mark] | None, head_only: bool) -> None:
        if self.conn.close_code is not None:  # revoked since authenticating
            await send_error(self.send, "unauthorized", "credentials revoked")
            return
        if head_only:
            await self.send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
            await self.send({"type": "http.response.body", "body": b""})
            return
        church_id = self.principal.church_id
        subscriptions = [self.conn.open(name) for name in names]
        watcher: asyncio.Task[None] | None = None
        counted = False
        present = False
        try:
            try:
                async with asyncio.timeout(SUBSCRIBE_TIMEOUT_S):
                    for subscription in subscriptions:
                        await self.hub.subscribe(church_id, subscription.channel, subscription)
                    replays = [await self._replay(name, resume) for name in names]
            except (RedisError, OSError, HubStopped, TimeoutError):
                await send_error(self.send, "unavailable", "try again shortly")
                return
            await self.send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
            if self.measured is not None:
                self.measured.connections.inc()
                counted = True
            # Present from the moment the stream answers until it ends (staff online).
            self.presence.open(church_id, self.conn.id, self.principal.user_id)
            present = True
            watcher = asyncio.create_task(self._watch_disconnect())
            await self._open(names, replays, resume)
            for subscription, replay in zip(subscriptions, replays, strict=True):
                subscription.go_live(replay.epoch, replay.position)
            await self._pump()
        finally:
            for subscription in subscriptions:
                self.hub.unsubscribe(church_id, subscription.channel, subscription)
            if present:
                self.presence.close(church_id, self.conn.id)
            if counted and self.measured is not None:
                self.measured.connections.dec()
            if watcher is not None:
                watcher.cancel()  # not awaited: that would mask our own cancellation
                if not self.disconnected:
                    with contextlib.suppress(Exception):
                        await self.send({"type": "http.response.body", "body": b""})

    async def _replay(self, name: str, resume: dict[str, Mark] | None) -> Replay:
        mark = None if resume is None else resume.get(name)
        since = None
        if mark is not None:
            since = (f"{mark[1]}-{mark[2]}", mark[0])
        elif resume is not None:
            # Resuming a stream that did not have this channel: nothing to recover from.
            since = ("", "")
        return await recover(
            self.services.redis, self.services.publisher, self.principal.church_id, name, since
        )

    async def _open(
        self, names: list[str], replays: list[Replay], resume: dict[str, Mark] | None
    ) -> None:
        """``ready``, then what each channel missed, then ``recovery_failed``."""
        marks = self.marks
        for name, replay in zip(names, replays, strict=True):
            start = resume.get(name) if resume is not None and replay.recovered else None
            marks[name] = start if start is not None else (replay.epoch, *replay.position)
        ready = _json.encode({"channels": names})
        records = [_record(encode_token(marks), b"ready", ready)]
        for name, replay in zip(names, replays, strict=True):
            for entry in replay.entries:
                marks[name] = (replay.epoch, *position(entry.offset))
                frame = frame_bytes(name, entry.offset, entry.event_json)
                records.append(_record(encode_token(marks), entry.type.encode(), frame))
        failed = [
            n for n, r in zip(names, replays, strict=True) if resume is not None and not r.recovered
        ]
        if resume is not None and self.measured is not None:
            for replay in replays:
                self.measured.resumed(replay.recovered)
        if failed:
            data = _json.encode({"channels": failed})
            records.append(_record(encode_token(marks), b"recovery_failed", data))
        await self._write(b"".join(records))

    async def _pump(self) -> None:
        conn, wakeup, marks = self.conn, self.wakeup, self.marks
        while True:
            if not conn.queue and conn.close_code is None and not self.disconnected:
                wakeup.clear()
                try:
                    async with asyncio.timeout(KEEPALIVE_S):
                        await wakeup.wait()
                except TimeoutError:
                    await self._write(b": keepalive\n\n")
                    continue
            if self.disconnected or conn.close_code is not None:
                # A slow consumer's stream just ends: it resumes with Last-Event-ID.
                if conn.close_code == CloseCode.SLOW_CONSUMER and self.measured is not None:
                    self.measured.slow_consumer_closes.inc()
                return
            records = []
            queue = conn.queue
            position = None
            while queue:
                event = queue.popleft()
                marks[event.channel] = (event.epoch, *event.position)
                records.append(_record(encode_token(marks), event.type.encode(), event.frame))
                if not event.ephemeral:
                    position = event.position
            conn.release()
            await self._write(b"".join(records))
            if self.measured is not None:
                self.measured.written(len(records), position)

    async def _write(self, body: bytes) -> None:
        await self.send({"type": "http.response.body", "body": body, "more_body": True})

    async def _watch_disconnect(self) -> None:
        while True:
            message: Message = await self.receive()
            if message["type"] == "http.disconnect":
                self.disconnected = True
                self.wakeup.set()
                return
