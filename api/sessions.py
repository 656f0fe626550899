"""Passwords (argon2id) and starting a staff session (the cookies a browser keeps).

Sign-up, login and accepting an invitation all end the same way: a session in
Redis and two cookies,

- ``koinonia_session``: the session token; httpOnly, so scripts never see it;
- ``koinonia_csrf``: readable by the page, echoed in ``X-CSRF-Token`` on every
  cookie-authenticated write (double submit);

both ``SameSite=Lax`` and ``Secure`` when ``KOINONIA_SECURE_COOKIES`` is set (served
over TLS).
"""

from __future__ import annotations

import functools

import anyio.to_thread
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from starlette.responses import Response

from api.schemas import SignupData
from storage.pg.churches import Church, StaffUser
from storage.pg.credentials import create_session
from storage.process.services import CSRF_COOKIE, SESSION_COOKIE, Services
from storage.process.settings import HttpSettings, SecuritySettings
from storage.responses import ok


@functools.cache
def _hasher(time_cost: int, memory_kib: int) -> tuple[PasswordHasher, str]:
    """argon2id with the configured cost (by default RFC 9106's second recommended
    profile), and a hash to verify against for an unknown email, so that it takes as
    long as a wrong password."""
    hasher = PasswordHasher(time_cost=time_cost, memory_cost=memory_kib)
    return hasher, hasher.hash("not-a-real-password-0000")


def _of(security: SecuritySettings) -> tuple[PasswordHasher, str]:
    return _hasher(security.password_time_cost, security.password_memory_kib)


async def hash_password(security: SecuritySettings, password: str) -> str:
    """An argon2id hash (``$argon2id$...``), computed off the event loop."""
    return await anyio.to_thread.run_sync(_of(security)[0].hash, password)


async def password_matches(security: SecuritySettings, stored: str | None, password: str) -> bool:
    """Whether ``password`` matches ``stored``; None (no such account) takes as long."""
    hasher, dummy = _of(security)
    try:
        await anyio.to_thread.run_sync(hasher.verify, stored or dummy, password)
    except (VerificationError, InvalidHashError):
        return False
    return stored is not None


def set_session_cookies(response: Response, http: HttpSettings, token: str, csrf: str) -> None:
    for name, value, httponly in ((SESSION_COOKIE, token, True), (CSRF_COOKIE, csrf, False)):
        response.set_cookie(
            name,
            value,
            max_age=http.session_ttl_s,
            httponly=httponly,
            samesite="lax",
            secure=http.secure_cookies,
            path="/",
        )


def clear_session_cookies(response: Response, http: HttpSettings) -> None:
    for name, httponly in ((SESSION_COOKIE, True), (CSRF_COOKIE, False)):
        response.delete_cookie(
            name, path="/", httponly=httponly, samesite="lax", secure=http.secure_cookies
        )


async def signed_in(
    services: Services, church: Church, user: StaffUser, *, status: int = 200
) -> Response:
    """Start a session for ``user`` and answer with it (``SignupData`` and the cookies)."""
    http = services.settings.http
    token, csrf = await create_session(
        services.redis,
        church_id=church.id,
        user_id=user.id,
        role=user.role,
        ttl_s=http.session_ttl_s,
    )
    response = ok(SignupData(church=church, user=user), status=status)
    set_session_cookies(response, http, token, csrf)
    return response
