"""One server span per HTTP request, named by method and route template.

Added by deploy/app.py as the outermost layer only when tracing is on
(storage/process/tracing.py), so with tracing off it costs nothing. The span is
named ``GET /v1/messages/{id}`` from the route that matched (Starlette leaves it
in the scope), never from the raw path, so ids do not make a name per request;
a request no route matched is named by its method alone. A W3C ``traceparent``
header from the caller is continued. WebSockets and lifespan pass through
untouched; ``/health/live`` (polled by balancers) makes no span.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from storage.domain.envelope import request_id_var
from storage.process import tracing

UNTRACED = frozenset({"/health/live"})


class TracingMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNTRACED or not tracing.enabled():
            await self.app(scope, receive, send)
            return
        method = scope.get("method", "GET")
        incoming = ""
        for name, value in scope["headers"]:
            if name == b"traceparent":
                incoming = value.decode("latin-1")
                break
        status = 0
        request_id = ""
        with tracing.span(
            method,
            parent=incoming if tracing.parse_traceparent(incoming) else "",
            kind="server",
            attributes={"http.request.method": method, "url.scheme": scope.get("scheme", "http")},
        ) as span:

            async def send_traced(message: Message) -> None:
                nonlocal status, request_id
                if message["type"] == "http.response.start":
                    status = message["status"]
                    # Sent from inside the request context layer: its request id is set.
                    request_id = request_id_var.get()
                await send(message)

            try:
                await self.app(scope, receive, send_traced)
            finally:
                if span is not None:
                    attributes: dict[str, str | int] = {}
                    route = route_template(scope)
                    if route:
                        span.update_name(f"{method} {route}")
                        attributes["http.route"] = route
                    if status:
                        attributes["http.response.status_code"] = status
                    if request_id and request_id != "-":
                        attributes["koinonia.request_id"] = request_id
                    span.set_attributes(attributes)
                    if status >= 500:
                        tracing.fail(span, str(status))


def route_template(scope: Scope) -> str:
    """The path template of the route that handled the request ('' when none did)."""
    path = getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) else ""
