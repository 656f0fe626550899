"""Who is calling: the principal of a request, its scopes and CSRF."""

from __future__ import annotations

import hmac

from starlette.requests import Request

from api.errors import Forbidden, Unauthorized
from storage.pg.credentials import Principal
from storage.process.services import CSRF_COOKIE, SESSION_COOKIE, Services

_SAFE = frozenset({"GET", "HEAD", "OPTIONS"})


async def principal(request: Request, scope: str = "read") -> Principal:
    """The caller, or Unauthorized; Forbidden when it lacks ``scope``.

    Cookie-authenticated writes must echo the CSRF cookie in ``X-CSRF-Token``
    (double submit); API-key requests carry no ambient credentials and need none.
    """
    cached: Principal | None = request.scope.get("koinonia.principal")
    if cached is None:
        services: Services = request.app.state.services
        cached = await services.authenticate(
            request.headers.get("authorization"), request.cookies.get(SESSION_COOKIE)
        )
        if cached is None:
            raise Unauthorized("missing or invalid credentials")
        request.scope["koinonia.principal"] = cached
    if cached.kind == "session" and request.method not in _SAFE:
        sent = request.headers.get("x-csrf-token", "")
        cookie = request.cookies.get(CSRF_COOKIE, "")
        expected = cached.csrf_token or ""
        if (
            not sent
            or not hmac.compare_digest(sent, cookie)
            or not hmac.compare_digest(sent, expected)
        ):
            raise Forbidden("missing or wrong X-CSRF-Token for a cookie-authenticated write")
    if not cached.can(scope):
        raise Forbidden(f"this credential lacks the {scope!r} scope")
    return cached
