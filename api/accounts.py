"""Sign-up, staff sessions and the caller's own identity."""

from __future__ import annotations

import anyio.to_thread
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from starlette.requests import Request
from starlette.responses import Response

from api.auth import principal
from api.errors import Unauthorized
from api.guard import charge_attempt
from api.listing import services_of
from api.operation import Operation
from api.schemas import Credential, LoggedOut, LoginRequest, MeData, SignupData, SignupRequest
from api.validation import decode_body
from storage.churches import (
    Church,
    StaffUser,
    create_church_with_owner,
    get_church,
    get_user,
    user_for_login,
)
from storage.credentials import create_session, delete_session
from storage.envelope import ok
from storage.services import CSRF_COOKIE, SESSION_COOKIE, Services

_hasher = PasswordHasher()
# Verifying against this keeps an unknown email as slow as a wrong password.
_DUMMY_HASH = _hasher.hash("not-a-real-password-0000")


async def _signed_in(
    services: Services, church: Church, user: StaffUser, *, status: int = 200
) -> Response:
    """Start a session for ``user`` and answer with it: the session cookie (httpOnly)
    and the CSRF cookie that cookie-authenticated writes echo back."""
    http = services.settings.http
    token, csrf = await create_session(
        services.redis,
        church_id=church.id,
        user_id=user.id,
        role=user.role,
        ttl_s=http.session_ttl_s,
    )
    response = ok(SignupData(church=church, user=user), status=status)
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
    return response


async def signup(request: Request) -> Response:
    services = services_of(request)
    body = await decode_body(request, SignupRequest)
    password_hash = await anyio.to_thread.run_sync(_hasher.hash, body.password)
    async with services.pool.connection() as conn:
        church, user = await create_church_with_owner(
            conn,
            church_name=body.church_name,
            email=body.email.strip().lower(),
            password_hash=password_hash,
            number_prefix=services.settings.provider.number_pool_prefix,
        )
    return await _signed_in(services, church, user, status=201)


async def login(request: Request) -> Response:
    services = services_of(request)
    body = await decode_body(request, LoginRequest)
    await charge_attempt(request, "login", body.email.strip().lower())
    async with services.pool.connection() as conn:
        found = await user_for_login(conn, body.email.strip())
    stored = found[1] if found else _DUMMY_HASH
    try:
        await anyio.to_thread.run_sync(_hasher.verify, stored, body.password)
    except (VerificationError, InvalidHashError):
        found = None
    if found is None:
        raise Unauthorized("wrong email or password")
    user = found[0]
    async with services.pool.connection() as conn:
        church = await get_church(conn, user.church_id)
    if church is None:
        raise Unauthorized("wrong email or password")
    return await _signed_in(services, church, user)


async def logout(request: Request) -> Response:
    await principal(request, "read")
    token = request.cookies.get(SESSION_COOKIE)
    if token:
        await delete_session(services_of(request).redis, token)
    response = ok(LoggedOut(logged_out=True))
    response.delete_cookie(SESSION_COOKIE, path="/")
    response.delete_cookie(CSRF_COOKIE, path="/")
    return response


async def me(request: Request) -> Response:
    who = await principal(request, "read")
    services = services_of(request)
    async with services.pool.connection() as conn:
        church = await get_church(conn, who.church_id)
        user = await get_user(conn, who.church_id, who.user_id) if who.user_id else None
    return ok(
        MeData(
            church=church,
            user=user,
            credential=Credential(kind=who.kind, scopes=sorted(who.scopes)),
        )
    )


def account_operations() -> list[Operation]:
    return [
        Operation(
            "POST",
            "/v1/auth/signup",
            signup,
            "auth.signup",
            "Create a church and its owner",
            "auth",
            scope=None,
            body=SignupRequest,
            response=SignupData,
            status=201,
            errors=("conflict",),
            examples={
                "signup": {
                    "church_name": "Grace Chapel",
                    "email": "pastor@grace.example",
                    "password": "correct horse battery",
                }
            },
        ),
        Operation(
            "POST",
            "/v1/auth/login",
            login,
            "auth.login",
            "Start a staff session",
            "auth",
            scope=None,
            body=LoginRequest,
            response=SignupData,
            errors=("unauthorized", "rate_limited"),
        ),
        Operation(
            "POST",
            "/v1/auth/logout",
            logout,
            "auth.logout",
            "End this session",
            "auth",
            scope="read",
            session_only=True,
            response=LoggedOut,
            audit=False,
        ),
        Operation(
            "GET",
            "/v1/me",
            me,
            "me.show",
            "The caller: church, user and credential",
            "auth",
            response=MeData,
        ),
    ]
