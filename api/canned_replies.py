"""Canned replies: /v1/canned-replies (docs/protocol.md "The inbox").

A canned reply is sent with ``POST /v1/conversations/{id}/messages``
``{"canned_reply_id"}`` (api/inbox.py), filled for the member. Its merge fields
are checked when it is saved, as a template's are: each unknown or malformed one is
a ``validation_error`` on field ``body`` whose message names it.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from api.auth import principal
from api.branches import Deleted
from api.listing import church_listing, services_of
from api.operation import Operation, audit_target
from api.schemas import Body as MessageBody
from api.schemas import Name
from api.schemas import Request as RequestBody
from api.templates import check_body
from api.validation import decode_body, path_id
from storage.pg.canned_replies import (
    CannedReply,
    create_canned_reply,
    delete_canned_reply,
    list_canned_replies,
    update_canned_reply,
)
from storage.responses import ok


class CannedReplyCreate(RequestBody, frozen=True):
    name: Name
    body: MessageBody


class CannedReplyUpdate(RequestBody, frozen=True):
    name: Name | None = None
    body: MessageBody | None = None


async def post_canned_reply(request: Request) -> Response:
    who = await principal(request, "write")
    body = await decode_body(request, CannedReplyCreate)
    check_body(body.body)
    async with services_of(request).pool.connection() as conn:
        canned = await create_canned_reply(conn, who.church_id, name=body.name, body=body.body)
    audit_target(request, canned.id)
    return ok(canned, status=201)


async def patch_canned_reply(request: Request) -> Response:
    who = await principal(request, "write")
    canned_reply_id = path_id(request)
    body = await decode_body(request, CannedReplyUpdate)
    check_body(body.body)
    async with services_of(request).pool.connection() as conn:
        canned = await update_canned_reply(
            conn, who.church_id, canned_reply_id, name=body.name, body=body.body
        )
    return ok(canned)


async def remove_canned_reply(request: Request) -> Response:
    who = await principal(request, "write")
    canned_reply_id = path_id(request)
    async with services_of(request).pool.connection() as conn:
        await delete_canned_reply(conn, who.church_id, canned_reply_id)
    return ok(Deleted(id=canned_reply_id, deleted=True))


def canned_reply_operations() -> list[Operation]:
    return [
        Operation(
            "POST",
            "/v1/canned-replies",
            post_canned_reply,
            "canned_reply.create",
            "Save a canned reply",
            "inbox",
            scope="write",
            body=CannedReplyCreate,
            response=CannedReply,
            status=201,
            errors=("conflict",),
            description=(
                "A name unique in the church (`409 conflict` otherwise) and a body with "
                "the merge fields of `/v1/templates`, filled for the member when it is sent."
            ),
            examples={
                "directions": {
                    "name": "Directions",
                    "body": "Hi {{first_name}}! We meet at 10:00 at 12 Main St.",
                }
            },
        ),
        Operation(
            "GET",
            "/v1/canned-replies",
            church_listing(list_canned_replies),
            "canned_reply.list",
            "List canned replies, oldest first",
            "inbox",
            response=list[CannedReply],
            listing=True,
        ),
        Operation(
            "PATCH",
            "/v1/canned-replies/{id}",
            patch_canned_reply,
            "canned_reply.update",
            "Change a canned reply's name or body",
            "inbox",
            scope="write",
            body=CannedReplyUpdate,
            response=CannedReply,
            errors=("conflict",),
            examples={"body": {"body": "Hi {{first_name}}, see you Sunday at 10!"}},
        ),
        Operation(
            "DELETE",
            "/v1/canned-replies/{id}",
            remove_canned_reply,
            "canned_reply.delete",
            "Delete a canned reply (replies sent from it keep their text)",
            "inbox",
            scope="write",
            response=Deleted,
        ),
    ]
