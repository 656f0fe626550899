"""Heartbeats, idle timeouts and limits at the endpoints, each with its close code
(docs/protocol.md): server pings and 1011 for a peer that stops answering them, the SSE
keepalive comment, 1009 from the protocol layer, 4029 for frame floods and for
connections beyond the node's limit, 4008 for a slow consumer. (1008, 1009 from
the endpoint, 401: test_endpoints.py; 4029 per church and 1001: test_end_to_end.py.)"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
import uuid
from typing import Any

import anyio
import httpx
import pytest
from websockets.asyncio.client import connect

from realtime import event_stream
from realtime.connection import Limits
from realtime.websocket import Sessions
from storage.redis import key_names
from storage.redis.connection import Redis
from tests.realtime.test_endpoints import (
    API_KEY,
    AUTH,
    Server,
    client,
    frames_until_closed,
    receive,
    serving,
)

pytestmark = pytest.mark.anyio


async def raw_websocket(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A WebSocket handshake by hand: this client never answers pings."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET /v1/realtime HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {API_KEY}\r\n\r\n"
        ).encode()
    )
    status = await reader.readuntil(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 101"), status
    return reader, writer


async def server_frames(reader: asyncio.StreamReader) -> list[tuple[int, bytes]]:
    """(opcode, payload) of every frame until the server closes the TCP connection."""
    frames = []
    while True:
        try:
            head = await reader.readexactly(2)
        except asyncio.IncompleteReadError:
            return frames
        length = head[1] & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", await reader.readexactly(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", await reader.readexactly(8))
        frames.append((head[0] & 0x0F, await reader.readexactly(length)))


def small_socket(server: Server) -> socket.socket:
    """A client socket with a small receive buffer: a client that stops reading is
    felt by the server within ~4 MB (its send buffer) instead of the tens of MB
    loopback's autotuning would buffer (the hub then writes straight to the socket,
    and only a full socket makes frames queue)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32_768)  # before connecting
    host, port = server.http.removeprefix("http://").rsplit(":", 1)
    sock.connect((host, int(port)))
    sock.setblocking(False)
    return sock


async def test_server_pings_and_closes_a_peer_that_stops_answering_with_1011(
    redis_url: str, redis: Redis, church_id: uuid.UUID
) -> None:
    sessions = Sessions()
    options = {"ws_ping_interval": 0.2, "ws_ping_timeout": 0.3}
    async with serving(redis_url, redis, church_id, sessions=sessions, **options) as server:
        port = int(server.http.rsplit(":", 1)[1])
        # A client that answers pings (the websockets library does) stays.
        async with client(server) as alive:
            reader, writer = await raw_websocket(port)
            try:
                with anyio.fail_after(5):
                    frames = await server_frames(reader)
            finally:
                writer.close()
            opcodes = [opcode for opcode, _ in frames]
            assert opcodes[0] == 0x1  # welcome
            assert 0x9 in opcodes  # the heartbeat ping
            assert opcodes[-1] == 0x8  # then a close frame ...
            assert struct.unpack("!H", frames[-1][1][:2])[0] == 1011  # ... for the silence
            await asyncio.sleep(0.5)  # more than two intervals
            await alive.send('{"type":"ping","id":"still"}')
            assert await receive(alive) == {"type": "pong", "id": "still"}
        with anyio.fail_after(5):
            while len(sessions):  # noqa: ASYNC110 (the dead one was cleaned up too)
                await asyncio.sleep(0.01)


async def test_an_idle_sse_stream_gets_keepalive_comments(
    redis_url: str, redis: Redis, church_id: uuid.UUID, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(event_stream, "KEEPALIVE_S", 0.2)
    async with (
        serving(redis_url, redis, church_id) as server,
        httpx.AsyncClient(base_url=server.http, timeout=10) as http,
        http.stream("GET", "/v1/events", params={"channel": "inbox"}, headers=AUTH) as stream,
    ):
        lines = stream.aiter_lines()
        with anyio.fail_after(5):
            while await anext(lines) != ": keepalive":
                pass


async def test_the_protocol_layer_refuses_frames_over_ws_max_size_with_1009(
    redis_url: str, redis: Redis, church_id: uuid.UUID
) -> None:
    # What `koinonia web` sets: the frame is refused before it is buffered whole.
    async with (
        serving(redis_url, redis, church_id, ws_max_size=65_536) as server,
        client(server) as ws,
    ):
        await ws.send(json.dumps({"type": "ping", "id": "x" * 70_000}))
        assert await frames_until_closed(ws) == []
        assert ws.close_code == 1009


async def test_a_frame_flood_is_answered_rate_limited_then_closed_with_4029(
    redis_url: str, redis: Redis, church_id: uuid.UUID
) -> None:
    limits = Limits(frame_rate=1.0, frame_burst=5.0, max_rate_limited=5)
    async with serving(redis_url, redis, church_id, limits=limits) as server, client(server) as ws:
        for i in range(20):
            await ws.send(json.dumps({"type": "ping", "id": str(i)}))
        frames = await frames_until_closed(ws)
        assert [f["type"] for f in frames[:5]] == ["pong"] * 5
        assert {f["code"] for f in frames[5:]} == {"rate_limited"}
        assert len(frames[5:]) == 4  # the fifth refusal closes instead
        assert ws.close_code == 4029


async def test_connections_beyond_the_node_limit_close_with_4029(
    redis_url: str, redis: Redis, church_id: uuid.UUID
) -> None:
    sessions = Sessions(max_total=1)
    async with (
        serving(redis_url, redis, church_id, sessions=sessions) as server,
        client(server),
        connect(server.ws, additional_headers=AUTH) as second,
    ):
        assert await frames_until_closed(second) == []
        assert second.close_code == 4029


async def test_a_consumer_that_cannot_keep_up_is_closed_with_4008(
    redis_url: str, redis: Redis, church_id: uuid.UUID
) -> None:
    limits = Limits(send_queue=4)
    async with (
        serving(redis_url, redis, church_id, limits=limits) as server,
        connect(server.ws, additional_headers=AUTH, max_queue=1, sock=small_socket(server)) as ws,
    ):
        assert (await receive(ws))["type"] == "welcome"
        await ws.send('{"type":"subscribe","channel":"dashboard"}')
        assert (await receive(ws))["type"] == "subscribed"
        # Large frames the client does not read: the socket's buffers fill, the
        # sender blocks, the queue overflows. (Published raw, as the publish
        # script would, to make them large.)
        name = key_names.channel_pubsub(church_id, "dashboard")
        filler = "x" * 60_000
        async with redis.pipeline(transaction=False) as pipe:
            for i in range(1, 400):
                frame = f'{{"type":"event","channel":"dashboard","offset":"{i}-0","x":"{filler}"}}'
                pipe.publish(name, f"message.progress\nbig\n{i}-0\n{frame}")
            await pipe.execute()
        with anyio.fail_after(10):
            frames = await frames_until_closed(ws)
        assert len(frames) < 399  # it was cut off, not served everything
        assert ws.close_code == 4008


async def test_events_written_at_once_or_queued_behind_a_paused_transport_keep_order(
    redis_url: str, redis: Redis, church_id: uuid.UUID, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On the lean route the hub writes an event straight to the socket while nothing is
    # queued; once the transport pauses (the client does not read), events queue and
    # the sender writes them on resume. Both paths serve one stream: every event
    # arrives, once, in offset order, and the connection stays open.
    from realtime.protocol import LeanWSProtocol
    from realtime.websocket import _Session

    counts = {"direct": 0, "sender": 0}
    write_now = LeanWSProtocol.write_now
    send_loop = _Session._send_loop

    def counted_write_now(self: LeanWSProtocol, wire: bytes) -> bool:
        written = write_now(self, wire)
        counts["direct"] += written
        return written

    def counted_send_loop(self: _Session) -> Any:
        counts["sender"] += 1
        return send_loop(self)

    monkeypatch.setattr(LeanWSProtocol, "write_now", counted_write_now)
    monkeypatch.setattr(_Session, "_send_loop", counted_send_loop)
    count = 300
    async with (
        serving(redis_url, redis, church_id) as server,
        connect(server.ws, additional_headers=AUTH, max_queue=1, sock=small_socket(server)) as ws,
    ):
        assert (await receive(ws))["type"] == "welcome"
        await ws.send('{"type":"subscribe","channel":"dashboard"}')
        assert (await receive(ws))["type"] == "subscribed"
        await asyncio.sleep(0.05)  # the sender of the replies has finished
        senders_before = counts["sender"]
        name = key_names.channel_pubsub(church_id, "dashboard")
        filler = "x" * 20_000  # 6 MB in all: far beyond the socket buffers
        async with redis.pipeline(transaction=False) as pipe:
            for i in range(1, count + 1):
                frame = f'{{"type":"event","channel":"dashboard","offset":"{i}-0","x":"{filler}"}}'
                pipe.publish(name, f"message.progress\nbig\n{i}-0\n{frame}")
            await pipe.execute()
        offsets: list[str] = []
        with anyio.fail_after(20):
            while len(offsets) < count:
                offsets.append((await receive(ws))["offset"])
        assert offsets == [f"{i}-0" for i in range(1, count + 1)]
        assert counts["direct"] > 0  # the first ones went straight out ...
        assert counts["sender"] > senders_before  # ... the rest waited in the queue
        await ws.send('{"type":"ping","id":"after"}')
        assert await receive(ws) == {"type": "pong", "id": "after"}
