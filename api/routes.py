"""All REST routes of ``/v1`` and the handlers that turn errors into the envelope."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

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
from storage.responses import KNOWN_FAILURES, fail, known_failure

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


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 400: "bad_request"}


async def _http(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, "bad_request")
    return fail(code, str(exc.detail))


async def _known(request: Request, exc: Exception) -> Response:
    response = known_failure(exc)
    assert response is not None
    return response


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error", exc_info=exc)
    return fail("internal_error", "internal error")


def exception_handlers() -> Mapping[Any, Callable[[Request, Exception], Awaitable[Response]]]:
    return {
        ApiError: _api_error,
        **dict.fromkeys(KNOWN_FAILURES, _known),
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
