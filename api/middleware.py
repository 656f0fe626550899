"""Request ids, access logs, security headers and the body-size gate, in one ASGI layer.

Pure ASGI (no BaseHTTPMiddleware) so streaming responses such as SSE pass
through unbuffered and WebSockets are untouched but for the request id.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.media import MAX_UPLOAD_BYTES, MEDIA_PATH
from storage.domain.envelope import error_bytes, request_id_var
from storage.pg.member_import import IMPORT_PATH, MAX_IMPORT_BYTES
from storage.process.metrics import Metrics

log = logging.getLogger("koinonia.access")

EVENT_STREAM = "koinonia.event_stream"
"""Set on a request answered with an event stream: it lasts as long as the client
stays, so its duration is not observed."""

_SANE_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
# Request ids made here: this process's random prefix and a counter, 32 hex digits
# as uuid4().hex was; unique without a urandom call and a UUID per request (~1.5 %
# of a list page's samples under py-spy).
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count()
_SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
]


class RequestContext:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        # The process's metrics, found once the app has started (None: off).
        self._metrics: Metrics | bool | None = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        incoming = ""
        declared = -1
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                incoming = value.decode("latin-1")
            elif name == b"content-length" and value.isdigit():
                declared = int(value)
        rid = (
            incoming
            if incoming and _SANE_ID.match(incoming)
            else f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"
        )
        token = request_id_var.set(rid)
        started = time.perf_counter()
        status = 0
        try:
            # CSV imports stream up to their own, larger limit (storage/pg/member_import.py).
            path = scope["path"]
            limit = (
                MAX_IMPORT_BYTES
                if path == IMPORT_PATH
                else MAX_UPLOAD_BYTES
                if path == MEDIA_PATH
                else self.max_body_bytes
            )
            if scope["type"] == "http" and declared > limit:
                status = 413
                await _refuse(send, rid, 413, "payload_too_large", "request body too large")
                return

            async def send_with_headers(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                    for name, value in message.get("headers", ()):
                        if name == b"content-type" and value.startswith(b"text/event-stream"):
                            scope[EVENT_STREAM] = True
                    headers = list(message.get("headers", []))
                    headers.append((b"x-request-id", rid.encode()))
                    headers.extend(_SECURITY_HEADERS)
                    # Set by handlers for any outcome, errors too (RateLimit-*).
                    headers.extend(scope.get("koinonia.extra_headers", ()))
                    message = {**message, "headers": headers}
                await send(message)

            try:
                await self.app(scope, receive, send_with_headers)
            except Exception:
                # Answered here, inside the request's context, so the log line carries
                # its request id and its real status.
                if status or scope["type"] != "http":
                    raise
                log.exception("unhandled error")
                status = 500
                await _refuse(send, rid, 500, "internal_error", "internal error")
        finally:
            if scope["type"] == "http":
                try:
                    self._measure(scope, status, started)
                except Exception:  # never let a metric cost a request its answer
                    log.exception("request not measured")
            if scope["type"] == "http" and scope["path"] not in ("/health/live",):
                log.info(
                    "request",
                    extra={
                        "method": scope.get("method"),
                        "path": scope["path"],
                        "status": status,
                        "ms": round((time.perf_counter() - started) * 1000, 2),
                    },
                )
            request_id_var.reset(token)

    def _measure(self, scope: Scope, status: int, started: float) -> None:
        """koinonia_http_requests_total and _duration_seconds, by route template (the
        matched route's path, ``unmatched`` when none matched: never a raw path)."""
        metrics = self._metrics
        if metrics is False:
            services = getattr(getattr(scope.get("app"), "state", None), "services", None)
            if services is None:
                return  # still starting
            metrics = self._metrics = services.metrics
        if not isinstance(metrics, Metrics):
            return
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        streamed = scope.get(EVENT_STREAM, False)
        seconds = None if streamed else time.perf_counter() - started
        metrics.http_request(route, scope["method"], status, seconds)


async def _refuse(send: Send, rid: str, status: int, code: str, text: str) -> None:
    body = error_bytes(code, text)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"x-request-id", rid.encode()),
                *_SECURITY_HEADERS,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
