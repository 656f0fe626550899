"""List endpoints: the caller's church, keyset page parameters, the envelope; and
``read``, which runs a repository read where its freshness allows (a replica or
the primary: storage/pg/replicas.py)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

from starlette.requests import Request
from starlette.responses import Response

from api.auth import principal
from api.guard import READ_POSITION
from api.validation import page_params
from storage.pg.database import Conn
from storage.pg.pagination import Page
from storage.process.services import Services
from storage.responses import ok

P = ParamSpec("P")
T = TypeVar("T")

Lister = Callable[..., Awaitable[Page[Any]]]
"""``lister(conn, church_id, *args, limit=, cursor=, **kwargs)``: a repository list."""


def services_of(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


async def read(
    request: Request,
    fn: Callable[Concatenate[Conn, P], Awaitable[T]],
    *args: P.args,
    **kwargs: P.kwargs,
) -> T:
    """``fn(conn, ...)`` on a replica when ``fn`` is marked ``@stale_ok`` and one has
    replayed the church's last write, else on the primary. A request that was not
    charged to its church (no read position known) reads the primary."""
    position: int | None = request.scope.get(READ_POSITION)
    return await services_of(request).replicas.read(position, fn, *args, **kwargs)


def church_listing(lister: Lister) -> Callable[[Request], Awaitable[Response]]:
    """An endpoint that lists ``lister(conn, church_id, limit=, cursor=)``."""

    async def endpoint(request: Request) -> Response:
        return await paged(request, lister)

    return endpoint


async def paged(request: Request, lister: Lister, *args: Any, **kwargs: Any) -> Response:
    """One page of ``lister(conn, church_id, *args, limit=, cursor=, **kwargs)``."""
    who = await principal(request, "read")
    limit, cursor = page_params(request)
    page: Page[Any] = await read(
        request, lister, who.church_id, *args, limit=limit, cursor=cursor, **kwargs
    )
    return ok(page.items, next_cursor=page.next_cursor)
