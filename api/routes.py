"""All REST routes of ``/v1`` and the handlers that turn errors into the envelope."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import psycopg
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute
from starlette.types import ASGIApp

from api.accounts import account_operations
from api.api_keys import api_key_operations
from api.archive import archive_operations
from api.audience import audience_operations
from api.audit_log import audit_operations
from api.broadcasts import broadcast_operations
from api.canned_replies import canned_reply_operations
from api.church import church_operations
from api.dead_letters import dead_letter_operations
from api.errors import ApiError
from api.estimates import estimate_operations
from api.guard import guarded
from api.health import health_operations
from api.inbox import inbox_operations
from api.keywords import keyword_operations
from api.lean import LeanEndpoint
from api.media import media_operations
from api.openapi import docs_routes
from api.operation import Operation, routes_of
from api.operations_stats import operations_stats_operations
from api.presence import presence_operations
from api.webhook_endpoints import webhook_endpoint_operations
from storage.domain.envelope import FieldError
from storage.domain.errors import Conflict, InvalidInput, NotFound
from storage.objects import ObjectStoreError
from storage.responses import fail

log = logging.getLogger("koinonia.api")


def operations() -> list[Operation]:
    """Every ``/v1`` operation: the routes, the OpenAPI document and the route-walking
    tests all come from this list."""
    return [
        *health_operations(),
        *account_operations(),
        *api_key_operations(),
        *audit_operations(),
        *audience_operations(),
        *estimate_operations(),
        *broadcast_operations(),
        *archive_operations(),
        *media_operations(),
        *inbox_operations(),
        *canned_reply_operations(),
        *presence_operations(),
        *keyword_operations(),
        *webhook_endpoint_operations(),
        *church_operations(),
        *dead_letter_operations(),
        *operations_stats_operations(),
    ]


def api_routes() -> list[BaseRoute]:
    return [
        *docs_routes(operations),
        *routes_of(operations(), guarded),
    ]


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return fail(exc.code, exc.message, exc.details, headers=exc.headers)


async def _not_found(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, NotFound)
    return fail("not_found", f"{exc.kind} not found")


async def _conflict(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Conflict)
    details = [FieldError(exc.field, str(exc))] if exc.field else None
    return fail(exc.code, str(exc), details)


async def _invalid(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, InvalidInput)
    return fail("validation_error", "request is not valid", [FieldError(exc.field, exc.message)])


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 400: "bad_request"}


async def _data(request: Request, exc: Exception) -> Response:
    # Input Postgres cannot store (a NUL character, an out-of-range number) that got
    # past validation: still the client's input, so a 422, never a 500.
    log.warning("input refused by the database", extra={"error": type(exc).__name__})
    return fail(
        "validation_error",
        "request contains a value that cannot be stored",
        [FieldError("body", "contains a value that cannot be stored (NUL or out of range)")],
    )


async def _http(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, "bad_request")
    return fail(code, str(exc.detail))


async def _unavailable(request: Request, exc: Exception) -> Response:
    # Postgres or Redis is down or out of connections: say so at once, never a 500
    # and never a long wait. The work is not lost: nothing was committed, or what
    # was committed is carried on by the sweeps.
    log.warning("store unavailable", extra={"error": type(exc).__name__})
    return fail(
        "unavailable",
        "a data store is not answering; try again shortly",
        headers={"Retry-After": "2"},
    )


async def _objects_unavailable(request: Request, exc: Exception) -> Response:
    # An archived read or a media file the object store did not give: the store is
    # down or unreachable, like a database outage, so the same answer. The live
    # months and text-only sends do not depend on it and keep answering.
    log.warning("object store unavailable", extra={"error": str(exc)})
    return fail(
        "unavailable",
        "the object store is not answering; try again shortly",
        headers={"Retry-After": "2"},
    )


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error", exc_info=exc)
    return fail("internal_error", "internal error")


def exception_handlers() -> Mapping[Any, Callable[[Request, Exception], Awaitable[Response]]]:
    return {
        ApiError: _api_error,
        NotFound: _not_found,
        Conflict: _conflict,
        InvalidInput: _invalid,
        psycopg.DataError: _data,
        psycopg.OperationalError: _unavailable,
        psycopg.InterfaceError: _unavailable,
        RedisConnectionError: _unavailable,
        RedisTimeoutError: _unavailable,
        ObjectStoreError: _objects_unavailable,
        HTTPException: _http,
        Exception: _unexpected,
    }


LEAN = frozenset({("GET", "/v1/messages"), ("GET", "/v1/conversations")})
"""The list pages clients poll: plain GETs served without the middleware stack and
the router (api/lean.py: same answers, CORS and errors included)."""


def api_lean_routes() -> list[tuple[str, str, ASGIApp]]:
    """Hot REST paths served before the middleware stack (``deploy/app.py FrontDoor``)."""
    handlers = exception_handlers()
    return [
        (op.method, op.path, LeanEndpoint(guarded(op), handlers))
        for op in operations()
        if (op.method, op.path) in LEAN
    ]
