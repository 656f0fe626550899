"""Webhook endpoints integrators register for events."""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from api.auth import principal
from api.errors import invalid_body
from api.listing import church_listing
from api.operation import Operation
from api.schemas import WebhookEndpointCreated, WebhookEndpointRequest
from api.validation import decode_body
from storage.envelope import FieldError, ok
from storage.services import Services
from storage.webhook_endpoints import create_endpoint, list_endpoints

EVENT_TYPES = frozenset(
    {
        "message.created",
        "message.progress",
        "message.completed",
        "message.recipient.status",
        "conversation.created",
        "conversation.updated",
        "conversation.message.created",
        "conversation.message.status",
        "member.created",
        "member.updated",
        "member.opted_out",
        "member.opted_in",
        "webhook_endpoint.disabled",
    }
)
_PREFIXES = frozenset(t.split(".")[0] + ".*" for t in EVENT_TYPES)


def event_filter_problem(events: list[str]) -> str | None:
    for name in events:
        if name != "*" and name not in EVENT_TYPES and name not in _PREFIXES:
            return f"unknown event type or prefix: {name}"
    return None


async def post_endpoint(request: Request) -> Response:
    who = await principal(request, "write")
    body = await decode_body(request, WebhookEndpointRequest)
    parts = urlsplit(body.url)
    errors: list[FieldError] = []
    if parts.scheme not in ("http", "https") or not parts.hostname:
        errors.append(FieldError("url", "must be an absolute http or https URL"))
    problem = event_filter_problem(body.events)
    if problem:
        errors.append(FieldError("events", problem))
    if errors:
        raise invalid_body(*errors)
    services: Services = request.app.state.services
    async with services.pool.connection() as conn:
        endpoint, secret = await create_endpoint(
            conn, who.church_id, url=body.url, events=list(dict.fromkeys(body.events))
        )
    return ok(
        WebhookEndpointCreated(
            id=endpoint.id,
            url=endpoint.url,
            events=endpoint.events,
            secret=secret,
            enabled=endpoint.enabled,
            created_at=endpoint.created_at,
        ),
        status=201,
    )


def webhook_endpoint_routes() -> list[BaseRoute]:
    return [
        Route("/v1/webhook-endpoints", post_endpoint, methods=["POST"]),
        Route("/v1/webhook-endpoints", church_listing(list_endpoints), methods=["GET"]),
    ]


def webhook_endpoint_operations() -> list[Operation]:
    return []
