"""Sign-up, sessions and API keys."""

from __future__ import annotations

import anyio.to_thread
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from api.auth import principal
from api.errors import Unauthorized, invalid_body
from api.listing import church_listing, services_of
from api.schemas import ApiKeyCreated, ApiKeyRequest, LoginRequest, SignupData, SignupRequest
from api.validation import decode_body, path_id
from storage.churches import (
    Church,
    StaffUser,
    create_church_with_owner,
    get_church,
    get_user,
    user_for_login,
)
from storage.credentials import (
    ALL_SCOPES,
    TICKET_TTL_S,
    create_api_key,
    create_session,
    create_ticket,
    delete_session,
    list_api_keys,
    revoke_api_key,
)
from storage.envelope import FieldError, ok
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
    response = ok({"logged_out": True})
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
        {
            "church": church,
            "user": user,
            "credential": {"kind": who.kind, "scopes": sorted(who.scopes)},
        }
    )


async def create_key(request: Request) -> Response:
    who = await principal(request, "write")
    body = await decode_body(request, ApiKeyRequest)
    scopes = sorted(set(body.scopes)) if body.scopes is not None else list(ALL_SCOPES)
    unknown = [s for s in scopes if s not in ALL_SCOPES]
    if unknown or not scopes:
        raise invalid_body(FieldError("scopes", f"allowed: {', '.join(ALL_SCOPES)}"))
    async with services_of(request).pool.connection() as conn:
        key, secret = await create_api_key(
            conn, who.church_id, name=body.name, scopes=scopes, created_by=who.user_id
        )
    return ok(
        ApiKeyCreated(
            id=key.id,
            name=key.name,
            prefix=key.prefix,
            scopes=key.scopes,
            key=secret,
            created_at=key.created_at,
        ),
        status=201,
    )


async def create_realtime_ticket(request: Request) -> Response:
    """A one-time ticket for ``/v1/realtime?ticket=`` or ``/v1/events?ticket=``."""
    # A POST: cookie-authenticated callers pass the CSRF check in ``principal``.
    who = await principal(request, "read")
    ticket = await create_ticket(services_of(request).redis, who)
    return ok({"ticket": ticket, "expires_in": TICKET_TTL_S}, status=201)


async def delete_key(request: Request) -> Response:
    who = await principal(request, "write")
    key_id = path_id(request)
    async with services_of(request).pool.connection() as conn:
        key = await revoke_api_key(conn, who.church_id, key_id)
    return ok(key)


def account_routes() -> list[BaseRoute]:
    return [
        Route("/v1/auth/signup", signup, methods=["POST"]),
        Route("/v1/auth/login", login, methods=["POST"]),
        Route("/v1/auth/logout", logout, methods=["POST"]),
        Route("/v1/me", me, methods=["GET"]),
        Route("/v1/api-keys", create_key, methods=["POST"]),
        Route("/v1/api-keys", church_listing(list_api_keys), methods=["GET"]),
        Route("/v1/api-keys/{id}", delete_key, methods=["DELETE"]),
        Route("/v1/realtime/tickets", create_realtime_ticket, methods=["POST"]),
    ]
