"""The one response envelope (docs/protocol.md "REST"), as bytes: codes, statuses, bodies.

Every surface answers with it: REST routes, the SSE endpoint's refusals, the
inbound provider webhook. Error codes are stable snake_case strings; their HTTP
statuses are fixed here and nowhere else. ``storage/responses.py`` turns these
bytes into Starlette responses for the three edges.
"""

from __future__ import annotations

import contextvars
from typing import Any

import msgspec

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

STATUS: dict[str, int] = {
    "bad_request": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "conflict": 409,
    "opted_out": 409,
    "payload_too_large": 413,
    "unsupported_media_type": 415,
    "validation_error": 422,
    "rate_limited": 429,
    "internal_error": 500,
    "unavailable": 503,
}


class FieldError(msgspec.Struct, frozen=True):
    field: str
    message: str


class ErrorBody(msgspec.Struct, frozen=True, omit_defaults=True):
    code: str
    message: str
    details: Any = None


class Meta(msgspec.Struct, frozen=True, omit_defaults=True):
    request_id: str
    next_cursor: str | msgspec.UnsetType | None = msgspec.UNSET


class Success(msgspec.Struct, frozen=True):
    success: bool
    data: Any
    meta: Meta


class Failure(msgspec.Struct, frozen=True):
    success: bool
    error: ErrorBody
    meta: Meta


_encoder = msgspec.json.Encoder()


def success_bytes(
    data: Any, *, next_cursor: str | msgspec.UnsetType | None = msgspec.UNSET
) -> bytes:
    return _encoder.encode(
        Success(True, data, Meta(request_id=request_id_var.get(), next_cursor=next_cursor))
    )


def error_bytes(code: str, message: str, details: Any = None) -> bytes:
    return _encoder.encode(
        Failure(False, ErrorBody(code, message, details), Meta(request_id=request_id_var.get()))
    )
