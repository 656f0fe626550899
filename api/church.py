"""The caller's church and its settings: name, time zone, country, keyword answers,
quiet hours.

Quiet hours are a daily window of local time, ``[start, end)`` as ``HH:MM``
(08:00-21:00 by default; ``start == end``: no quiet hours): scheduled and
recurring sends wait for it, read in each member's time zone when known, else
the church's. Changing the window or the time zone works out again when the
recipients already waiting may go, in the same transaction.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

import msgspec
import phonenumbers
from starlette.requests import Request
from starlette.responses import Response

from api.auth import principal
from api.errors import invalid_body
from api.listing import services_of
from api.operation import Operation, audit_details, audit_target
from api.schemas import NO_NUL, Name
from api.schemas import Request as RequestBody
from api.validation import decode_body
from storage.domain.envelope import FieldError
from storage.domain.quiet_hours import HHMM_PATTERN, format_hhmm, is_zone, parse_hhmm
from storage.pg.churches import ChurchSettings, SettingsChange, get_settings, update_settings
from storage.pg.held_recipients import replan_held
from storage.pg.keywords import MAX_REPLY_LENGTH, help_reply, opt_in_reply
from storage.responses import ok

Clock = Annotated[str, msgspec.Meta(pattern=HHMM_PATTERN, examples=["08:00"])]
Reply = Annotated[str, msgspec.Meta(max_length=MAX_REPLY_LENGTH, pattern=NO_NUL)]
ZoneName = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=NO_NUL)]
Country = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z]{2}$")]


class ChurchView(msgspec.Struct, frozen=True):
    id: uuid.UUID
    name: str
    plan: str
    phone_number: str
    country: str
    timezone: str
    status: str
    help_text: str
    """The configured answer to HELP / INFO; empty: the built-in one."""
    help_reply: str
    """What a member texting HELP receives."""
    opt_in_text: str
    """The configured answer to START / UNSTOP / YES; empty: the built-in one."""
    opt_in_reply: str
    """What a member texting START receives."""
    opt_out_reply: Literal["provider"]
    """STOP is answered by the provider (Telnyx), which then blocks sends to the number."""
    quiet_hours_start: str
    quiet_hours_end: str
    created_at: datetime


class ChurchPatch(RequestBody, frozen=True):
    name: Name | None = None
    timezone: ZoneName | None = None
    """An IANA time zone (``America/Chicago``)."""
    country: Country | None = None
    """ISO 3166 alpha-2; national phone formats are read in it."""
    help_text: Reply | None = None
    """Empty: back to the built-in answer."""
    opt_in_text: Reply | None = None
    """Empty: back to the built-in answer."""
    quiet_hours_start: Clock | None = None
    quiet_hours_end: Clock | None = None


def _view(church: ChurchSettings) -> ChurchView:
    return ChurchView(
        id=church.id,
        name=church.name,
        plan=church.plan,
        phone_number=church.phone_number,
        country=church.country,
        timezone=church.timezone,
        status=church.status,
        help_text=church.help_text,
        help_reply=help_reply(church),
        opt_in_text=church.opt_in_text,
        opt_in_reply=opt_in_reply(church),
        opt_out_reply="provider",
        quiet_hours_start=format_hhmm(church.quiet_hours_start),
        quiet_hours_end=format_hhmm(church.quiet_hours_end),
        created_at=church.created_at,
    )


def _change(body: ChurchPatch) -> SettingsChange:
    problems: list[FieldError] = []
    if body.timezone is not None and not is_zone(body.timezone):
        problems.append(FieldError("timezone", "is not an IANA time zone (e.g. America/Chicago)"))
    country = body.country.upper() if body.country is not None else None
    if country is not None and country not in phonenumbers.SUPPORTED_REGIONS:
        problems.append(FieldError("country", "is not an ISO 3166 country code we can dial"))
    if problems:
        raise invalid_body(*problems)
    return SettingsChange(
        name=body.name,
        timezone=body.timezone,
        country=country,
        help_text=body.help_text,
        opt_in_text=body.opt_in_text,
        quiet_hours_start=(
            parse_hhmm(body.quiet_hours_start) if body.quiet_hours_start is not None else None
        ),
        quiet_hours_end=(
            parse_hhmm(body.quiet_hours_end) if body.quiet_hours_end is not None else None
        ),
    )


async def show_church(request: Request) -> Response:
    who = await principal(request, "read")
    async with services_of(request).pool.connection() as conn:
        church = await get_settings(conn, who.church_id)
    return ok(_view(church))


async def patch_church(request: Request) -> Response:
    who = await principal(request, "write")
    change = _change(await decode_body(request, ChurchPatch))
    async with services_of(request).pool.connection() as conn, conn.transaction():
        before, after = await update_settings(conn, who.church_id, change)
        replanned = (
            await replan_held(conn, who.church_id)
            if (before.timezone, before.quiet_hours) != (after.timezone, after.quiet_hours)
            else 0
        )
    audit_target(request, who.church_id)
    changed = [f for f in ChurchPatch.__struct_fields__ if getattr(before, f) != getattr(after, f)]
    audit_details(request, {"changed": changed, "held_recipients_replanned": replanned})
    return ok(_view(after))


def church_operations() -> list[Operation]:
    return [
        Operation(
            "GET",
            "/v1/church",
            show_church,
            "church.show",
            "The caller's church and its settings",
            "church",
            response=ChurchView,
        ),
        Operation(
            "PATCH",
            "/v1/church",
            patch_church,
            "church.update",
            "Change the church's name, time zone, country, keyword answers or quiet hours",
            "church",
            scope="write",
            role="admin",
            body=ChurchPatch,
            response=ChurchView,
            examples={
                "quiet hours": {"quiet_hours_start": "09:00", "quiet_hours_end": "20:30"},
                "zone and help": {
                    "timezone": "America/Chicago",
                    "help_text": "Grace Chapel: call 555-0100 for help. Reply STOP to opt out.",
                },
            },
        ),
    ]
