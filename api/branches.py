"""Branches (campuses, sites): create, list, show, rename, delete."""

from __future__ import annotations

import uuid

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from api.auth import principal
from api.listing import church_listing, services_of
from api.operation import Operation, audit_target
from api.schemas import Name
from api.schemas import Request as RequestBody
from api.validation import decode_body, path_id
from storage.pg.branches import (
    Branch,
    create_branch,
    delete_branch,
    get_branch,
    list_branches,
    rename_branch,
)
from storage.responses import ok


class BranchRequest(RequestBody, frozen=True):
    name: Name


class Deleted(msgspec.Struct, frozen=True):
    """The answer to a delete (branches, groups, members, templates)."""

    id: uuid.UUID
    deleted: bool


async def post_branch(request: Request) -> Response:
    who = await principal(request, "write")
    body = await decode_body(request, BranchRequest)
    async with services_of(request).pool.connection() as conn:
        branch = await create_branch(conn, who.church_id, body.name)
    audit_target(request, branch.id)
    return ok(branch, status=201)


async def show_branch(request: Request) -> Response:
    who = await principal(request, "read")
    async with services_of(request).pool.connection() as conn:
        branch = await get_branch(conn, who.church_id, path_id(request))
    return ok(branch)


async def patch_branch(request: Request) -> Response:
    who = await principal(request, "write")
    branch_id = path_id(request)
    body = await decode_body(request, BranchRequest)
    async with services_of(request).pool.connection() as conn:
        branch = await rename_branch(conn, who.church_id, branch_id, body.name)
    return ok(branch)


async def remove_branch(request: Request) -> Response:
    """Refused (409 conflict) while a group or member belongs to the branch."""
    who = await principal(request, "write")
    branch_id = path_id(request)
    async with services_of(request).pool.connection() as conn:
        await delete_branch(conn, who.church_id, branch_id)
    return ok(Deleted(id=branch_id, deleted=True))


def branch_operations() -> list[Operation]:
    return [
        Operation(
            "POST",
            "/v1/branches",
            post_branch,
            "branch.create",
            "Create a branch (names are unique per church, case-insensitively)",
            "branches",
            scope="write",
            body=BranchRequest,
            response=Branch,
            status=201,
            errors=("conflict",),
            examples={"campus": {"name": "North Campus"}},
        ),
        Operation(
            "GET",
            "/v1/branches",
            church_listing(list_branches),
            "branch.list",
            "List branches",
            "branches",
            response=list[Branch],
            listing=True,
        ),
        Operation(
            "GET",
            "/v1/branches/{id}",
            show_branch,
            "branch.show",
            "One branch",
            "branches",
            response=Branch,
        ),
        Operation(
            "PATCH",
            "/v1/branches/{id}",
            patch_branch,
            "branch.update",
            "Rename a branch",
            "branches",
            scope="write",
            body=BranchRequest,
            response=Branch,
            errors=("conflict",),
            examples={"rename": {"name": "Northside Campus"}},
        ),
        Operation(
            "DELETE",
            "/v1/branches/{id}",
            remove_branch,
            "branch.delete",
            "Delete a branch no group or member belongs to",
            "branches",
            scope="write",
            response=Deleted,
            errors=("conflict",),
            description=(
                "A branch still holding groups or members is refused with `conflict`: "
                "move them (or set their `branch_id` to null) first, so no broadcast "
                "audience changes silently."
            ),
        ),
    ]
