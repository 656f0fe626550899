"""Groups and members."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from api.auth import principal
from api.errors import invalid_body
from api.listing import church_listing, paged, services_of
from api.operation import Operation
from api.schemas import GroupMembersRequest, GroupRequest, MemberPatch, MemberRequest
from api.validation import decode_body, path_id
from storage.churches import get_church
from storage.envelope import FieldError, ok
from storage.errors import InvalidPhone, NotFound
from storage.groups import (
    add_members,
    create_group,
    existing_ids,
    get_group,
    list_groups,
    remove_member,
)
from storage.members import (
    create_member,
    erase_member,
    get_member,
    list_members,
    update_member,
)
from storage.phones import normalize


async def post_group(request: Request) -> Response:
    who = await principal(request, "write")
    body = await decode_body(request, GroupRequest)
    async with services_of(request).pool.connection() as conn:
        group = await create_group(conn, who.church_id, body.name)
    return ok(group, status=201)


async def show_group(request: Request) -> Response:
    who = await principal(request, "read")
    group_id = path_id(request)
    async with services_of(request).pool.connection() as conn:
        group = await get_group(conn, who.church_id, group_id)
    return ok(group)


async def post_member(request: Request) -> Response:
    who = await principal(request, "write")
    body = await decode_body(request, MemberRequest)
    services = services_of(request)
    async with services.pool.connection() as conn:
        church = await get_church(conn, who.church_id)
        country = church.country if church else "US"
        phone = _valid_phone(body.phone, country)
        if body.group_ids:
            found = await existing_ids(conn, who.church_id, "member_group", body.group_ids)
            if found != set(body.group_ids):
                raise NotFound("group")
        member = await create_member(
            conn,
            services.vault,
            who.church_id,
            first_name=body.first_name,
            last_name=body.last_name,
            phone_e164=phone,
            email=body.email,
            group_ids=list(dict.fromkeys(body.group_ids)),
        )
    return ok(member, status=201)


async def index_members(request: Request) -> Response:
    vault = services_of(request).vault
    return await paged(
        request,
        lambda conn, church, limit, cursor: list_members(
            conn, vault, church, limit=limit, cursor=cursor
        ),
    )


async def show_member(request: Request) -> Response:
    who = await principal(request, "read")
    member_id = path_id(request)
    services = services_of(request)
    async with services.pool.connection() as conn:
        member = await get_member(conn, services.vault, who.church_id, member_id)
    return ok(member)


async def post_group_members(request: Request) -> Response:
    """Add members to a group (already there: unchanged)."""
    who = await principal(request, "write")
    group_id = path_id(request)
    body = await decode_body(request, GroupMembersRequest)
    wanted = list(dict.fromkeys(body.member_ids))
    async with services_of(request).pool.connection() as conn, conn.transaction():
        await get_group(conn, who.church_id, group_id)
        if await existing_ids(conn, who.church_id, "member", wanted) != set(wanted):
            raise NotFound("member")
        for member_id in wanted:
            await add_members(conn, who.church_id, [group_id], member_id)
        group = await get_group(conn, who.church_id, group_id)
    return ok(group)


async def delete_group_member(request: Request) -> Response:
    who = await principal(request, "write")
    group_id = path_id(request)
    member_id = path_id(request, "member_id")
    async with services_of(request).pool.connection() as conn:
        if not await remove_member(conn, who.church_id, group_id, member_id):
            raise NotFound("group membership")
        group = await get_group(conn, who.church_id, group_id)
    return ok(group)


def _valid_phone(raw: str, country: str) -> str:
    try:
        return normalize(raw, country)
    except InvalidPhone as exc:
        raise invalid_body(FieldError("phone", "must be a valid phone number")) from exc


async def patch_member(request: Request) -> Response:
    who = await principal(request, "write")
    member_id = path_id(request)
    body = await decode_body(request, MemberPatch)
    services = services_of(request)
    async with services.pool.connection() as conn:
        phone = None
        if body.phone is not None:
            church = await get_church(conn, who.church_id)
            phone = _valid_phone(body.phone, church.country if church else "US")
        member = await update_member(
            conn,
            services.vault,
            who.church_id,
            member_id,
            first_name=body.first_name,
            last_name=body.last_name,
            email=body.email,
            phone_e164=phone,
        )
    return ok(member)


async def delete_member(request: Request) -> Response:
    """Erase the member's personal data; past broadcasts keep their counts."""
    who = await principal(request, "write")
    member_id = path_id(request)
    async with services_of(request).pool.connection() as conn:
        await erase_member(conn, who.church_id, member_id)
    return ok({"id": member_id, "deleted": True})


def audience_routes() -> list[BaseRoute]:
    return [
        Route("/v1/groups", post_group, methods=["POST"]),
        Route("/v1/groups", church_listing(list_groups), methods=["GET"]),
        Route("/v1/groups/{id}", show_group, methods=["GET"]),
        Route("/v1/groups/{id}/members", post_group_members, methods=["POST"]),
        Route("/v1/groups/{id}/members/{member_id}", delete_group_member, methods=["DELETE"]),
        Route("/v1/members", post_member, methods=["POST"]),
        Route("/v1/members", index_members, methods=["GET"]),
        Route("/v1/members/{id}", show_member, methods=["GET"]),
        Route("/v1/members/{id}", patch_member, methods=["PATCH"]),
        Route("/v1/members/{id}", delete_member, methods=["DELETE"]),
    ]


def audience_operations() -> list[Operation]:
    return []
