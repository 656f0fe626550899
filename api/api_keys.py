"""API keys (create, list, rotate, revoke) and one-time realtime tickets."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from api.auth import principal
from api.errors import invalid_body
from api.listing import church_listing, services_of
from api.operation import Operation, audit_details, audit_target
from api.schemas import ApiKeyCreated, ApiKeyRequest, TicketData
from api.validation import decode_body, path_id
from storage.domain.envelope import FieldError
from storage.pg.credentials import (
    ALL_SCOPES,
    TICKET_TTL_S,
    ApiKey,
    create_api_key,
    create_ticket,
    list_api_keys,
    revoke_api_key,
    rotate_api_key,
)
from storage.responses import ok


def _created(key: ApiKey, secret: str, status: int) -> Response:
    return ok(
        ApiKeyCreated(
            id=key.id,
            name=key.name,
            prefix=key.prefix,
            scopes=key.scopes,
            key=secret,
            created_at=key.created_at,
            rate_limit_per_min=key.rate_limit_per_min,
        ),
        status=status,
    )


async def create_key(request: Request) -> Response:
    who = await principal(request, "write")
    body = await decode_body(request, ApiKeyRequest)
    scopes: list[str] = sorted(set(body.scopes)) if body.scopes is not None else list(ALL_SCOPES)
    unknown = [s for s in scopes if s not in ALL_SCOPES]
    if unknown or not scopes:
        raise invalid_body(FieldError("scopes", f"allowed: {', '.join(ALL_SCOPES)}"))
    async with services_of(request).pool.connection() as conn:
        key, secret = await create_api_key(
            conn,
            who.church_id,
            name=body.name,
            scopes=scopes,
            created_by=who.user_id,
            rate_limit_per_min=body.rate_limit_per_min,
        )
    audit_target(request, key.id)
    audit_details(request, {"name": key.name, "scopes": key.scopes})
    return _created(key, secret, 201)


async def rotate_key(request: Request) -> Response:
    """A new secret for the same key (same id, name, scopes); the old one stops now."""
    who = await principal(request, "write")
    services = services_of(request)
    async with services.pool.connection() as conn:
        key, secret = await rotate_api_key(
            services.redis, conn, who.church_id, path_id(request), local=services.principals.forget
        )
    return _created(key, secret, 200)


async def delete_key(request: Request) -> Response:
    who = await principal(request, "write")
    services = services_of(request)
    async with services.pool.connection() as conn:
        key = await revoke_api_key(
            services.redis, conn, who.church_id, path_id(request), local=services.principals.forget
        )
    return ok(key)


async def create_realtime_ticket(request: Request) -> Response:
    """A one-time ticket for ``/v1/realtime?ticket=`` or ``/v1/events?ticket=``."""
    who = await principal(request, "read")
    ticket = await create_ticket(services_of(request).redis, who)
    return ok(TicketData(ticket=ticket, expires_in=TICKET_TTL_S), status=201)


def api_key_operations() -> list[Operation]:
    return [
        Operation(
            "POST",
            "/v1/api-keys",
            create_key,
            "api_key.create",
            "Create an API key (the secret is shown once)",
            "api_keys",
            scope="write",
            role="admin",
            session_only=True,
            body=ApiKeyRequest,
            response=ApiKeyCreated,
            status=201,
            examples={"integration": {"name": "Planning Center sync", "scopes": ["read"]}},
        ),
        Operation(
            "GET",
            "/v1/api-keys",
            church_listing(list_api_keys),
            "api_key.list",
            "List API keys (never their secrets)",
            "api_keys",
            role="admin",
            session_only=True,
            response=list[ApiKey],
            listing=True,
        ),
        Operation(
            "POST",
            "/v1/api-keys/{id}/rotate",
            rotate_key,
            "api_key.rotate",
            "Replace a key's secret; the old secret stops working at once",
            "api_keys",
            scope="write",
            role="admin",
            session_only=True,
            response=ApiKeyCreated,
        ),
        Operation(
            "DELETE",
            "/v1/api-keys/{id}",
            delete_key,
            "api_key.revoke",
            "Revoke an API key",
            "api_keys",
            scope="write",
            role="admin",
            session_only=True,
            response=ApiKey,
        ),
        Operation(
            "POST",
            "/v1/realtime/tickets",
            create_realtime_ticket,
            "realtime.ticket",
            "A one-time ticket for a realtime handshake (30 s)",
            "realtime",
            scope="read",
            response=TicketData,
            status=201,
            audit=False,
        ),
    ]
