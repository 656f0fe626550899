"""Sign-up, staff sessions and the caller's own identity; staff management joins
them from ``api/staff.py``."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from api.auth import principal
from api.errors import Unauthorized
from api.guard import charge_attempt
from api.listing import services_of
from api.operation import Operation
from api.schemas import Credential, LoggedOut, LoginRequest, MeData, SignupData, SignupRequest
from api.sessions import clear_session_cookies, hash_password, password_matches, signed_in
from api.staff import staff_operations
from api.validation import decode_body
from storage.pg.churches import create_church_with_owner, get_church, get_user, user_for_login
from storage.pg.credentials import delete_session
from storage.pg.staff import record_login
from storage.process.services import SESSION_COOKIE
from storage.responses import ok


async def signup(request: Request) -> Response:
    services = services_of(request)
    body = await decode_body(request, SignupRequest)
    password_hash = await hash_password(services.settings.security, body.password)
    async with services.pool.connection() as conn:
        church, user = await create_church_with_owner(
            conn,
            church_name=body.church_name,
            email=body.email.strip().lower(),
            password_hash=password_hash,
            number_prefix=services.settings.provider.number_pool_prefix,
        )
    return await signed_in(services, church, user, status=201)


async def login(request: Request) -> Response:
    services = services_of(request)
    body = await decode_body(request, LoginRequest)
    await charge_attempt(request, "login", body.email.strip().lower())
    found = None
    if "\x00" not in body.email:  # no account has one, and Postgres text cannot hold it
        async with services.pool.connection() as conn:
            found = await user_for_login(conn, body.email.strip())
    # An unknown email is checked against a dummy hash: it takes as long as a wrong password.
    matched = await password_matches(
        services.settings.security, found[1] if found else None, body.password
    )
    if found is None or not matched:
        raise Unauthorized("wrong email or password")
    user = found[0]
    async with services.pool.connection() as conn:
        church = await get_church(conn, user.church_id)
        if church is not None:
            await record_login(conn, user.church_id, user.id)
    if church is None:
        raise Unauthorized("wrong email or password")
    return await signed_in(services, church, user)


async def logout(request: Request) -> Response:
    await principal(request, "read")
    token = request.cookies.get(SESSION_COOKIE)
    if token:
        services = services_of(request)
        await delete_session(services.redis, token, local=services.principals.forget)
    response = ok(LoggedOut(logged_out=True))
    clear_session_cookies(response, services_of(request).settings.http)
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
        *staff_operations(),
    ]
