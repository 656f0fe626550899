"""Media (MMS): POST /v1/media and reading files back (docs/protocol.md "Media (MMS)").

Three ways to a file:

- ``POST /v1/media`` (multipart/form-data, field ``file``) keeps an upload as the
  church's media (storage/media/library.py judges it by content, never by its name
  or declared type);
- ``GET /v1/media/{id}`` and ``GET /v1/media/{id}/content``: the church's staff and
  keys read its metadata and bytes, like every ``/v1`` read;
- ``GET /media/{church}/{media}?expires=&signature=`` (``media_link_routes``): the
  link the provider fetches a message's files from, outside ``/v1``. The link
  itself is the credential (storage/domain/media_links.py), so it passes neither the
  API's authentication nor its per-key rate limit; it only ever serves the one file
  it names, until it expires.

The upload route reads its own body, up to ``MAX_UPLOAD_BYTES``: the largest file a
carrier takes plus room for the multipart framing, which the API's usual body limit
(``KOINONIA_MAX_BODY_BYTES``, 1 MiB) would not leave.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Annotated

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from api.auth import principal
from api.errors import ApiError, invalid_body
from api.listing import read, services_of
from api.operation import Operation, audit_target
from api.schemas import NO_NUL
from api.validation import path_id
from storage.domain.envelope import FieldError
from storage.domain.errors import NotFound
from storage.domain.events import MediaItem
from storage.domain.media_links import content_url
from storage.domain.media_types import EXTENSIONS, MAX_MEDIA_BYTES, MAX_MEDIA_PER_MESSAGE
from storage.media.library import MediaTooLarge, UnsupportedMedia, check, keep
from storage.objects import ObjectNotFound
from storage.pg.media import Media, get_media
from storage.responses import BodyTooLarge, fail, ok, read_body

MEDIA_PATH = "/v1/media"
MAX_UPLOAD_BYTES = MAX_MEDIA_BYTES + 64 * 1024
"""The upload's whole body: one carrier-sized file and its multipart framing (a
boundary, a few part headers). api/middleware.py must let this path's declared
length up to here, as it does for member imports."""

MediaBody = Annotated[str, msgspec.Meta(max_length=1600, pattern=NO_NUL)]
"""A text's body that may be empty: an MMS may be its files alone (the handler
refuses an empty body without media)."""

MediaIds = Annotated[list[uuid.UUID], msgspec.Meta(max_length=MAX_MEDIA_PER_MESSAGE)]


def media_problems(media_ids: list[uuid.UUID] | None) -> list[FieldError]:
    """What is wrong with a send's ``media_ids`` before any lookup (a repeat: the
    provider would fetch and the member receive the same file twice)."""
    if media_ids and len(set(media_ids)) != len(media_ids):
        return [FieldError("media_ids", "must not repeat an id")]
    return []


class MediaUpload(msgspec.Struct, frozen=True):
    """``multipart/form-data`` with one part: the file (its name and declared type are
    ignored; the bytes decide)."""

    file: bytes


def _item(public_url: str, media: Media) -> MediaItem:
    return MediaItem(
        id=media.id,
        content_type=media.content_type,
        size=media.size,
        url=content_url(public_url, media.id),
    )


# -- multipart -----------------------------------------------------------------------

_BOUNDARY = re.compile(r"""boundary=(?:"([^"]{1,70})"|([^;\s"]{1,70}))""", re.IGNORECASE)
_NAME = re.compile(rb"""(?:^|;)\s*name="([^"]*)\"""", re.IGNORECASE)


def form_file(content_type: str, body: bytes, field: str = "file") -> bytes | None:
    """The bytes of the part named ``field`` of a ``multipart/form-data`` body (RFC
    7578), None when there is no such part; ``bad_request`` when the body is not
    multipart as declared. Parsed here on the whole body: it is bounded by
    ``MAX_UPLOAD_BYTES``, and the standard library's email parser would rewrite line
    endings inside binary parts."""
    found = _BOUNDARY.search(content_type)
    if found is None:
        raise ApiError("bad_request", "multipart/form-data without a boundary")
    delimiter = b"--" + (found.group(1) or found.group(2)).encode("latin-1")
    if not body.startswith(delimiter):
        # A preamble is allowed before the first delimiter, on a line of its own.
        start = body.find(b"\r\n" + delimiter)
        if start < 0:
            raise ApiError("bad_request", "multipart body without its boundary")
        body = body[start + 2 :]
    parts = body.split(b"\r\n" + delimiter)
    if not parts[-1].startswith(b"--"):
        raise ApiError("bad_request", "multipart body without its closing boundary")
    for part in parts[:-1]:
        part = part.removeprefix(delimiter)
        # After the delimiter: optional whitespace, CRLF, the headers, an empty line.
        head_end = part.find(b"\r\n\r\n")
        if head_end < 0:
            raise ApiError("bad_request", "multipart part without headers")
        headers = part[:head_end].split(b"\r\n")[1:]
        for header in headers:
            name, _, value = header.partition(b":")
            if name.strip().lower() == b"content-disposition":
                named = _NAME.search(value.strip())
                if named is not None and named.group(1).decode("latin-1") == field:
                    return part[head_end + 4 :]
    return None


# -- /v1/media -----------------------------------------------------------------------


async def upload_media(request: Request) -> Response:
    """Judge the file by its bytes, store it, answer its metadata (201)."""
    who = await principal(request, "write")
    content_type = request.headers.get("content-type", "")
    if content_type.split(";", 1)[0].strip().lower() != "multipart/form-data":
        raise ApiError("unsupported_media_type", "send the file as multipart/form-data, field file")
    try:
        body = await read_body(request, MAX_UPLOAD_BYTES)
    except BodyTooLarge as exc:
        raise ApiError("payload_too_large", f"media is limited to {MAX_MEDIA_BYTES} bytes") from exc
    data = form_file(content_type, body)
    if data is None:
        raise invalid_body(FieldError("file", "is required"))
    try:
        # Judged before any I/O: a refused file touches neither store.
        check(data)
    except (UnsupportedMedia, MediaTooLarge) as exc:
        raise ApiError(exc.code, str(exc)) from exc
    services = services_of(request)
    async with services.pool.connection() as conn, conn.transaction():
        media = await keep(
            services.objects, conn, who.church_id, data, source="upload", created_by=who.user_id
        )
    audit_target(request, media.id)
    return ok(_item(services.settings.public_url, media), status=201)


async def show_media(request: Request) -> Response:
    who = await principal(request, "read")
    media = await read(request, get_media, who.church_id, path_id(request))
    return ok(_item(services_of(request).settings.public_url, media))


async def _bytes(request: Request, media: Media) -> bytes:
    """The file's bytes. A row names bytes that were stored first
    (storage/media/library.py), so a missing object is one removed by hand: not found,
    like a missing row; any other store failure is ``503 unavailable`` (api/routes.py)."""
    try:
        return await services_of(request).objects.get(media.object_key)
    except ObjectNotFound as exc:
        raise NotFound("media") from exc


def _file_response(media: Media, data: bytes, cache: str) -> Response:
    """The stored bytes under the type judged at upload. Only images are shown inline:
    a PDF or a vCard opened from our origin is downloaded instead, and the sandboxing
    policy keeps any active content of a file from running as our page."""
    disposition = "inline" if media.content_type.startswith("image/") else "attachment"
    name = f"{media.id}.{EXTENSIONS.get(media.content_type, 'bin')}"
    return Response(
        data,
        media_type=media.content_type,
        headers={
            "Content-Disposition": f'{disposition}; filename="{name}"',
            "Cache-Control": cache,
            "Content-Security-Policy": "default-src 'none'; sandbox",
        },
    )


async def media_content(request: Request) -> Response:
    who = await principal(request, "read")
    media = await read(request, get_media, who.church_id, path_id(request))
    data = await _bytes(request, media)
    # Private: the file is the church's; a shared cache must not keep it.
    return _file_response(media, data, "private, max-age=300")


def media_operations() -> list[Operation]:
    return [
        Operation(
            "POST",
            MEDIA_PATH,
            upload_media,
            "media.create",
            "Upload a file to send as MMS (JPEG, PNG, GIF, MP4, MP3, vCard, PDF; 1 MiB)",
            "media",
            scope="write",
            body=MediaUpload,
            body_media_type="multipart/form-data",
            response=MediaItem,
            status=201,
            errors=("unsupported_media_type", "payload_too_large"),
            description=(
                "Field `file` of a `multipart/form-data` body. The type is judged by the "
                "file's content, never by its name or declared type: JPEG, PNG, GIF, MP4, "
                "MP3, vCard or PDF, at most 1,048,576 bytes (carriers' limit). Anything else "
                "is `415 unsupported_media_type`; larger files `413 payload_too_large`. The "
                "answer's `id` goes in `media_ids` of `POST /v1/messages` or "
                "`POST /v1/conversations/{id}/messages`; `url` opens the file for the "
                "church's staff and keys."
            ),
            examples={"file": {"file": "<the file's bytes, as a multipart part>"}},
        ),
        Operation(
            "GET",
            MEDIA_PATH + "/{id}",
            show_media,
            "media.show",
            "One file's metadata",
            "media",
            response=MediaItem,
        ),
        Operation(
            "GET",
            MEDIA_PATH + "/{id}/content",
            media_content,
            "media.content",
            "One file's bytes, under the type judged at upload",
            "media",
            description=(
                "`Cache-Control: private`; images are shown inline, other files are "
                "downloads (`Content-Disposition: attachment`)."
            ),
        ),
    ]


# -- the provider's link (outside /v1) -------------------------------------------------


def _uuid(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError as exc:
        raise NotFound("media") from exc


async def media_link(request: Request) -> Response:
    """``GET /media/{church_id}/{media_id}?expires=&signature=``: the file, for whoever
    holds an unexpired link we signed. The signature is checked before any lookup, so
    a link cannot be used to learn which ids exist."""
    church_id = _uuid(request.path_params["church_id"])
    media_id = _uuid(request.path_params["media_id"])
    expires_raw = request.query_params.get("expires", "")
    signature = request.query_params.get("signature", "")
    services = services_of(request)
    if not (
        # ASCII digits only: str.isdigit() also takes "²", which int() refuses.
        expires_raw.isascii()
        and expires_raw.isdigit()
        and len(expires_raw) <= 12
        and services.media_links.valid(
            church_id, media_id, int(expires_raw), signature, time.time()
        )
    ):
        return fail("forbidden", "the link is not valid or has expired")
    async with services.pool.connection() as conn:
        media = await get_media(conn, church_id, media_id)
    return _file_response(media, await _bytes(request, media), "private, max-age=60")


def media_link_routes() -> list[BaseRoute]:
    """Mounted next to ``api_routes()`` (deploy/app.py): not an Operation, so none of the
    API's credentials, scopes or rate limits apply."""
    return [Route("/media/{church_id}/{media_id}", media_link, methods=["GET"])]
