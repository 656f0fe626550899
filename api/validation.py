"""Request decoding: msgspec types for bodies and query parameters.

A body must come as ``application/json`` (or a ``+json`` type), else it is
``unsupported_media_type``; one that is not JSON, or not UTF-8, is
``bad_request``; one that is JSON but does not fit the type (missing, mistyped
or unknown fields) is ``validation_error`` with ``details`` listing
``{"field", "message"}``.
"""

from __future__ import annotations

import re
import uuid
from typing import TypeVar

import msgspec
from starlette.requests import Request

from api.errors import ApiError, invalid_body, invalid_query
from storage.domain.envelope import FieldError
from storage.process.services import Services
from storage.responses import BodyTooLarge, read_body

T = TypeVar("T")

_decoders: dict[type, msgspec.json.Decoder[object]] = {}
_PATH = re.compile(r"at `\$(.*)`$")


def _decoder(kind: type[T]) -> msgspec.json.Decoder[T]:
    found = _decoders.get(kind)
    if found is None:
        found = msgspec.json.Decoder(kind)
        _decoders[kind] = found
    return found  # type: ignore[return-value]


def field_of(message: str) -> tuple[str, str]:
    """Split msgspec's "Expected `str`, got `int` - at `$.target.group_ids[0]`"."""
    match = _PATH.search(message)
    if match is None:
        if message.startswith("Object missing required field"):
            name = message.split("`")[1]
            return name, "is required"
        if message.startswith("Object contains unknown field"):
            name = message.split("`")[1]
            return name, "is not a known field"
        return "body", message
    path = match.group(1).lstrip(".")
    text = message[: match.start()].rstrip(" -")
    for kind, verb in (
        ("Object missing required field", "is required"),
        ("Object contains unknown field", "is not a known field"),
    ):
        if text.startswith(kind):
            name = text.split("`")[1]
            return (f"{path}.{name}" if path else name), verb
    return path or "body", text


async def decode_body(request: Request, kind: type[T]) -> T:
    services: Services = request.app.state.services
    try:
        raw = await read_body(request, services.settings.http.max_body_bytes)
    except BodyTooLarge as exc:
        raise ApiError("payload_too_large", "request body too large") from exc
    if not raw.strip():
        raw = b"{}"
    elif not is_json(request.headers.get("content-type")):
        # A browser sends text/plain or a form cross-site without a CORS preflight:
        # JSON accepted under those types would let any page write with a cookie.
        raise ApiError(
            "unsupported_media_type", "send the body as JSON with Content-Type: application/json"
        )
    if not raw.isascii():
        try:
            raw.decode()
        except UnicodeDecodeError as exc:
            # Checked whole, first: msgspec reports a field error before it reaches
            # the bad bytes when they sit in a field it refuses anyway.
            raise ApiError("bad_request", "request body is not valid UTF-8") from exc
    try:
        return _decoder(kind).decode(raw)
    except msgspec.ValidationError as exc:
        field, message = field_of(str(exc))
        raise invalid_body(FieldError(field, message)) from exc
    except msgspec.DecodeError as exc:
        raise ApiError("bad_request", "request body is not valid JSON") from exc
    except UnicodeDecodeError as exc:
        raise ApiError("bad_request", "request body is not valid UTF-8") from exc


def is_json(content_type: str | None) -> bool:
    """``application/json`` or a ``+json`` type (``application/merge-patch+json``), any
    parameters (a charset) aside."""
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def path_id(request: Request, name: str = "id") -> uuid.UUID:
    """A UUID path parameter; anything else cannot name a row, so it is not_found."""
    try:
        return uuid.UUID(request.path_params[name])
    except ValueError as exc:
        raise ApiError("not_found", "no such resource") from exc


def page_params(request: Request) -> tuple[int, str | None]:
    raw = request.query_params.get("limit", "50")
    try:
        limit = int(raw)
    except ValueError:
        limit = -1
    if not 1 <= limit <= 200:
        raise invalid_query(FieldError("limit", "must be an integer from 1 to 200"))
    cursor = request.query_params.get("cursor") or None
    return limit, cursor
