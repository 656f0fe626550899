"""The body of ``POST /v1/messages``, shared by accepting it (api/broadcasts.py) and
estimating it (api/estimates.py): one type, one set of checks, one way to read the
text, so an estimate is refused exactly when the send would be."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

import msgspec

from api.errors import invalid_body
from api.media import MediaBody, MediaIds, media_problems
from api.schemas import Request as RequestBody
from api.schemas import TargetRequest
from storage.domain import merge_fields
from storage.domain.envelope import FieldError
from storage.pg.database import Conn
from storage.pg.messages import MAX_SCHEDULE_AHEAD
from storage.pg.templates import get_template


class BroadcastRequest(RequestBody, frozen=True):
    """Give exactly one of ``body`` and ``template_id`` (with ``media_ids``, neither or
    an empty ``body`` is an MMS of files alone); ``send_at`` schedules it."""

    target: TargetRequest
    body: MediaBody | None = None
    template_id: uuid.UUID | None = None
    """Send a template's current text (copied into the message at acceptance)."""
    send_at: Annotated[datetime, msgspec.Meta(tz=True)] | None = None
    """RFC 3339 with a zone, in the future and at most 365 days ahead."""
    media_ids: MediaIds | None = None
    """Files from ``POST /v1/media`` sent with the text (MMS), in this order."""


def body_problems(text: str, field: str) -> list[FieldError]:
    return [FieldError(field, problem) for problem in merge_fields.problems(text)]


def request_problems(body: BroadcastRequest, now: datetime) -> list[FieldError]:
    problems: list[FieldError] = []
    target = body.target.problem()
    if target:
        problems.append(FieldError("target", target))
    problems += media_problems(body.media_ids)
    if body.body is None and body.template_id is None:
        if not body.media_ids:
            problems.append(FieldError("body", "is required"))
    elif body.body is not None and body.template_id is not None:
        problems.append(FieldError("body", "give exactly one of body or template_id"))
    elif body.body is not None:
        problems += body_problems(body.body, "body")
        if not body.body and not body.media_ids:
            problems.append(FieldError("body", "must not be empty (unless media_ids are given)"))
    if body.send_at is not None:
        if body.send_at <= now:
            problems.append(FieldError("send_at", "must be in the future"))
        elif body.send_at > now + MAX_SCHEDULE_AHEAD:
            problems.append(
                FieldError("send_at", f"must be at most {MAX_SCHEDULE_AHEAD.days} days ahead")
            )
    return problems


def check_request(body: BroadcastRequest, now: datetime) -> None:
    """``422`` naming every problem of ``body``; nothing when there is none."""
    problems = request_problems(body, now)
    if problems:
        raise invalid_body(*problems)


async def request_text(conn: Conn, church_id: uuid.UUID, body: BroadcastRequest) -> str:
    """The text to send: the body, or the template's current text (checked like a body,
    on ``template_id``); empty for files alone."""
    text = body.body
    if body.template_id is not None:
        text = (await get_template(conn, church_id, body.template_id)).body
        problems = body_problems(text, "template_id")
        if problems:
            raise invalid_body(*problems)
    return text or ""
