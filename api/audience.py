"""Groups and members: who a church texts, their groups, consent and personal data.

Groups (and their member counts) are served cache-aside under the ``groups``
topic; every write to a group, a membership or a member invalidates the topic
after its transaction commits. ``audience_operations()`` also carries the
branches, templates and CSV import operations.
"""

from __future__ import annotations

import re
import uuid
from typing import Annotated

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from api.auth import principal
from api.branches import Deleted, branch_operations
from api.errors import invalid_body, invalid_query
from api.listing import read, services_of
from api.member_import import import_operations
from api.operation import Operation, QueryParam, audit_target
from api.schemas import Email, GroupMembersRequest, Name, OptionalName
from api.schemas import Request as RequestBody
from api.templates import template_operations
from api.validation import decode_body, page_params, path_id
from storage.domain.envelope import FieldError
from storage.domain.errors import InvalidPhone, NotFound
from storage.domain.phones import normalize
from storage.pg.churches import get_church
from storage.pg.credentials import Principal
from storage.pg.database import Conn
from storage.pg.groups import (
    CACHE_TOPIC,
    Group,
    add_members,
    create_group,
    delete_group,
    existing_ids,
    get_group,
    list_groups,
    remove_member,
    update_group,
)
from storage.pg.member_messages import MemberMessage, list_member_messages
from storage.pg.members import (
    Member,
    MemberExport,
    MemberFilter,
    create_member,
    erase_member,
    export_member,
    get_member,
    list_members,
    set_opt_in,
    update_member,
)
from storage.pg.pagination import Page
from storage.responses import ok

GROUP_CACHE_TTL_S = 60.0
"""Invalidation keeps cached groups right; the TTL only bounds an entry's life."""

Phone = Annotated[str, msgspec.Meta(min_length=3, max_length=40)]


class GroupCreate(RequestBody, frozen=True):
    name: Name
    branch_id: uuid.UUID | None = None


class GroupUpdate(RequestBody, frozen=True):
    name: Name | None = None
    branch_id: uuid.UUID | msgspec.UnsetType | None = msgspec.UNSET
    """null takes the group out of its branch."""


class MemberCreate(RequestBody, frozen=True):
    first_name: Name
    phone: Phone
    last_name: OptionalName = ""
    email: Email | None = None
    group_ids: Annotated[list[uuid.UUID], msgspec.Meta(max_length=1000)] = []
    branch_id: uuid.UUID | None = None


class MemberUpdate(RequestBody, frozen=True):
    first_name: Name | None = None
    last_name: OptionalName | None = None
    email: Email | msgspec.UnsetType | None = msgspec.UNSET
    phone: Phone | None = None
    branch_id: uuid.UUID | msgspec.UnsetType | None = msgspec.UNSET
    """null takes the member out of their branch."""


def _source(who: Principal) -> str:
    """Who gave or withdrew consent through the API: staff in the app, or an integration."""
    return "staff" if who.kind == "session" else "api"


async def _invalidate_groups(request: Request, church_id: uuid.UUID) -> None:
    await services_of(request).cache.invalidate(church_id, CACHE_TOPIC)


async def _country(conn: Conn, church_id: uuid.UUID) -> str:
    church = await get_church(conn, church_id)
    return church.country if church else "US"


def _valid_phone(raw: str, country: str) -> str:
    try:
        return normalize(raw, country)
    except InvalidPhone as exc:
        raise invalid_body(FieldError("phone", "must be a valid phone number")) from exc


async def _check_branch(conn: Conn, church_id: uuid.UUID, branch_id: object) -> None:
    if isinstance(branch_id, uuid.UUID) and not await existing_ids(
        conn, church_id, "branch", [branch_id]
    ):
        raise NotFound("branch")


# Groups ---------------------------------------------------------------------------


async def post_group(request: Request) -> Response:
    who = await principal(request, "write")
    body = await decode_body(request, GroupCreate)
    async with services_of(request).pool.connection() as conn:
        await _check_branch(conn, who.church_id, body.branch_id)
        group = await create_group(conn, who.church_id, body.name, branch_id=body.branch_id)
    await _invalidate_groups(request, who.church_id)
    audit_target(request, group.id)
    return ok(group, status=201)


async def index_groups(request: Request) -> Response:
    """Pages of groups with their member counts, from the cache when fresh."""
    who = await principal(request, "read")
    limit, cursor = page_params(request)
    services = services_of(request)

    async def compute() -> Page[Group]:
        return await read(request, list_groups, who.church_id, limit=limit, cursor=cursor)

    page = await services.cache.get_or_compute(
        who.church_id,
        CACHE_TOPIC,
        f"page:{limit}:{cursor or ''}",
        Page[Group],
        compute,
        ttl_s=GROUP_CACHE_TTL_S,
    )
    return ok(page.items, next_cursor=page.next_cursor)


async def show_group(request: Request) -> Response:
    who = await principal(request, "read")
    group_id = path_id(request)
    services = services_of(request)

    async def compute() -> Group:
        async with services.pool.connection() as conn:
            return await get_group(conn, who.church_id, group_id)

    group = await services.cache.get_or_compute(
        who.church_id, CACHE_TOPIC, f"group:{group_id}", Group, compute, ttl_s=GROUP_CACHE_TTL_S
    )
    return ok(group)


async def patch_group(request: Request) -> Response:
    who = await principal(request, "write")
    group_id = path_id(request)
    body = await decode_body(request, GroupUpdate)
    async with services_of(request).pool.connection() as conn:
        await get_group(conn, who.church_id, group_id)
        await _check_branch(conn, who.church_id, body.branch_id)
        group = await update_group(
            conn, who.church_id, group_id, name=body.name, branch_id=body.branch_id
        )
    await _invalidate_groups(request, who.church_id)
    return ok(group)


async def remove_group(request: Request) -> Response:
    """Delete a group and its memberships; members and past broadcasts stay as they are."""
    who = await principal(request, "write")
    group_id = path_id(request)
    async with services_of(request).pool.connection() as conn:
        await delete_group(conn, who.church_id, group_id)
    await _invalidate_groups(request, who.church_id)
    return ok(Deleted(id=group_id, deleted=True))


async def post_group_members(request: Request) -> Response:
    """Add members to a group (already there: unchanged)."""
    who = await principal(request, "write")
    group_id = path_id(request)
    body = await decode_body(request, GroupMembersRequest)
    wanted = list(dict.fromkeys(body.member_ids))
    async with services_of(request).pool.connection() as conn:
        async with conn.transaction():
            await get_group(conn, who.church_id, group_id)
            if await existing_ids(conn, who.church_id, "member", wanted) != set(wanted):
                raise NotFound("member")
            for member_id in wanted:
                await add_members(conn, who.church_id, [group_id], member_id)
        group = await get_group(conn, who.church_id, group_id)
    await _invalidate_groups(request, who.church_id)
    return ok(group)


async def delete_group_member(request: Request) -> Response:
    who = await principal(request, "write")
    group_id = path_id(request)
    member_id = path_id(request, "member_id")
    async with services_of(request).pool.connection() as conn:
        if not await remove_member(conn, who.church_id, group_id, member_id):
            raise NotFound("group membership")
        group = await get_group(conn, who.church_id, group_id)
    await _invalidate_groups(request, who.church_id)
    return ok(group)


# Members --------------------------------------------------------------------------


async def post_member(request: Request) -> Response:
    who = await principal(request, "write")
    body = await decode_body(request, MemberCreate)
    services = services_of(request)
    async with services.pool.connection() as conn:
        phone = _valid_phone(body.phone, await _country(conn, who.church_id))
        if body.group_ids:
            found = await existing_ids(conn, who.church_id, "member_group", body.group_ids)
            if found != set(body.group_ids):
                raise NotFound("group")
        await _check_branch(conn, who.church_id, body.branch_id)
        member = await create_member(
            conn,
            services.vault,
            who.church_id,
            first_name=body.first_name,
            last_name=body.last_name,
            phone_e164=phone,
            email=body.email,
            group_ids=list(dict.fromkeys(body.group_ids)),
            branch_id=body.branch_id,
            opt_source=_source(who),
        )
    await _invalidate_groups(request, who.church_id)
    audit_target(request, member.id)
    return ok(member, status=201)


_PHONE_LIKE = re.compile(r"^\+?[\d\s().-]{5,40}$")


def _flag(raw: str | None, name: str, problems: list[FieldError]) -> bool | None:
    if raw is None or raw == "":
        return None
    lowered = raw.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    problems.append(FieldError(name, "must be true or false"))
    return None


def _uuid(raw: str | None, name: str, problems: list[FieldError]) -> uuid.UUID | None:
    if not raw:
        return None
    try:
        return uuid.UUID(raw)
    except ValueError:
        problems.append(FieldError(name, "must be a UUID"))
        return None


async def index_members(request: Request) -> Response:
    """``?q=`` (a name, or a phone number: exact), ``?group_id=``, ``?branch_id=``,
    ``?opted_in=true|false`` narrow the list; filters combine."""
    query = request.query_params
    problems: list[FieldError] = []
    q = (query.get("q") or "").strip()
    if len(q) > 200 or "\x00" in q:
        problems.append(FieldError("q", "must be at most 200 characters, without NUL"))
    group_id = _uuid(query.get("group_id"), "group_id", problems)
    branch_id = _uuid(query.get("branch_id"), "branch_id", problems)
    opted_in = _flag(query.get("opted_in"), "opted_in", problems)
    if problems:
        raise invalid_query(*problems)
    who = await principal(request, "read")
    services = services_of(request)
    async with services.pool.connection() as conn:
        phone_hash = None
        if q and _PHONE_LIKE.match(q) and sum(c.isdigit() for c in q) >= 5:
            try:
                phone_hash = services.vault.lookup_hash(
                    normalize(q, await _country(conn, who.church_id))
                )
            except InvalidPhone:
                phone_hash = None
        # Another church's group or branch is not found, as everywhere else.
        if group_id and not await existing_ids(conn, who.church_id, "member_group", [group_id]):
            raise NotFound("group")
        if branch_id and not await existing_ids(conn, who.church_id, "branch", [branch_id]):
            raise NotFound("branch")
    where = MemberFilter(
        name=q if q and phone_hash is None else None,
        phone_hash=phone_hash,
        group_id=group_id,
        branch_id=branch_id,
        opted_in=opted_in,
    )
    limit, cursor = page_params(request)
    page = await read(
        request,
        list_members,
        services.vault,
        who.church_id,
        limit=limit,
        cursor=cursor,
        where=where,
    )
    return ok(page.items, next_cursor=page.next_cursor)


async def show_member(request: Request) -> Response:
    who = await principal(request, "read")
    member_id = path_id(request)
    services = services_of(request)
    async with services.pool.connection() as conn:
        member = await get_member(conn, services.vault, who.church_id, member_id)
    return ok(member)


async def patch_member(request: Request) -> Response:
    who = await principal(request, "write")
    member_id = path_id(request)
    body = await decode_body(request, MemberUpdate)
    services = services_of(request)
    async with services.pool.connection() as conn:
        await get_member(conn, services.vault, who.church_id, member_id)
        phone = None
        if body.phone is not None:
            phone = _valid_phone(body.phone, await _country(conn, who.church_id))
        await _check_branch(conn, who.church_id, body.branch_id)
        member = await update_member(
            conn,
            services.vault,
            who.church_id,
            member_id,
            first_name=body.first_name,
            last_name=body.last_name,
            email=body.email,
            phone_e164=phone,
            branch_id=body.branch_id,
        )
    await _invalidate_groups(request, who.church_id)
    return ok(member)


async def delete_member(request: Request) -> Response:
    """Erase the member's personal data; past broadcasts keep their counts."""
    who = await principal(request, "write")
    member_id = path_id(request)
    async with services_of(request).pool.connection() as conn:
        await erase_member(conn, who.church_id, member_id)
    await _invalidate_groups(request, who.church_id)
    return ok(Deleted(id=member_id, deleted=True))


async def _set_opt(request: Request, opted_in: bool) -> Response:
    who = await principal(request, "write")
    member_id = path_id(request)
    services = services_of(request)
    async with services.pool.connection() as conn:
        member = await set_opt_in(
            conn, services.vault, who.church_id, member_id, opted_in=opted_in, source=_source(who)
        )
    await _invalidate_groups(request, who.church_id)
    return ok(member)


async def opt_out_member(request: Request) -> Response:
    return await _set_opt(request, False)


async def opt_in_member(request: Request) -> Response:
    return await _set_opt(request, True)


async def index_member_messages(request: Request) -> Response:
    """The broadcasts the member received, newest first (the inbox's contact panel)."""
    who = await principal(request, "read")
    member_id = path_id(request)
    limit, cursor = page_params(request)
    page = await read(
        request, list_member_messages, who.church_id, member_id, limit=limit, cursor=cursor
    )
    return ok(page.items, next_cursor=page.next_cursor)


async def export_member_data(request: Request) -> Response:
    who = await principal(request, "read")
    member_id = path_id(request)
    services = services_of(request)
    export = await read(request, export_member, services.vault, who.church_id, member_id)
    return ok(export)


def _group_operations() -> list[Operation]:
    return [
        Operation(
            "POST",
            "/v1/groups",
            post_group,
            "group.create",
            "Create a group",
            "groups",
            scope="write",
            body=GroupCreate,
            response=Group,
            status=201,
            errors=("not_found",),
            examples={"choir": {"name": "Choir"}},
        ),
        Operation(
            "GET",
            "/v1/groups",
            index_groups,
            "group.list",
            "List groups with their member counts",
            "groups",
            response=list[Group],
            listing=True,
        ),
        Operation(
            "GET",
            "/v1/groups/{id}",
            show_group,
            "group.show",
            "One group with its member count",
            "groups",
            response=Group,
        ),
        Operation(
            "PATCH",
            "/v1/groups/{id}",
            patch_group,
            "group.update",
            "Rename a group or move it to another branch",
            "groups",
            scope="write",
            body=GroupUpdate,
            response=Group,
            examples={"rename": {"name": "Youth Choir"}, "no branch": {"branch_id": None}},
        ),
        Operation(
            "DELETE",
            "/v1/groups/{id}",
            remove_group,
            "group.delete",
            "Delete a group and its memberships (members and past broadcasts stay)",
            "groups",
            scope="write",
            response=Deleted,
        ),
        Operation(
            "POST",
            "/v1/groups/{id}/members",
            post_group_members,
            "group.add_members",
            "Add members to a group",
            "groups",
            scope="write",
            body=GroupMembersRequest,
            response=Group,
            examples={"members": {"member_ids": ["0190f0d2-7a39-7c3e-8f00-2b1c3d4e5f60"]}},
        ),
        Operation(
            "DELETE",
            "/v1/groups/{id}/members/{member_id}",
            delete_group_member,
            "group.remove_member",
            "Take a member out of a group",
            "groups",
            scope="write",
            response=Group,
        ),
    ]


def _member_operations() -> list[Operation]:
    return [
        Operation(
            "POST",
            "/v1/members",
            post_member,
            "member.create",
            "Add a member (opted in; consent source staff or api)",
            "members",
            scope="write",
            body=MemberCreate,
            response=Member,
            status=201,
            errors=("conflict", "not_found"),
            examples={
                "member": {
                    "first_name": "Ada",
                    "last_name": "Lovelace",
                    "phone": "+12025550143",
                    "group_ids": [],
                }
            },
        ),
        Operation(
            "GET",
            "/v1/members",
            index_members,
            "member.list",
            "List or search members",
            "members",
            response=list[Member],
            listing=True,
            errors=("not_found",),
            query=(
                QueryParam(
                    "q",
                    str,
                    "a name (case-insensitive, part of the first, last or full name) or a "
                    "phone number (exact match)",
                ),
                QueryParam("group_id", uuid.UUID, "only members of this group"),
                QueryParam("branch_id", uuid.UUID, "only members of this branch"),
                QueryParam("opted_in", bool, "only opted-in (true) or opted-out (false) members"),
            ),
        ),
        Operation(
            "GET",
            "/v1/members/{id}",
            show_member,
            "member.show",
            "One member",
            "members",
            response=Member,
        ),
        Operation(
            "PATCH",
            "/v1/members/{id}",
            patch_member,
            "member.update",
            "Change a member's names, phone, email or branch",
            "members",
            scope="write",
            body=MemberUpdate,
            response=Member,
            errors=("conflict",),
            examples={"email": {"email": "ada@example.org"}, "no branch": {"branch_id": None}},
        ),
        Operation(
            "DELETE",
            "/v1/members/{id}",
            delete_member,
            "member.delete",
            "Erase a member's personal data (past broadcasts keep their counts)",
            "members",
            scope="write",
            response=Deleted,
        ),
        Operation(
            "POST",
            "/v1/members/{id}/opt-out",
            opt_out_member,
            "member.opt_out",
            "Stop texting a member (consent withdrawn, recorded with its source)",
            "members",
            scope="write",
            response=Member,
        ),
        Operation(
            "POST",
            "/v1/members/{id}/opt-in",
            opt_in_member,
            "member.opt_in",
            "Text a member again (consent given, recorded with its source)",
            "members",
            scope="write",
            response=Member,
        ),
        Operation(
            "GET",
            "/v1/members/{id}/messages",
            index_member_messages,
            "member.messages",
            "The broadcasts a member received, newest first, with their status",
            "members",
            response=list[MemberMessage],
            listing=True,
            description=(
                "Each broadcast's `body` is its text as written (merge fields un-rendered) "
                "and `status` is this member's recipient status. Staff replies and "
                "automatic answers are in the member's conversation, not here; archived "
                "months are not listed."
            ),
        ),
        Operation(
            "GET",
            "/v1/members/{id}/export",
            export_member_data,
            "member.export",
            "All personal data held about a member (data-subject access request)",
            "members",
            role="admin",
            response=MemberExport,
            audit=True,
            description=(
                "Profile, phone, groups, consent history, conversation messages and "
                "every broadcast sent to the member with its body and status."
            ),
        ),
    ]


def audience_operations() -> list[Operation]:
    return [
        *branch_operations(),
        *_group_operations(),
        *_member_operations(),
        *import_operations(),
        *template_operations(),
    ]
