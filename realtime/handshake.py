"""Authentication at the handshake, shared by the WebSocket and SSE endpoints.

Credentials: ``?ticket=`` (one-time, from ``POST /v1/realtime/tickets``),
``Authorization: Bearer <api key>``, or the session cookie. A
cookie is sent by the browser whatever page opened the connection, so with a
cookie the ``Origin`` must be the public URL or an allowed origin; browsers
always send ``Origin`` on a WebSocket handshake. A same-origin ``EventSource``
sends none, and a cross-site page cannot read an SSE response anyway, so SSE
checks ``Origin`` only when present.

Refusals happen before a WebSocket is accepted: HTTP 401 with the error
envelope through the ASGI ``websocket.http.response`` extension (uvicorn has
it); a server without it can only close, which clients see as 403.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlsplit

from starlette.requests import cookie_parser
from starlette.types import Scope, Send

from realtime.close_codes import CloseCode
from storage.domain.envelope import STATUS, error_bytes
from storage.pg.credentials import Principal, principal_for_ticket
from storage.process.services import SESSION_COOKIE, Services
from storage.process.settings import Settings
from storage.redis import key_names


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of a request header (``name`` lower-case)."""
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def query_value(scope: Scope, name: str) -> str | None:
    for key, value in parse_qsl(scope.get("query_string", b"").decode("latin-1")):
        if key == name:
            return str(value)
    return None


def origin_allowed(origin: str, settings: Settings) -> bool:
    if origin in settings.http.allowed_origins:
        return True
    public = urlsplit(settings.public_url)
    return origin == f"{public.scheme}://{public.netloc}"


async def authenticate(scope: Scope, services: Services, *, websocket: bool) -> Principal | None:
    """The principal for a handshake, or None to refuse with 401."""
    ticket = query_value(scope, "ticket")
    if ticket:
        return await principal_for_ticket(services.redis, ticket)
    authorization = header(scope, b"authorization")
    if authorization is not None:
        return await services.authenticate(authorization, None)
    cookies = header(scope, b"cookie")
    token = cookie_parser(cookies).get(SESSION_COOKIE) if cookies else None
    if not token:
        return None
    origin = header(scope, b"origin")
    if origin is None:
        if websocket:
            return None
    elif not origin_allowed(origin, services.settings):
        return None
    return await services.authenticate(None, token)


async def lifetime(services: Services, principal: Principal) -> float | None:
    """Seconds the principal's session has left: the connection closes with 4001
    then. None when nothing expires (an API key, a session without TTL); 0 when
    the session is gone already (a ticket whose session ended since it was made)."""
    if principal.session_hash is None:
        return None
    ttl_ms = await services.redis.pttl(key_names.session(principal.session_hash))
    if ttl_ms == -2:
        return 0.0
    return None if ttl_ms < 0 else ttl_ms / 1000


async def send_error(
    send: Send, code: str, message: str, *, details: Any = None, websocket: bool = False
) -> None:
    """An error envelope as a complete HTTP response (or a WebSocket denial response)."""
    body = error_bytes(code, message, details)
    prefix = "websocket.http.response" if websocket else "http.response"
    await send(
        {
            "type": f"{prefix}.start",
            "status": STATUS[code],
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
            ],
        }
    )
    await send({"type": f"{prefix}.body", "body": body})


async def refuse_websocket(scope: Scope, send: Send) -> None:
    """Refuse a WebSocket handshake with 401 (before accepting it)."""
    if "websocket.http.response" in (scope.get("extensions") or {}):
        await send_error(send, "unauthorized", "missing or invalid credentials", websocket=True)
    else:
        await send({"type": "websocket.close", "code": CloseCode.REFUSED})
