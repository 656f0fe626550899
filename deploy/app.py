"""The assembly: the web app built from the routes of api/, realtime/ and delivery/.

This module and deploy/cli.py are the only ones that import all three packages.
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from api.media import media_link_routes
from api.middleware import RequestContext
from api.routes import api_lean_routes, api_routes, exception_handlers
from api.tracing import TracingMiddleware
from delivery.inbound import InboundHandler, inbound_lean_routes, inbound_routes
from delivery.progress import ProgressTracker
from delivery.receipts import ReceiptBatcher
from realtime.hub import Hub
from realtime.presence import Presence
from realtime.routes import realtime_lean_routes, realtime_routes
from realtime.websocket import Sessions
from storage.process import tracing
from storage.process.logs import configure_logging
from storage.process.metrics import Metrics
from storage.process.services import Services
from storage.process.settings import Settings
from storage.redis.presence import PresenceStore

GC_GEN0_THRESHOLD = 10_000

LeanRoute = tuple[str, str, ASGIApp]
"""``(kind, path, app)``: kind ``"websocket"`` or an HTTP method, an exact path, and a
pure ASGI app answering it (see ``FrontDoor``)."""


class _RouteName:
    """What ``scope["route"]`` needs for the metrics' route template."""

    __slots__ = ("path",)

    def __init__(self, path: str) -> None:
        self.path = path


class FrontDoor:
    """The hot paths dispatched before Starlette's middleware stack and router.

    A lean HTTP route still passes ``RequestContext`` (request id, access log,
    metrics, security headers, body limit, 500s); it skips CORS, Starlette's
    exception middleware and the router's scan of every route. A lean WebSocket
    route gets the scope as the server gave it (the app set on it), nothing between
    its frames and the transport. Everything else goes to the Starlette app.
    """

    def __init__(self, app: Starlette, lean: list[LeanRoute], *, max_body_bytes: int) -> None:
        self.app = app
        self.state = app.state
        self.user_middleware = app.user_middleware
        self._http: dict[tuple[str, str], tuple[ASGIApp, _RouteName]] = {}
        self._ws: dict[str, ASGIApp] = {}
        for kind, path, endpoint in lean:
            if kind == "websocket":
                self._ws[path] = endpoint
            else:
                self._http[(kind, path)] = (
                    RequestContext(endpoint, max_body_bytes=max_body_bytes),
                    _RouteName(path),
                )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            found = self._http.get((scope["method"], scope["path"]))
            if found is not None:
                scope["app"] = self.app
                scope["route"] = found[1]
                await found[0](scope, receive, send)
                return
        elif kind == "websocket":
            ws = self._ws.get(scope["path"])
            if ws is not None:
                scope["app"] = self.app
                await ws(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(settings: Settings, *, metrics: Metrics | None = None) -> FrontDoor:
    """The web app; ``metrics``: the process's (``Metrics.for_process``), None to
    measure nothing."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        services = await Services.open(settings, metrics=metrics)
        hub = Hub(settings.redis, services.publisher, services.redis)
        # Principals cached in this process are dropped by the revocations the hub hears.
        hub.revocations.listeners.append(services.principals)
        await hub.start()
        progress = ProgressTracker(services.redis, services.scripts, services.pool, services.relay)
        receipts = ReceiptBatcher(services.pool, progress, metrics=services.metrics)
        receipts.start()
        app.state.services = services
        app.state.hub = hub
        app.state.sessions = Sessions(
            max_total=settings.realtime.max_connections,
            max_per_church=settings.realtime.max_connections_per_church,
        )
        app.state.inbound = InboundHandler(services, progress, receipts)
        app.state.presence = Presence(
            PresenceStore(services.publisher),
            heartbeat_s=settings.realtime.presence_heartbeat_s,
            ttl_s=settings.realtime.presence_ttl_s,
        )
        # Everything made at start-up (modules, routes, schemas) lives as long as the
        # process: moved out of the collector's generations, and young collections
        # made rarer. The REST profile spent 13 % of a web process in the collector.
        gc.collect()
        gc.freeze()
        gc.set_threshold(GC_GEN0_THRESHOLD, 10, 10)
        try:
            yield
        finally:
            await receipts.stop()
            await app.state.presence.stop()
            await hub.stop()
            await progress.aclose()
            await services.close()
            tracing.shutdown()  # flush the last spans

    # Outermost, and only with tracing on: the server span covers the whole request,
    # its access log line and a 500 answered by RequestContext included.
    traced = [Middleware(TracingMiddleware)] if tracing.enabled() else []
    app = Starlette(
        routes=[*api_routes(), *media_link_routes(), *realtime_routes(), *inbound_routes()],
        middleware=[
            *traced,
            Middleware(RequestContext, max_body_bytes=settings.http.max_body_bytes),
            # Browsers on the allow-listed origins (a church's own site, a dashboard)
            # may call the API with credentials; everyone else gets no CORS headers.
            Middleware(
                CORSMiddleware,
                allow_origins=list(settings.http.allowed_origins),
                allow_credentials=True,
                allow_methods=["GET", "POST", "PATCH", "PUT", "DELETE"],
                allow_headers=["Authorization", "Content-Type", "X-CSRF-Token", "X-Request-Id"],
                expose_headers=[
                    "X-Request-Id",
                    "Retry-After",
                    "RateLimit-Limit",
                    "RateLimit-Remaining",
                    "RateLimit-Reset",
                    "RateLimit-Policy",
                ],
                max_age=600,
            ),
        ],
        exception_handlers=exception_handlers(),
        lifespan=lifespan,
    )
    # With tracing on, every request takes the traced path: a span for each.
    lean = [] if traced else [*api_lean_routes(), *realtime_lean_routes(), *inbound_lean_routes()]
    return FrontDoor(app, lean, max_body_bytes=settings.http.max_body_bytes)


def app_from_env() -> FrontDoor:
    """Factory for ``uvicorn --factory deploy.app:app_from_env`` (several workers)."""
    settings = Settings.from_env()
    configure_logging(settings.log_level, process="web")
    try:
        tracing.setup("web", environment=settings.environment)
    except ValueError as exc:
        raise SystemExit(f"koinonia: {exc}") from None
    # Under ``koinonia web --workers N`` (PROMETHEUS_MULTIPROC_DIR set by it) the
    # worker records its metrics and the supervisor serves them all; no server here.
    return create_app(settings, metrics=Metrics.for_process(settings, "web"))
