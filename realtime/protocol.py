"""The WebSocket protocol uvicorn runs in the web process: uvicorn's wsproto one, leaner.

A web node is to hold 20,000 idle WebSockets at ≤ 20 KB each
(bench/connections.py). Of uvicorn's three implementations, ``wsproto`` holds
the least per connection (no per-connection copy of the handshake's request
and response headers, unlike ``websockets-sansio``; no three tasks, unlike the
legacy ``websockets``). What each idle one still holds that it does not need:

- an ``asyncio.Queue`` for the ASGI receive channel: three deques of ~760
  bytes each, empty nearly always. ``Inbox`` keeps a list only while messages
  wait and one future only while the app waits;
- an ``asyncio.Event`` for write flow control (a deque): ``Writable`` makes a
  future only while the transport is paused;
- the spent HTTP/1.1 upgrade machinery (an ``h11.Connection`` and a deque):
  once ``WSConnection.connection`` exists, wsproto only asks the handshake for
  pending events, which a spent one never has; it is replaced by ``_SPENT``;
- the established connection's deque of pending events, empty but for a peer
  vanishing mid-close: ``_Pending`` keeps a list only while one waits.

``write_now`` writes a frame built once per event (``wire_frame``) from the hub's
delivery, without an ASGI send, while the transport accepts it
(``realtime.websocket``).

Everything else is uvicorn's code unchanged. The two objects are duck-typed
stand-ins for exactly the methods uvicorn 0.54 calls on them (``put_nowait``,
``get``, ``empty``; ``set``, ``clear``, ``wait``): the realtime endpoint tests
run on this class, so an upgrade that changes them fails there first. Select
it with ``uvicorn --ws realtime.protocol:LeanWSProtocol`` (``koinonia web``
does).

pyproject.toml pins ``uvicorn[standard]>=0.54,<0.55`` (the release it was written and
tested on): this
class subclasses ``uvicorn.protocols.websockets.wsproto_impl.WSProtocol`` and
relies on its private attributes (``queue``, ``writable``, ``conn``,
``close_sent``, ``handshake_complete``, ``response_started``), which uvicorn may
change in any 0.x minor release; raise the bound after running
tests/realtime on the new version.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

from uvicorn.protocols.websockets.wsproto_impl import WSProtocol
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection


class Inbox:
    """What uvicorn's protocol uses of an ``asyncio.Queue``, without its deques."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[Any] | None = None
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Any) -> None:
        if self._items is None:
            self._items = [item]
        else:
            self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> Any:
        while not self._items:
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        items = self._items
        item = items.pop(0)
        if not items:
            self._items = None
        return item

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items or ())


class Writable:
    """What uvicorn's protocol uses of an ``asyncio.Event`` (set while the transport
    accepts writes), with a future only while writes are paused."""

    __slots__ = ("_paused",)

    def __init__(self) -> None:
        self._paused: asyncio.Future[None] | None = None

    def is_set(self) -> bool:
        return self._paused is None

    def set(self) -> None:
        paused, self._paused = self._paused, None
        if paused is not None and not paused.done():
            paused.set_result(None)

    def clear(self) -> None:
        if self._paused is None:
            self._paused = asyncio.get_running_loop().create_future()

    async def wait(self) -> bool:
        while (paused := self._paused) is not None:
            await asyncio.shield(paused)
        return True


class _SpentHandshake:
    """Stands in for wsproto's handshake once the connection is established."""

    __slots__ = ()

    def events(self) -> Iterator[Any]:
        return iter(())


_SPENT = _SpentHandshake()


class _Pending:
    """What wsproto's ``Connection`` uses of its ``deque`` of pending events (it
    queues one only when the peer vanishes mid-close): a list only while one waits,
    instead of a deque's ~760 bytes for every idle connection."""

    __slots__ = ("_items",)

    def __init__(self) -> None:
        self._items: list[Any] | None = None

    def append(self, item: Any) -> None:
        if self._items is None:
            self._items = [item]
        else:
            self._items.append(item)

    def popleft(self) -> Any:
        items = self._items
        if not items:
            raise IndexError("pop from an empty queue")
        item = items.pop(0)
        if not items:
            self._items = None
        return item

    def __len__(self) -> int:
        return len(self._items or ())

    def __bool__(self) -> bool:
        return bool(self._items)


WIRE = "koinonia.wire"
"""Key of a ``websocket.send`` message carrying the frame already encoded for the
wire (``wire_frame``, called once per event by the hub); other servers ignore it
and use ``text``."""


def wire_frame(payload: bytes) -> bytes:
    """RFC 6455 section 5.2: FIN + text opcode, no mask (server frames), the length."""
    size = len(payload)
    if size < 126:
        header = bytes((0x81, size))
    elif size < 65536:
        header = bytes((0x81, 126)) + size.to_bytes(2, "big")
    else:
        header = bytes((0x81, 127)) + size.to_bytes(8, "big")
    return header + payload


class LeanWSProtocol(WSProtocol):
    """uvicorn's wsproto protocol with the per-connection savings above, and a close
    frame for a peer that breaks the protocol."""

    def handle_close(self, event: CloseConnection) -> None:
        # wsproto reports a frame it cannot parse (reserved opcode or RSV bits,
        # invalid UTF-8 in a text frame, a bad close code) as a CloseConnection
        # with the RFC 6455 code (1002, 1007: realtime/close_codes.py PROTOCOL_ERROR,
        # INVALID_DATA) while the connection is still open; uvicorn then drops the
        # TCP connection without saying why. Say it.
        if not self.close_sent and self.conn.state == ConnectionState.OPEN:
            self.close_sent = True
            self.transport.write(self.conn.send(CloseConnection(code=event.code)))
            self.queue.put_nowait(
                {"type": "websocket.disconnect", "code": event.code, "reason": event.reason}
            )
            self.transport.close()
            return
        super().handle_close(event)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue = Inbox()  # type: ignore[assignment]
        self.writable = Writable()  # type: ignore[assignment]

    def write_now(self, wire: bytes) -> bool:
        """Write a whole server message (``wire_frame``) at once, without an ASGI send,
        if the transport takes it now: False when the send would have to wait (writes
        paused, handshake not done) or go through wsproto, and the caller queues it.

        The hub's delivery calls this for every connection of an event
        (``realtime.websocket``): a coroutine and a task per wake-up cost more than the
        write itself (bench/README.md "bench/fanout.py")."""
        if (
            self.writable.is_set()
            and self.handshake_complete
            and not self.close_sent
            and not self.response_started
            and not self.config.ws_per_message_deflate
        ):
            # As in ``send``: a connection already closing drops the frame, as
            # uvicorn's own send does; its receive side reports the disconnect.
            transport = self.transport
            if not transport.is_closing():
                transport.write(wire)
            return True
        return False

    async def send(self, message: Any) -> None:
        wire = message.get(WIRE)
        if (
            wire
            and self.handshake_complete
            and not self.close_sent
            and not self.response_started
            and not self.config.ws_per_message_deflate
        ):
            # A complete unfragmented server message leaves wsproto's connection state
            # as it was, so the shared bytes can go straight to the transport.
            await self.writable.wait()
            if not self.transport.is_closing():
                self.transport.write(wire)
            return
        await super().send(message)
        conn = self.conn
        if conn.connection is not None and not isinstance(conn.handshake, _SpentHandshake):
            conn.handshake = _SPENT  # type: ignore[assignment]
            established = conn.connection
            if not established._events:
                established._events = _Pending()  # type: ignore[assignment]
