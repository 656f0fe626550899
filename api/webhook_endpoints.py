"""Webhook endpoints integrators register for events: manage them, rotate their
secrets, read their attempt logs, replay a delivery, send a test event.

Delivery itself is the worker's (``delivery/webhooks.py``); these routes only
write the endpoint rows and the outbox rows the worker picks up.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from api.auth import principal
from api.errors import invalid_body
from api.listing import church_listing, paged, services_of
from api.operation import Operation, audit_details, audit_target
from api.schemas import Request as RequestBody
from api.validation import decode_body, path_id
from storage.domain.envelope import FieldError
from storage.domain.errors import NotFound
from storage.pg.webhook_endpoints import (
    WebhookAttempt,
    WebhookEndpoint,
    create_endpoint,
    delete_endpoint,
    filter_problem,
    get_endpoint,
    list_attempts,
    list_endpoints,
    rotate_secret,
    update_endpoint,
    url_problem,
)
from storage.pg.webhook_outbox import event_id_text, record_test_event, replay
from storage.responses import ok

Url = Annotated[str, msgspec.Meta(min_length=8, max_length=2000, pattern=r"^[^\x00-\x20\x7f]+$")]
Events = Annotated[
    list[Annotated[str, msgspec.Meta(min_length=1, max_length=100)]],
    msgspec.Meta(min_length=1, max_length=100),
]
Description = Annotated[str, msgspec.Meta(max_length=500, pattern=r"^[^\x00]*$")]


class WebhookEndpointCreate(RequestBody, frozen=True):
    url: Url
    events: Events
    """Exact types (``message.completed``), prefixes (``message.*``) or ``*``."""
    description: Description = ""
    enabled: bool = True


class WebhookEndpointPatch(RequestBody, frozen=True):
    url: Url | msgspec.UnsetType = msgspec.UNSET
    events: Events | msgspec.UnsetType = msgspec.UNSET
    description: Description | msgspec.UnsetType = msgspec.UNSET
    enabled: bool | msgspec.UnsetType = msgspec.UNSET


class WebhookEndpointSecret(msgspec.Struct, frozen=True):
    """An endpoint with its signing secret: the answer to create and rotate only."""

    id: uuid.UUID
    url: str
    description: str
    events: list[str]
    enabled: bool
    disabled_reason: str | None
    created_at: datetime
    updated_at: datetime
    secret: str
    """``whsec_...``: shown this once."""


class WebhookDeliveryQueued(msgspec.Struct, frozen=True):
    endpoint_id: uuid.UUID
    event_id: str
    """The ``webhook-id`` the receiver will see."""
    status: str = "pending"


def _with_secret(endpoint: WebhookEndpoint, secret: str) -> WebhookEndpointSecret:
    return WebhookEndpointSecret(**msgspec.structs.asdict(endpoint), secret=secret)


def _validated(request: Request, url: str | None, events: list[str] | None) -> None:
    allow_private = services_of(request).settings.webhooks.allow_private_destinations
    errors: list[FieldError] = []
    if url is not None and (problem := url_problem(url, allow_private=allow_private)):
        errors.append(FieldError("url", problem))
    if events is not None and (problem := filter_problem(events)):
        errors.append(FieldError("events", problem))
    if errors:
        raise invalid_body(*errors)


async def post_endpoint(request: Request) -> Response:
    who = await principal(request, "write")
    body = await decode_body(request, WebhookEndpointCreate)
    _validated(request, body.url, body.events)
    events = list(dict.fromkeys(body.events))
    async with services_of(request).pool.connection() as conn:
        endpoint, secret = await create_endpoint(
            conn,
            who.church_id,
            url=body.url,
            events=events,
            description=body.description,
            enabled=body.enabled,
        )
    audit_target(request, endpoint.id)
    audit_details(request, {"events": events})
    return ok(_with_secret(endpoint, secret), status=201)


async def show_endpoint(request: Request) -> Response:
    who = await principal(request, "read")
    async with services_of(request).pool.connection() as conn:
        endpoint = await get_endpoint(conn, who.church_id, path_id(request))
    return ok(endpoint)


async def patch_endpoint(request: Request) -> Response:
    who = await principal(request, "write")
    endpoint_id = path_id(request)
    body = await decode_body(request, WebhookEndpointPatch)
    url = None if isinstance(body.url, msgspec.UnsetType) else body.url
    events = (
        None if isinstance(body.events, msgspec.UnsetType) else list(dict.fromkeys(body.events))
    )
    _validated(request, url, events)
    async with services_of(request).pool.connection() as conn:
        endpoint = await update_endpoint(
            conn,
            who.church_id,
            endpoint_id,
            url=url,
            events=events,
            description=None
            if isinstance(body.description, msgspec.UnsetType)
            else body.description,
            enabled=None if isinstance(body.enabled, msgspec.UnsetType) else body.enabled,
        )
    audit_details(
        request,
        {
            f: True
            for f in ("url", "events", "description", "enabled")
            if getattr(body, f) is not msgspec.UNSET
        },
    )
    return ok(endpoint)


async def remove_endpoint(request: Request) -> Response:
    who = await principal(request, "write")
    async with services_of(request).pool.connection() as conn:
        endpoint = await delete_endpoint(conn, who.church_id, path_id(request))
    return ok(endpoint)


async def rotate_endpoint_secret(request: Request) -> Response:
    """A new secret; the old one keeps signing beside it for the overlap."""
    who = await principal(request, "write")
    services = services_of(request)
    async with services.pool.connection() as conn:
        endpoint, secret = await rotate_secret(
            conn,
            who.church_id,
            path_id(request),
            overlap_s=services.settings.webhooks.secret_overlap_s,
        )
    return ok(_with_secret(endpoint, secret))


async def index_attempts(request: Request) -> Response:
    endpoint_id = path_id(request)
    return await paged(
        request,
        list_attempts,
        endpoint_id,
    )


async def replay_attempt(request: Request) -> Response:
    who = await principal(request, "write")
    endpoint_id = path_id(request)
    attempt_id = path_id(request, "attempt_id")
    async with services_of(request).pool.connection() as conn:
        await get_endpoint(conn, who.church_id, endpoint_id)
        event_id = await replay(conn, who.church_id, endpoint_id, attempt_id)
    if event_id is None:
        raise NotFound("webhook attempt")
    audit_details(request, {"attempt_id": str(attempt_id)})
    return ok(WebhookDeliveryQueued(endpoint_id, event_id_text(event_id)), status=202)


async def send_test_event(request: Request) -> Response:
    """A ``webhook_endpoint.test`` event to this endpoint only, whatever its filters."""
    who = await principal(request, "write")
    endpoint_id = path_id(request)
    async with services_of(request).pool.connection() as conn:
        await get_endpoint(conn, who.church_id, endpoint_id)
        event_id = await record_test_event(conn, who.church_id, endpoint_id)
    return ok(WebhookDeliveryQueued(endpoint_id, event_id_text(event_id)), status=202)


_TAG = "webhook_endpoints"
_ONE = "/v1/webhook-endpoints/{id}"


def webhook_endpoint_operations() -> list[Operation]:
    return [
        Operation(
            "POST",
            "/v1/webhook-endpoints",
            post_endpoint,
            "webhook_endpoint.create",
            "Register a webhook endpoint (its signing secret is shown once)",
            _TAG,
            scope="write",
            role="admin",
            body=WebhookEndpointCreate,
            response=WebhookEndpointSecret,
            status=201,
            examples={
                "messages": {
                    "url": "https://example.org/koinonia/hooks",
                    "events": ["message.*", "member.opted_out"],
                    "description": "Planning Center sync",
                }
            },
        ),
        Operation(
            "GET",
            "/v1/webhook-endpoints",
            church_listing(list_endpoints),
            "webhook_endpoint.list",
            "List webhook endpoints (never their secrets)",
            _TAG,
            response=list[WebhookEndpoint],
            listing=True,
        ),
        Operation(
            "GET",
            _ONE,
            show_endpoint,
            "webhook_endpoint.show",
            "One webhook endpoint",
            _TAG,
            response=WebhookEndpoint,
        ),
        Operation(
            "PATCH",
            _ONE,
            patch_endpoint,
            "webhook_endpoint.update",
            "Change an endpoint's URL, events, description, or enable/disable it",
            _TAG,
            scope="write",
            role="admin",
            body=WebhookEndpointPatch,
            response=WebhookEndpoint,
            description="Disabling pauses pending deliveries; enabling sends them.",
            examples={"re-enable": {"enabled": True}},
        ),
        Operation(
            "DELETE",
            _ONE,
            remove_endpoint,
            "webhook_endpoint.delete",
            "Delete an endpoint with its pending deliveries and attempt log",
            _TAG,
            scope="write",
            role="admin",
            response=WebhookEndpoint,
        ),
        Operation(
            "POST",
            _ONE + "/rotate-secret",
            rotate_endpoint_secret,
            "webhook_endpoint.rotate_secret",
            "Replace the signing secret; the old one keeps signing alongside for 24 h",
            _TAG,
            scope="write",
            role="admin",
            response=WebhookEndpointSecret,
            description=(
                "During the overlap each request carries two signatures in "
                "`webhook-signature` (`v1,<new> v1,<old>`), so a receiver that knows "
                "either secret verifies it."
            ),
        ),
        Operation(
            "GET",
            _ONE + "/attempts",
            index_attempts,
            "webhook_endpoint.attempts",
            "The endpoint's attempt log, newest first",
            _TAG,
            response=list[WebhookAttempt],
            listing=True,
        ),
        Operation(
            "POST",
            _ONE + "/attempts/{attempt_id}/replay",
            replay_attempt,
            "webhook_endpoint.replay",
            "Send the delivery of this attempt again, now",
            _TAG,
            scope="write",
            role="admin",
            response=WebhookDeliveryQueued,
            status=202,
        ),
        Operation(
            "POST",
            _ONE + "/test",
            send_test_event,
            "webhook_endpoint.test",
            "Send a webhook_endpoint.test event to this endpoint",
            _TAG,
            scope="write",
            role="admin",
            response=WebhookDeliveryQueued,
            status=202,
        ),
    ]
