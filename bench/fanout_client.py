"""The lean WebSocket clients of ``bench/fanout.py``, one process of many connections.

Both servers are measured with the same client code: a raw RFC 6455 client on
an asyncio ``Protocol`` (uvloop), which parses the server's unmasked frames
itself and looks inside each text frame only for the bench's marker
``"k":"<phase>:<seq>:<send ns>"``, so the client costs the same few
microseconds per delivery whichever server sends it. Only the handshake
differs: Koinonia's ``welcome`` → ``subscribe`` → ``subscribed``, or
Socket.IO's ``0{...}`` → ``40`` → ``40{...}`` → ``421["join",room]`` →
``431[true]`` (and Engine.IO's ``2`` pings answered with ``3``).

The parent drives a process through a ``multiprocessing`` pipe: ``count``,
``report`` (count, first/last receive time, latencies in µs) and ``stop``.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from array import array
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, cast

MARK = b'"k":"'
CONNECT_TIMEOUT_S = 30.0


@dataclass
class Spec:
    """One connection to open: which protocol, where, and what to subscribe to."""

    kind: str
    """``koinonia`` or ``socketio``."""
    host: str
    port: int
    path: str
    headers: dict[str, str]
    channel: str
    """Koinonia channel name, or Socket.IO room."""


@dataclass
class PhaseStats:
    count: int = 0
    first_ns: int = 0
    last_ns: int = 0
    latencies_us: array[int] = field(default_factory=lambda: array("q"))


class Pool:
    """What one process has received, per phase."""

    def __init__(self) -> None:
        self.phases: dict[bytes, PhaseStats] = {}
        self.closed: list[int] = []


def _frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """A client frame; masked with a zero key (valid, and no XOR to compute)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + b"\x00\x00\x00\x00" + payload


class Client(asyncio.Protocol):
    def __init__(self, spec: Spec, pool: Pool, ready: asyncio.Future[None]) -> None:
        self.spec = spec
        self.pool = pool
        self.ready = ready
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.upgraded = False
        self.fragments: list[bytes] = []

    # -- asyncio.Protocol --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        spec = self.spec
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {spec.path} HTTP/1.1",
            f"Host: {spec.host}:{spec.port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
            *(f"{k}: {v}" for k, v in spec.headers.items()),
        ]
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode())

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"connection lost: {exc}"))

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        buf = self.buf + data if self.buf else data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            status = buf[: buf.find(b"\r\n")]
            if b" 101 " not in status + b" ":
                self._fail(f"handshake refused: {status.decode(errors='replace')}")
                return
            self.upgraded = True
            buf = buf[end + 4 :]
        pos, n = 0, len(buf)
        phases = self.pool.phases
        while n - pos >= 2:
            b0, length = buf[pos], buf[pos + 1] & 0x7F
            head = 2
            if length == 126:
                if n - pos < 4:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif length == 127:
                if n - pos < 10:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            end = pos + head + length
            if end > n:
                break
            payload = buf[pos + head : end]
            pos = end
            opcode = b0 & 0x0F
            if not b0 & 0x80:  # a fragment; the final one carries opcode 0
                self.fragments.append(payload)
                continue
            if opcode == 0x0:
                self.fragments.append(payload)
                payload = b"".join(self.fragments)
                self.fragments.clear()
                opcode = 0x1
            if opcode == 0x1:
                i = payload.find(MARK)
                if i < 0:
                    self._control(payload)
                    continue
                j = payload.find(b'"', i + 5)
                phase, _, rest = payload[i + 5 : j].partition(b":")
                sent_ns = int(rest.partition(b":")[2])
                stats = phases.get(phase)
                if stats is None:
                    stats = phases[phase] = PhaseStats(first_ns=now)
                stats.count += 1
                stats.last_ns = now
                stats.latencies_us.append((now - sent_ns) // 1000)
            elif opcode == 0x9:
                self._write(_frame(payload, 0xA))
            elif opcode == 0x8:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self.pool.closed.append(code)
                self._fail(f"closed by the server with {code}")
                return
        self.buf = buf[pos:]

    # -- handshakes --------------------------------------------------------------

    def _control(self, payload: bytes) -> None:
        if self.spec.kind == "koinonia":
            if b'"type":"welcome"' in payload:
                subscribe = (
                    b'{"type":"subscribe","id":"s","channel":"%s"}' % self.spec.channel.encode()
                )
                self._write(_frame(subscribe))
            elif b'"type":"subscribed"' in payload:
                self._ready()
            elif b'"type":"error"' in payload:
                self._fail(payload.decode(errors="replace"))
            return
        # Engine.IO / Socket.IO over the websocket transport.
        if payload == b"2":
            self._write(_frame(b"3"))
        elif payload.startswith(b"0{"):
            self._write(_frame(b"40"))
        elif payload.startswith(b"40"):
            self._write(_frame(b'421["join","%s"]' % self.spec.channel.encode()))
        elif payload.startswith(b"431"):
            self._ready()
        elif payload.startswith(b"44"):
            self._fail(payload.decode(errors="replace"))

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _ready(self) -> None:
        if not self.ready.done():
            self.ready.set_result(None)

    def _fail(self, reason: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(reason))
        if self.transport is not None:
            self.transport.close()


async def _open(spec: Spec, pool: Pool, gate: asyncio.Semaphore) -> Client:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    async with gate:
        _, client = await loop.create_connection(
            lambda: Client(spec, pool, ready), spec.host, spec.port
        )
        await asyncio.wait_for(ready, CONNECT_TIMEOUT_S)
    return client


async def _serve(pipe: Connection, specs: list[Spec]) -> None:
    loop = asyncio.get_running_loop()
    pool = Pool()
    gate = asyncio.Semaphore(32)
    results = await asyncio.gather(*(_open(s, pool, gate) for s in specs), return_exceptions=True)
    clients = [r for r in results if isinstance(r, Client)]
    errors = [repr(r) for r in results if not isinstance(r, Client)]
    pipe.send(("ready", len(clients), errors[:5]))
    while True:
        command: tuple[Any, ...] = await loop.run_in_executor(None, pipe.recv)
        match command:
            case ("count", phase):
                stats = pool.phases.get(phase.encode())
                pipe.send((0 if stats is None else stats.count, len(pool.closed)))
            case ("report", phase):
                stats = pool.phases.pop(phase.encode(), None) or PhaseStats()
                pipe.send(
                    (
                        stats.count,
                        stats.first_ns,
                        stats.last_ns,
                        stats.latencies_us.tobytes(),
                        list(pool.closed),
                    )
                )
            case ("stop",):
                for client in clients:
                    if client.transport is not None:
                        client.transport.close()
                await asyncio.sleep(0.2)
                pipe.send(("stopped",))
                return


def run(pipe: Connection, specs: list[Spec]) -> None:
    """Entry point of a client process."""
    import uvloop

    uvloop.run(_serve(pipe, specs))
