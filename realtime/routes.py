"""The realtime routes the assembly mounts (``deploy/app.py``).

Endpoints find their dependencies on the app: ``app.state.services`` (a
``storage.services.Services``) and ``app.state.hub`` (a started ``Hub``). The
staff pages (``/inbox``, ``/dashboard``, ``/static/``) come with them
(``realtime/pages.py``).
"""

from __future__ import annotations

from starlette.routing import BaseRoute, Route, WebSocketRoute

from realtime.connection import Limits
from realtime.event_stream import EventStreamEndpoint
from realtime.pages import page_routes
from realtime.websocket import RealtimeEndpoint


def realtime_routes(limits: Limits | None = None) -> list[BaseRoute]:
    return [
        WebSocketRoute("/v1/realtime", RealtimeEndpoint(limits)),
        Route("/v1/events", EventStreamEndpoint(limits), methods=["GET"]),
        *page_routes(),
    ]
