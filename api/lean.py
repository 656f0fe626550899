"""Hot REST reads answered before Starlette's middleware stack and router.

``deploy/app.py FrontDoor`` hands a lean route the request inside ``RequestContext``
(request id, access log, metrics, security headers, body limit, 500s) and nothing
else. What the full stack would add is done here, the same way:

- CORS: a request with an ``Origin`` header passes through the app's own
  ``CORSMiddleware``, built from the very options the app was given (its
  ``user_middleware``), so a browser on an allow-listed origin gets the same
  headers as on every other route; requests without ``Origin`` (servers, API
  clients) skip it, as the middleware itself would do nothing for them;
- errors: an exception becomes the response of the app's handler for its class
  (``api.routes.exception_handlers``, by the class's MRO as Starlette looks them up);
  anything without a handler reaches ``RequestContext``, which answers 500.

py-spy of a web process serving ``GET /v1/conversations``: Starlette's middleware
stack and router were ~9-13 % of its samples (bench/README.md).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from api.operation import Handler

ExceptionHandler = Callable[[Request, Exception], Awaitable[Response]]


class LeanEndpoint:
    """One operation's guarded handler as a pure ASGI app (see the module text)."""

    def __init__(self, handler: Handler, handlers: Mapping[Any, ExceptionHandler]) -> None:
        self._handler = handler
        # ``Exception`` itself is Starlette's ServerErrorMiddleware's: RequestContext
        # answers those here (the same 500 envelope).
        self._on_error = {k: v for k, v in handlers.items() if k is not Exception}
        self._cors: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        for name, _ in scope["headers"]:
            if name == b"origin":
                cors = self._cors
                if cors is None:
                    cors = self._cors = _cors_of(scope["app"], self._plain)
                await cors(scope, receive, send)
                return
        await self._plain(scope, receive, send)

    async def _plain(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["path_params"] = {}
        request = Request(scope, receive, send)
        try:
            response = await self._handler(request)
        except Exception as exc:
            handler = self._handler_for(exc)
            if handler is None:
                raise
            response = await handler(request, exc)
        await response(scope, receive, send)

    def _handler_for(self, exc: Exception) -> ExceptionHandler | None:
        for cls in type(exc).__mro__:
            found = self._on_error.get(cls)
            if found is not None:
                return found
        return None


def _cors_of(app: Any, inner: ASGIApp) -> ASGIApp:
    """``inner`` behind the app's own CORSMiddleware (same options), or as is when the
    app has none."""
    for middleware in getattr(app, "user_middleware", ()):
        cls, args, kwargs = middleware
        if cls is CORSMiddleware:
            return CORSMiddleware(inner, *args, **kwargs)
    return inner
