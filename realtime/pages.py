"""The staff pages: ``/inbox`` (the live shared inbox), ``/dashboard`` (live
broadcast progress) and ``/operations`` (owners: live operating figures, drawn from
``GET /v1/operations/stats``), and the assets they load from ``/static/``.

Plain HTML, CSS and JavaScript modules from ``realtime/static/``, written by
hand and served as they are: no build step, no external assets. The pages talk
to the public API only (REST, ``/v1/realtime``, ``/v1/events``) with the staff
session cookie; a signed-out visitor gets the login form on the same page.

Files are read once and served from memory with an ETag, revalidated on every
load (``no-cache``) so a deploy is seen at once. Pages carry a strict
Content-Security-Policy: scripts, styles and connections from this origin only,
no inline code, no framing.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from storage.responses import fail

STATIC_DIR = Path(__file__).parent / "static"

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)

_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
_ASSET_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*\.(?:js|css|svg)$")


class _File:
    __slots__ = ("body", "etag", "media_type")

    def __init__(self, path: Path) -> None:
        self.body = path.read_bytes()
        self.media_type = _MEDIA_TYPES[path.suffix]
        self.etag = '"' + hashlib.sha256(self.body).hexdigest()[:20] + '"'

    def response(self, request: Request, *, page: bool) -> Response:
        headers = {"etag": self.etag, "cache-control": "no-cache"}
        if page:
            headers["content-security-policy"] = CSP
        if request.headers.get("if-none-match") == self.etag:
            return Response(status_code=304, headers=headers)
        return Response(self.body, media_type=self.media_type, headers=headers)


class _Files:
    """The static folder, loaded on first use and kept in memory."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._files: dict[str, _File] | None = None

    def get(self, name: str) -> _File | None:
        if self._files is None:
            self._files = {
                p.name: _File(p)
                for p in sorted(self._directory.iterdir())
                if p.is_file() and p.suffix in _MEDIA_TYPES
            }
        return self._files.get(name)


def page_routes(directory: Path = STATIC_DIR) -> list[BaseRoute]:
    files = _Files(directory)

    def page(name: str) -> Route:
        async def serve(request: Request) -> Response:
            found = files.get(name)
            if found is None:
                return fail("not_found", "page not found")
            return found.response(request, page=True)

        return Route(f"/{name.removesuffix('.html')}", serve, methods=["GET"])

    async def asset(request: Request) -> Response:
        name = str(request.path_params["name"])
        found = files.get(name) if _ASSET_NAME.match(name) else None
        if found is None:
            return fail("not_found", "asset not found")
        return found.response(request, page=False)

    return [
        page("inbox.html"),
        page("dashboard.html"),
        page("operations.html"),
        Route("/static/{name}", asset, methods=["GET"]),
    ]
