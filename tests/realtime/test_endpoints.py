"""The WebSocket and SSE endpoints, served by uvicorn on loopback, against a real Redis.

Channels here are church-wide (``dashboard``, ``inbox``): authorizing
``message:``/``conversation:`` channels needs Postgres and is left to the
end-to-end tests of the assembled app.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import uuid
from collections.abc import AsyncIterator
from typing import Any, cast

import anyio
import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from deploy.app import FrontDoor
from realtime.connection import Limits
from realtime.hub import Hub
from realtime.routes import realtime_lean_routes, realtime_routes
from realtime.websocket import Sessions
from storage.domain.events import ConversationTyping, ConversationTypingEvent, frame_bytes
from storage.pg.credentials import Principal
from storage.process.services import SESSION_COOKIE
from storage.process.settings import HttpSettings, RedisSettings, Settings
from storage.redis import key_names
from storage.redis.connection import Redis
from storage.redis.publisher import EventPublisher

pytestmark = pytest.mark.anyio

WS_PROTOCOL = "realtime.protocol:LeanWSProtocol"
"""What `koinonia web` runs (deploy/cli.py)."""
API_KEY = "kn_test_secret"
SESSION = "a-session-token"
PUBLIC_URL = "http://app.test"


class StubServices:
    """What the endpoints use of storage.services.Services, minus Postgres."""

    def __init__(self, redis: Redis, principal: Principal) -> None:
        self.redis = redis
        self.publisher = EventPublisher(redis)
        self.settings = Settings(
            http=HttpSettings(public_url=PUBLIC_URL, allowed_origins=("http://allowed.test",))
        )
        self.principal = principal

    async def authenticate(
        self, authorization: str | None, session_token: str | None
    ) -> Principal | None:
        if authorization is not None:
            return self.principal if authorization == f"Bearer {API_KEY}" else None
        return self.principal if session_token == SESSION else None


class Server:
    def __init__(self, app: Starlette | FrontDoor, port: int, services: StubServices) -> None:
        self.app = app
        self.http = f"http://127.0.0.1:{port}"
        self.ws = f"ws://127.0.0.1:{port}/v1/realtime"
        self.services = services
        self.church_id = services.principal.church_id

    @property
    def hub(self) -> Hub:
        hub: Hub = self.app.state.hub
        return hub

    async def publish(self, channel: str) -> str:
        data = ConversationTyping(conversation_id=uuid.uuid4(), user_id=uuid.uuid4())
        event = ConversationTypingEvent.new(data)
        return (await self.services.publisher.publish(self.church_id, channel, event)).offset

    async def frame(self, channel: str, offset: str) -> str:
        """The event frame for an offset, rebuilt from history."""
        history = key_names.channel_history(self.church_id, channel)
        [(entry_id, fields)] = cast(
            list[Any], await self.services.redis.xrange(history, offset, offset)
        )
        return frame_bytes(channel, entry_id.decode(), fields[b"e"]).decode()

    async def drained(self, channel: str) -> None:
        """Wait until no connection is subscribed any more (nothing leaked)."""
        with anyio.fail_after(5):
            while self.hub.subscriber_count(self.church_id, channel):  # noqa: ASYNC110
                await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def serving(
    redis_url: str,
    redis: Redis,
    church_id: uuid.UUID,
    *,
    limits: Limits | None = None,
    sessions: Sessions | None = None,
    routed: bool = False,
    **options: Any,
) -> AsyncIterator[Server]:
    """The realtime routes under uvicorn on loopback; ``options`` for uvicorn.Config.

    The WebSocket is served as ``koinonia web`` serves it, by the lean route ahead of
    Starlette (``deploy.app.FrontDoor``: the hub writes events straight to the
    socket); ``routed``: through Starlette's router instead, as with tracing on,
    where every frame goes through the ASGI send and the sender task."""
    principal = Principal(church_id=church_id, kind="api_key", scopes=frozenset({"read", "write"}))
    services = StubServices(redis, principal)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        hub = Hub(RedisSettings(url=redis_url), services.publisher, redis)
        await hub.start()
        app.state.services = services
        app.state.hub = hub
        if sessions is not None:
            app.state.sessions = sessions
        yield
        await hub.stop()

    starlette = Starlette(routes=realtime_routes(limits), lifespan=lifespan)
    lean = [] if routed else realtime_lean_routes(limits)
    app = FrontDoor(starlette, lean, max_body_bytes=1_000_000)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    # As `koinonia web` (deploy/cli.py): no per-message compression, so the frames
    # built once per event are written as they are.
    options = {
        "ws_ping_interval": 25,
        "ws": WS_PROTOCOL,
        "ws_per_message_deflate": False,
        **options,
    }
    config = uvicorn.Config(app, log_level="warning", lifespan="on", **options)
    uv = uvicorn.Server(config)
    task = asyncio.create_task(uv.serve(sockets=[sock]))
    with anyio.fail_after(5):
        while not uv.started:  # noqa: ASYNC110 (uvicorn offers no event)
            await asyncio.sleep(0.01)
    try:
        yield Server(app, sock.getsockname()[1], services)
    finally:
        uv.should_exit = True
        await task


@pytest.fixture(params=["lean", "routed"])
async def server(
    redis_url: str, redis: Redis, church_id: uuid.UUID, request: pytest.FixtureRequest
) -> AsyncIterator[Server]:
    async with serving(redis_url, redis, church_id, routed=request.param == "routed") as running:
        yield running


AUTH = {"Authorization": f"Bearer {API_KEY}"}


async def receive(ws: ClientConnection) -> dict[str, Any]:
    with anyio.fail_after(5):
        frame: dict[str, Any] = json.loads(await ws.recv())
    return frame


async def frames_until_closed(ws: ClientConnection) -> list[dict[str, Any]]:
    frames = []
    with anyio.fail_after(5):
        while True:
            try:
                frames.append(json.loads(await ws.recv()))
            except ConnectionClosed:
                return frames


@contextlib.asynccontextmanager
async def client(server: Server) -> AsyncIterator[ClientConnection]:
    async with connect(server.ws, additional_headers=AUTH) as ws:
        welcome = await receive(ws)
        assert welcome["type"] == "welcome"
        yield ws


async def test_websocket_without_credentials_is_refused_with_401(server: Server) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        with pytest.raises(InvalidStatus) as refused:
            async with connect(server.ws, additional_headers=headers):
                pass
        assert refused.value.response.status_code == 401
        body = json.loads(refused.value.response.body or b"{}")
        assert body["success"] is False
        assert body["error"]["code"] == "unauthorized"


async def test_the_lean_route_keeps_the_request_id_of_the_connection(
    redis_url: str, redis: Redis, church_id: uuid.UUID
) -> None:
    # What RequestContext gave a WebSocket: the client's sane X-Request-Id, else a new
    # one, for everything the connection's task logs or answers (here: the refusal).
    async with serving(redis_url, redis, church_id) as server:
        for headers, expected in (
            ({"X-Request-Id": "ws-test.1"}, "ws-test.1"),
            ({"X-Request-Id": "not sane!"}, None),
            ({}, None),
        ):
            with pytest.raises(InvalidStatus) as refused:
                async with connect(server.ws, additional_headers=headers):
                    pass
            body = json.loads(refused.value.response.body or b"{}")
            request_id = body["meta"]["request_id"]
            if expected is None:
                assert len(request_id) == 32
                assert int(request_id, 16) >= 0
            else:
                assert request_id == expected


async def test_session_cookie_needs_an_allowed_origin(server: Server) -> None:
    cookie = {"Cookie": f"{SESSION_COOKIE}={SESSION}"}
    for origin in (None, "http://evil.test"):
        with pytest.raises(InvalidStatus) as refused:
            async with connect(server.ws, additional_headers=cookie, origin=origin):  # type: ignore[arg-type]
                pass
        assert refused.value.response.status_code == 401
    for origin in (PUBLIC_URL, "http://allowed.test"):
        async with connect(server.ws, additional_headers=cookie, origin=origin) as ws:  # type: ignore[arg-type]
            assert (await receive(ws))["type"] == "welcome"


async def test_welcome_subscribe_live_events_ping_and_unsubscribe(server: Server) -> None:
    async with connect(server.ws, additional_headers=AUTH) as ws:
        welcome = await receive(ws)
        assert welcome["heartbeat_s"] == 25
        assert welcome["connection_id"]
        await ws.send(json.dumps({"type": "subscribe", "id": "r1", "channel": "dashboard"}))
        head = await server.services.publisher.head(server.church_id, "dashboard")
        assert await receive(ws) == {
            "type": "subscribed",
            "id": "r1",
            "channel": "dashboard",
            "offset": head.offset,
            "epoch": head.epoch,
            "recovered": False,
        }
        offset = await server.publish("dashboard")
        with anyio.fail_after(5):
            assert await ws.recv() == await server.frame("dashboard", offset)
        await ws.send('{"type":"ping","id":"r3"}')
        assert await receive(ws) == {"type": "pong", "id": "r3"}
        await ws.send('{"type":"unsubscribe","id":"r2","channel":"dashboard"}')
        assert await receive(ws) == {"type": "unsubscribed", "id": "r2", "channel": "dashboard"}
        await server.publish("dashboard")
        await ws.send('{"type":"ping","id":"r4"}')
        assert await receive(ws) == {"type": "pong", "id": "r4"}  # and no event before it
    await server.drained("dashboard")


async def test_since_replays_what_was_missed_then_goes_live(server: Server) -> None:
    offsets = [await server.publish("inbox") for _ in range(3)]
    epoch = (await server.services.publisher.head(server.church_id, "inbox")).epoch
    async with client(server) as ws:
        since = {"offset": offsets[0], "epoch": epoch}
        await ws.send(
            json.dumps({"type": "subscribe", "id": "r1", "channel": "inbox", "since": since})
        )
        replayed = [await receive(ws) for _ in range(2)]
        assert [(f["type"], f["offset"]) for f in replayed] == [("event", o) for o in offsets[1:]]
        subscribed = await receive(ws)
        assert subscribed["type"] == "subscribed"
        assert subscribed["recovered"] is True
        assert (subscribed["offset"], subscribed["epoch"]) == (offsets[-1], epoch)
        live = await server.publish("inbox")
        assert (await receive(ws))["offset"] == live
    await server.drained("inbox")


async def test_a_replay_longer_than_the_send_queue_is_paced_not_dropped(server: Server) -> None:
    first = await server.publish("inbox")
    epoch = (await server.services.publisher.head(server.church_id, "inbox")).epoch
    offsets = []
    for _ in range(30):  # 50 at a time: the client's pool has 64 connections
        offsets += await asyncio.gather(*(server.publish("inbox") for _ in range(50)))
    async with client(server) as ws:
        since = {"offset": first, "epoch": epoch}
        await ws.send(json.dumps({"type": "subscribe", "channel": "inbox", "since": since}))
        replayed = [(await receive(ws))["offset"] for _ in range(1500)]
        assert replayed == sorted(offsets, key=lambda o: tuple(map(int, o.split("-"))))
        assert (await receive(ws))["recovered"] is True


async def test_since_with_another_epoch_is_not_recovered(server: Server) -> None:
    offsets = [await server.publish("inbox") for _ in range(2)]
    async with client(server) as ws:
        since = {"offset": offsets[0], "epoch": "not-the-epoch"}
        await ws.send(json.dumps({"type": "subscribe", "channel": "inbox", "since": since}))
        subscribed = await receive(ws)  # no replay first
        assert subscribed["type"] == "subscribed"
        assert subscribed["recovered"] is False
        assert subscribed["offset"] == offsets[-1]


async def test_bad_frames_get_errors_and_ten_close_the_connection(server: Server) -> None:
    async with client(server) as ws:
        await ws.send("not json")
        error = await receive(ws)
        assert (error["type"], error["code"]) == ("error", "bad_frame")
        await ws.send('{"type":"subscribe","id":"r1","channel":"bogus"}')
        assert (await receive(ws))["code"] == "unknown_channel"
        await ws.send(f'{{"type":"typing","conversation_id":"{uuid.uuid4()}"}}')
        refused = await receive(ws)  # an API key has no user to show as typing
        assert (refused["type"], refused["code"]) == ("error", "forbidden")
        await ws.send('{"type":"ping","id":"p"}')
        assert await receive(ws) == {"type": "pong", "id": "p"}
        for _ in range(9):
            await ws.send('{"type":"shout"}')
        errors = await frames_until_closed(ws)
        assert [e["code"] for e in errors] == ["bad_frame"] * 8  # the tenth closes instead
        assert ws.close_code == 1008


async def test_a_frame_over_64_kib_closes_with_1009(server: Server) -> None:
    async with client(server) as ws:
        await ws.send(json.dumps({"type": "ping", "id": "x" * 70_000}))
        assert await frames_until_closed(ws) == []
        assert ws.close_code == 1009


async def sse_events(response: httpx.Response) -> AsyncIterator[dict[str, str]]:
    fields: dict[str, str] = {}
    async for line in response.aiter_lines():
        if not line:
            if fields:
                yield fields
            fields = {}
        elif not line.startswith(":"):
            key, _, value = line.partition(":")
            fields[key] = value.removeprefix(" ")


async def next_event(events: AsyncIterator[dict[str, str]]) -> dict[str, str]:
    with anyio.fail_after(5):
        return await anext(events)


CHANNELS: list[tuple[str, Any]] = [("channel", "dashboard"), ("channel", "inbox")]


async def test_sse_refusals(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.http) as http:
        unauthorized = await http.get("/v1/events", params=CHANNELS)
        assert unauthorized.status_code == 401
        assert unauthorized.json()["error"]["code"] == "unauthorized"
        assert "request_id" in unauthorized.json()["meta"]
        forbidden = await http.get("/v1/events", params={"channel": "bogus"}, headers=AUTH)
        assert forbidden.status_code == 403
        assert forbidden.json()["error"]["code"] == "forbidden"
        none = await http.get("/v1/events", headers=AUTH)
        assert none.status_code == 422


async def test_sse_ready_events_and_resume_with_last_event_id(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.http, timeout=10) as http:
        async with http.stream("GET", "/v1/events", params=CHANNELS, headers=AUTH) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.headers["cache-control"] == "no-cache"
            assert response.headers["x-accel-buffering"] == "no"
            events = sse_events(response)
            ready = await next_event(events)
            assert ready["event"] == "ready"
            assert ready["id"]
            assert json.loads(ready["data"]) == {"channels": ["dashboard", "inbox"]}
            offsets = [await server.publish("dashboard") for _ in range(2)]
            received = [await next_event(events) for _ in range(2)]
            assert [e["data"] for e in received] == [
                await server.frame("dashboard", o) for o in offsets
            ]
            assert received[0]["event"] == "conversation.typing"
            last_id = received[-1]["id"]
        await server.drained("dashboard")

        missed = [
            ("dashboard", await server.publish("dashboard")),
            ("inbox", await server.publish("inbox")),
            ("dashboard", await server.publish("dashboard")),
        ]
        resume = {**AUTH, "Last-Event-ID": last_id}
        async with http.stream("GET", "/v1/events", params=CHANNELS, headers=resume) as response:
            events = sse_events(response)
            assert (await next_event(events))["event"] == "ready"
            replayed = [json.loads((await next_event(events))["data"]) for _ in range(3)]
            # Replayed channel by channel, each in offset order.
            assert [(f["channel"], f["offset"]) for f in replayed] == sorted(
                missed, key=lambda m: (m[0] != "dashboard", missed.index(m))
            )
            live = await server.publish("inbox")
            assert json.loads((await next_event(events))["data"])["offset"] == live

        garbage: list[tuple[str, Any]] = [*CHANNELS, ("last_event_id", "not-a-token")]
        async with http.stream("GET", "/v1/events", params=garbage, headers=AUTH) as response:
            events = sse_events(response)
            assert (await next_event(events))["event"] == "ready"
            failed = await next_event(events)
            assert failed["event"] == "recovery_failed"
            assert json.loads(failed["data"]) == {"channels": ["dashboard", "inbox"]}
    await server.drained("inbox")
