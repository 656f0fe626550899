"""The realtime routes the assembly mounts (``deploy/app.py``).

Endpoints find their dependencies on the app: ``app.state.services`` (a
``storage.services.Services``) and ``app.state.hub`` (a started ``Hub``). The
staff pages (``/inbox``, ``/dashboard``, ``/static/``) come with them
(``realtime/pages.py``).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Coroutine
from typing import Any

from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from realtime.connection import Limits
from realtime.event_stream import EventStreamEndpoint
from realtime.pages import page_routes
from realtime.websocket import RealtimeEndpoint
from storage.domain.envelope import request_id_var

REALTIME_PATH = "/v1/realtime"

_SANE_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
"""A client's ``X-Request-Id`` taken as is (the rule ``api.middleware`` applies)."""


def realtime_routes(limits: Limits | None = None) -> list[BaseRoute]:
    return [
        WebSocketRoute(REALTIME_PATH, RealtimeEndpoint(limits)),
        Route("/v1/events", EventStreamEndpoint(limits), methods=["GET"]),
        *page_routes(),
    ]


class WithRequestId:
    """What ``api.middleware.RequestContext`` does for a WebSocket, once per
    connection: the request id (the client's ``X-Request-Id`` if sane, else a new
    one) on every log line of the connection's task. Nothing wraps ``send``, so
    the endpoint writes its frames straight to uvicorn's protocol."""

    __slots__ = ("app",)

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Coroutine[Any, Any, None]:
        incoming = ""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                incoming = value.decode("latin-1")
                break
        # uvicorn runs each connection in a task of its own, whose context ends with it.
        request_id_var.set(incoming if _SANE_ID.match(incoming) else uuid.uuid4().hex)
        # Not a coroutine function: the endpoint's coroutine is the connection's only frame.
        return self.app(scope, receive, send)  # type: ignore[return-value]


def realtime_lean_routes(limits: Limits | None = None) -> list[tuple[str, str, ASGIApp]]:
    """Realtime paths served before the middleware stack (``deploy/app.py FrontDoor``):
    the WebSocket, whose frames then pass no middleware (``realtime.websocket``)."""
    return [("websocket", REALTIME_PATH, WithRequestId(RealtimeEndpoint(limits)))]
