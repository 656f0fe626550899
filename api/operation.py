"""One REST operation: its route, who may call it, and the types it speaks.

Every ``/v1`` route is declared as an ``Operation``. The same declaration

- guards the handler: credentials, scope, role, the rate limits, and the audit
  row of a successful write;
- generates the OpenAPI document (``api/openapi.py``) from the msgspec types it
  names, so the documentation cannot drift from what is validated;
- drives the tests that walk every route (the cross-church matrix, the
  permission table).

Handlers still decode their own bodies with ``decode_body(request, Type)``; the
``body`` named here must be that same type (schemathesis checks the result).
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

Role = Literal["staff", "admin", "owner"]
Scope = Literal["read", "write"]
Handler = Callable[[Request], Awaitable[Response]]

ROLE_RANK: dict[str, int] = {"staff": 0, "admin": 1, "owner": 2}


@dataclass(frozen=True)
class QueryParam:
    name: str
    kind: Any
    """A Python type msgspec can describe (``str``, ``int``, ``uuid.UUID``, a Literal...)."""
    description: str = ""
    many: bool = False


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    handler: Handler
    name: str
    """Stable operation id, also the audit action (``member.create``)."""
    summary: str
    tag: str
    scope: Scope | None = "read"
    """None: no credentials (sign-up, login, password reset)."""
    role: Role = "staff"
    """The least staff role allowed; API keys count as ``admin`` within their scopes."""
    session_only: bool = False
    """Staff sessions only (managing people and keys): API keys get ``forbidden``."""
    monitoring: bool = False
    """Also answers ``Authorization: Bearer $KOINONIA_METRICS_TOKEN`` (the monitoring
    system's token, when set), as it would answer an admin."""
    body: Any = None
    body_media_type: str = "application/json"
    response: Any = None
    """The type of ``data`` in the success envelope (None: no data schema)."""
    status: int = 200
    listing: bool = False
    query: tuple[QueryParam, ...] = ()
    errors: tuple[str, ...] = ()
    """Error codes beyond the ones every operation of its kind can answer."""
    audit: bool | None = None
    """Record a row in the audit log on success; default: every write."""
    description: str = ""
    examples: dict[str, Any] = field(default_factory=dict)
    """Request body examples by name (shown in /docs)."""

    @property
    def audited(self) -> bool:
        if self.audit is not None:
            return self.audit
        return self.method != "GET" and self.scope is not None

    @property
    def path_params(self) -> list[str]:
        return [part[1:-1] for part in self.path.split("/") if part.startswith("{")]


def audit_target(request: Request, target_id: uuid.UUID | str) -> None:
    """Name the row a successful write made, for its audit entry (creates have no path id)."""
    request.scope["koinonia.audit_target"] = str(target_id)


def audit_details(request: Request, details: dict[str, Any]) -> None:
    """Extra, non-personal facts for the audit entry of this request."""
    request.scope["koinonia.audit_details"] = details


Guard = Callable[[Operation], Handler]


def routes_of(operations: list[Operation], guard: Guard) -> list[Route]:
    """Starlette routes, one per path, dispatching on method to guarded handlers."""
    by_path: dict[str, dict[str, Handler]] = {}
    for op in operations:
        methods = by_path.setdefault(op.path, {})
        if op.method in methods:
            raise ValueError(f"two operations for {op.method} {op.path}")
        methods[op.method] = guard(op)
    return [
        Route(path, _dispatch(handlers), methods=list(handlers))
        for path, handlers in by_path.items()
    ]


def _dispatch(handlers: dict[str, Handler]) -> Handler:
    if len(handlers) == 1:
        return next(iter(handlers.values()))

    async def endpoint(request: Request) -> Response:
        method = "GET" if request.method == "HEAD" else request.method
        return await handlers[method](request)

    return endpoint
