"""Message templates: create, list, show, change, delete.

Merge fields are validated when a template is saved: each unknown or
malformed one is a ``validation_error`` on field ``body`` whose message names it.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from api.auth import principal
from api.branches import Deleted
from api.errors import invalid_body
from api.listing import church_listing, services_of
from api.operation import Operation, audit_target
from api.schemas import Body as MessageBody
from api.schemas import Name
from api.schemas import Request as RequestBody
from api.validation import decode_body, path_id
from storage.domain.envelope import FieldError
from storage.pg.templates import (
    Template,
    body_problems,
    create_template,
    delete_template,
    get_template,
    list_templates,
    update_template,
)
from storage.responses import ok


class TemplateCreate(RequestBody, frozen=True):
    name: Name
    body: MessageBody


class TemplateUpdate(RequestBody, frozen=True):
    name: Name | None = None
    body: MessageBody | None = None


def check_body(body: str | None) -> None:
    """Every merge-field problem of a named text at once (the store stops at the
    first); canned replies check theirs with it too."""
    if body is None:
        return
    problems = body_problems(body)
    if problems:
        raise invalid_body(*(FieldError(p.field, p.message) for p in problems))


async def post_template(request: Request) -> Response:
    who = await principal(request, "write")
    body = await decode_body(request, TemplateCreate)
    check_body(body.body)
    async with services_of(request).pool.connection() as conn:
        template = await create_template(conn, who.church_id, name=body.name, body=body.body)
    audit_target(request, template.id)
    return ok(template, status=201)


async def show_template(request: Request) -> Response:
    who = await principal(request, "read")
    async with services_of(request).pool.connection() as conn:
        template = await get_template(conn, who.church_id, path_id(request))
    return ok(template)


async def patch_template(request: Request) -> Response:
    who = await principal(request, "write")
    template_id = path_id(request)
    body = await decode_body(request, TemplateUpdate)
    check_body(body.body)
    async with services_of(request).pool.connection() as conn:
        template = await update_template(
            conn, who.church_id, template_id, name=body.name, body=body.body
        )
    return ok(template)


async def remove_template(request: Request) -> Response:
    who = await principal(request, "write")
    template_id = path_id(request)
    async with services_of(request).pool.connection() as conn:
        await delete_template(conn, who.church_id, template_id)
    return ok(Deleted(id=template_id, deleted=True))


def template_operations() -> list[Operation]:
    return [
        Operation(
            "POST",
            "/v1/templates",
            post_template,
            "template.create",
            "Save a message template",
            "templates",
            scope="write",
            body=TemplateCreate,
            response=Template,
            status=201,
            errors=("conflict",),
            examples={
                "welcome": {
                    "name": "Welcome",
                    "body": "Hi {{first_name}}, welcome to {{church_name}}!",
                }
            },
        ),
        Operation(
            "GET",
            "/v1/templates",
            church_listing(list_templates),
            "template.list",
            "List message templates",
            "templates",
            response=list[Template],
            listing=True,
        ),
        Operation(
            "GET",
            "/v1/templates/{id}",
            show_template,
            "template.show",
            "One message template",
            "templates",
            response=Template,
        ),
        Operation(
            "PATCH",
            "/v1/templates/{id}",
            patch_template,
            "template.update",
            "Change a template's name or body",
            "templates",
            scope="write",
            body=TemplateUpdate,
            response=Template,
            errors=("conflict",),
            examples={"body": {"body": "Hi {{first_name}}, see you Sunday!"}},
        ),
        Operation(
            "DELETE",
            "/v1/templates/{id}",
            remove_template,
            "template.delete",
            "Delete a message template (messages sent from it keep their text)",
            "templates",
            scope="write",
            response=Deleted,
        ),
    ]
