"""The envelope as Starlette responses: the one module of ``storage`` that knows HTTP.

REST routes, the SSE endpoint's refusals and the inbound provider webhook all
answer through it, so a code's status (``storage/domain/envelope.py`` ``STATUS``)
and the bytes of the body are the same on every edge.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
import psycopg
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.requests import Request
from starlette.responses import Response

from storage.domain.envelope import STATUS, FieldError, error_bytes, success_bytes
from storage.domain.errors import Conflict, InvalidInput, NotFound
from storage.objects import ObjectStoreError

log = logging.getLogger("koinonia.responses")

STORE_DOWN: tuple[type[Exception], ...] = (
    psycopg.OperationalError,
    psycopg.InterfaceError,
    RedisConnectionError,
    RedisTimeoutError,
)
"""Postgres or Redis down or out of connections."""

KNOWN_FAILURES: tuple[type[Exception], ...] = (
    InvalidInput,
    NotFound,
    Conflict,
    psycopg.DataError,
    *STORE_DOWN,
    ObjectStoreError,
)
"""What ``known_failure`` answers (api/routes.py's handlers, the lean webhook route)."""


class JSONResponse(Response):
    media_type = "application/json"


def ok(
    data: Any, *, status: int = 200, next_cursor: str | msgspec.UnsetType | None = msgspec.UNSET
) -> Response:
    return JSONResponse(success_bytes(data, next_cursor=next_cursor), status_code=status)


def fail(
    code: str, message: str, details: Any = None, *, headers: dict[str, str] | None = None
) -> Response:
    return JSONResponse(
        error_bytes(code, message, details), status_code=STATUS.get(code, 400), headers=headers
    )


def known_failure(exc: Exception) -> Response | None:
    """The answer to an error raised below the edge, the same on every route that
    meets it (REST's handlers, the provider webhook's lean route); None for what is
    a 500."""
    if isinstance(exc, InvalidInput):
        return fail(
            "validation_error", "request is not valid", [FieldError(exc.field, exc.message)]
        )
    if isinstance(exc, NotFound):
        return fail("not_found", f"{exc.kind} not found")
    if isinstance(exc, Conflict):
        details = [FieldError(exc.field, str(exc))] if exc.field else None
        return fail(exc.code, str(exc), details)
    if isinstance(exc, psycopg.DataError):
        # Input Postgres cannot store (a NUL character, an out-of-range number) that
        # got past validation: still the client's input, so a 422, never a 500.
        log.warning("input refused by the database", extra={"error": type(exc).__name__})
        return fail(
            "validation_error",
            "request contains a value that cannot be stored",
            [FieldError("body", "contains a value that cannot be stored (NUL or out of range)")],
        )
    if isinstance(exc, STORE_DOWN):
        # Say so at once, never a 500 and never a long wait. The work is not lost:
        # nothing was committed, or what was is carried on by the sweeps (a provider
        # webhook not answered 200 is delivered again).
        log.warning("store unavailable", extra={"error": type(exc).__name__})
        return fail(
            "unavailable",
            "a data store is not answering; try again shortly",
            headers={"Retry-After": "2"},
        )
    if isinstance(exc, ObjectStoreError):
        # An archived read or a media file the object store did not give: like a
        # database outage, the same answer. The live months and text-only sends do
        # not depend on it and keep answering.
        log.warning("object store unavailable", extra={"error": str(exc)})
        return fail(
            "unavailable",
            "the object store is not answering; try again shortly",
            headers={"Retry-After": "2"},
        )
    return None


class BodyTooLarge(Exception):
    pass


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes whatever the headers say."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)
