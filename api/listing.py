"""List endpoints: the caller's church, keyset page parameters, the envelope."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from api.auth import principal
from api.validation import page_params
from storage.pg.database import Conn
from storage.pg.pagination import Page
from storage.process.services import Services
from storage.responses import ok

Lister = Callable[..., Awaitable[Page[Any]]]


def services_of(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def church_listing(lister: Lister) -> Callable[[Request], Awaitable[Response]]:
    """An endpoint that lists ``lister(conn, church_id, limit=, cursor=)``."""

    async def endpoint(request: Request) -> Response:
        who = await principal(request, "read")
        limit, cursor = page_params(request)
        async with services_of(request).pool.connection() as conn:
            page = await lister(conn, who.church_id, limit=limit, cursor=cursor)
        return ok(page.items, next_cursor=page.next_cursor)

    return endpoint


async def paged(
    request: Request, lister: Callable[[Conn, uuid.UUID, int, str | None], Awaitable[Page[Any]]]
) -> Response:
    """The same, for listers that need more than the church (a parent id, a vault)."""
    who = await principal(request, "read")
    limit, cursor = page_params(request)
    async with services_of(request).pool.connection() as conn:
        page = await lister(conn, who.church_id, limit, cursor)
    return ok(page.items, next_cursor=page.next_cursor)
