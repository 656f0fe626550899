"""Recurring messages: create, list, show, update (pause with ``enabled: false``),
delete, and the log of their occurrences."""

from __future__ import annotations

import uuid
from datetime import date

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from api.auth import principal
from api.errors import invalid_body
from api.listing import church_listing, paged, services_of
from api.operation import Operation, audit_target
from api.schemas import Body, Name, TargetRequest
from api.schemas import Request as RequestBody
from api.validation import decode_body, path_id
from storage.domain import merge_fields
from storage.domain.envelope import FieldError
from storage.domain.recurrence import Rule
from storage.pg.recurring_schedules import (
    Occurrence,
    RecurringFields,
    RecurringMessage,
    create_recurring,
    delete_recurring,
    get_recurring,
    list_occurrences,
    list_recurring,
    update_recurring,
)
from storage.responses import ok

_UNSET = msgspec.UNSET


class RecurringRequest(RequestBody, frozen=True):
    """Give exactly one of ``body`` and ``template_id`` (read at each run)."""

    name: Name
    target: TargetRequest
    rule: Rule
    body: Body | None = None
    template_id: uuid.UUID | None = None
    starts_on: date | None = None
    """First local date a run may fall on (inclusive)."""
    ends_on: date | None = None
    """Last local date a run may fall on (inclusive)."""
    enabled: bool = True


class RecurringPatch(RequestBody, frozen=True):
    """Any subset; ``body`` replaces a template and ``template_id`` a body."""

    name: Name | msgspec.UnsetType = _UNSET
    target: TargetRequest | msgspec.UnsetType = _UNSET
    rule: Rule | msgspec.UnsetType = _UNSET
    body: Body | msgspec.UnsetType = _UNSET
    template_id: uuid.UUID | msgspec.UnsetType = _UNSET
    starts_on: date | msgspec.UnsetType | None = _UNSET
    ends_on: date | msgspec.UnsetType | None = _UNSET
    enabled: bool | msgspec.UnsetType = _UNSET


def _problems(fields: RecurringFields, target: TargetRequest | None) -> list[FieldError]:
    found: list[FieldError] = []
    if target is not None and (problem := target.problem()):
        found.append(FieldError("target", problem))
    if fields.body is None and fields.template_id is None:
        found.append(FieldError("body", "is required"))
    elif fields.body is not None and fields.template_id is not None:
        found.append(FieldError("body", "give exactly one of body or template_id"))
    elif fields.body is not None:
        found += [FieldError("body", p) for p in merge_fields.problems(fields.body)]
    found += fields.rule.problems()
    if fields.starts_on and fields.ends_on and fields.starts_on > fields.ends_on:
        found.append(FieldError("ends_on", "must not be before starts_on"))
    return found


async def post_recurring(request: Request) -> Response:
    who = await principal(request, "write")
    body = await decode_body(request, RecurringRequest)
    fields = RecurringFields(
        name=body.name,
        body=body.body,
        template_id=body.template_id,
        target=body.target.to_target(),
        rule=body.rule,
        starts_on=body.starts_on,
        ends_on=body.ends_on,
        enabled=body.enabled,
    )
    problems = _problems(fields, body.target)
    if problems:
        raise invalid_body(*problems)
    async with services_of(request).pool.connection() as conn:
        created = await create_recurring(conn, who.church_id, fields, created_by=who.user_id)
    audit_target(request, created.id)
    return ok(created, status=201)


async def show_recurring(request: Request) -> Response:
    who = await principal(request, "read")
    async with services_of(request).pool.connection() as conn:
        found = await get_recurring(conn, who.church_id, path_id(request))
    return ok(found)


async def patch_recurring(request: Request) -> Response:
    who = await principal(request, "write")
    recurring_id = path_id(request)
    patch = await decode_body(request, RecurringPatch)
    if patch.body is not _UNSET and patch.template_id is not _UNSET:
        raise invalid_body(FieldError("body", "give exactly one of body or template_id"))
    if not isinstance(patch.target, msgspec.UnsetType) and (problem := patch.target.problem()):
        raise invalid_body(FieldError("target", problem))

    def change(current: RecurringFields) -> RecurringFields:
        updates: dict[str, object] = {}
        for name in ("name", "rule", "starts_on", "ends_on", "enabled"):
            value = getattr(patch, name)
            if value is not _UNSET:
                updates[name] = value
        if not isinstance(patch.target, msgspec.UnsetType):
            updates["target"] = patch.target.to_target()
        if patch.body is not _UNSET:
            updates |= {"body": patch.body, "template_id": None}
        if patch.template_id is not _UNSET:
            updates |= {"template_id": patch.template_id, "body": None}
        after = msgspec.structs.replace(current, **updates)
        problems = _problems(after, None)
        if problems:
            raise invalid_body(*problems)
        return after

    async with services_of(request).pool.connection() as conn:
        updated = await update_recurring(conn, who.church_id, recurring_id, change)
    return ok(updated)


async def delete_recurring_message(request: Request) -> Response:
    who = await principal(request, "write")
    async with services_of(request).pool.connection() as conn:
        deleted = await delete_recurring(conn, who.church_id, path_id(request))
    return ok(deleted)


async def index_occurrences(request: Request) -> Response:
    recurring_id = path_id(request)
    return await paged(
        request,
        list_occurrences,
        recurring_id,
    )


def recurring_operations() -> list[Operation]:
    return [
        Operation(
            "POST",
            "/v1/recurring-messages",
            post_recurring,
            "recurring_message.create",
            "Create a recurring message (daily, weekly or monthly, in the church's time zone)",
            "recurring_messages",
            scope="write",
            body=RecurringRequest,
            response=RecurringMessage,
            status=201,
            errors=("not_found",),
            description=(
                "Each run becomes an ordinary broadcast (its `recurring_id` set) whose "
                "audience is the target's members at that moment. Times are local to the "
                "church: a time skipped by a DST change runs an hour later that day, a "
                "repeated one runs once. `next_run_at` is UTC; `next_run_local` the same "
                "instant in the church's zone."
            ),
            examples={
                "weekly": {
                    "name": "Sunday reminder",
                    "body": "Hi {{first_name}}, service at 10am today!",
                    "target": {"all": True},
                    "rule": {"frequency": "weekly", "time": "08:00", "weekdays": [6]},
                },
                "monthly": {
                    "name": "Month-end giving",
                    "template_id": "<template id>",
                    "target": {"group_ids": ["<group id>"]},
                    "rule": {"frequency": "monthly", "time": "18:30", "day_of_month": -1},
                },
            },
        ),
        Operation(
            "GET",
            "/v1/recurring-messages",
            church_listing(list_recurring),
            "recurring_message.list",
            "List recurring messages, newest first",
            "recurring_messages",
            response=list[RecurringMessage],
            listing=True,
        ),
        Operation(
            "GET",
            "/v1/recurring-messages/{id}",
            show_recurring,
            "recurring_message.show",
            "One recurring message with its next run",
            "recurring_messages",
            response=RecurringMessage,
        ),
        Operation(
            "PATCH",
            "/v1/recurring-messages/{id}",
            patch_recurring,
            "recurring_message.update",
            "Change a recurring message; enabled=false pauses it",
            "recurring_messages",
            scope="write",
            body=RecurringPatch,
            response=RecurringMessage,
            description=(
                "A new rule, start or end date, or re-enabling schedules from now on: "
                "runs missed meanwhile are not made up."
            ),
            examples={
                "pause": {"enabled": False},
                "retime": {"rule": {"frequency": "daily", "time": "07:00"}},
            },
        ),
        Operation(
            "DELETE",
            "/v1/recurring-messages/{id}",
            delete_recurring_message,
            "recurring_message.delete",
            "Delete a recurring message (the messages it sent stay)",
            "recurring_messages",
            scope="write",
            response=RecurringMessage,
        ),
        Operation(
            "GET",
            "/v1/recurring-messages/{id}/occurrences",
            index_occurrences,
            "recurring_message.occurrences",
            "Its runs, most recent first: sent (with the message id), missed or failed",
            "recurring_messages",
            response=list[Occurrence],
            listing=True,
        ),
    ]
