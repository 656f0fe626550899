"""The envelope as Starlette responses: the one module of ``storage`` that knows HTTP.

REST routes, the SSE endpoint's refusals and the inbound provider webhook all
answer through it, so a code's status (``storage/domain/envelope.py`` ``STATUS``)
and the bytes of the body are the same on every edge.
"""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from storage.domain.envelope import STATUS, error_bytes, success_bytes


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
