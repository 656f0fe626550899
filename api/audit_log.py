"""The audit log of staff and API-key actions, for the church's admins."""

from __future__ import annotations

import uuid

from starlette.requests import Request
from starlette.responses import Response

from api.errors import invalid_query
from api.listing import paged
from api.operation import Operation, QueryParam
from storage.domain.envelope import FieldError
from storage.pg.audit import AuditEntry, list_entries


async def index_audit_log(request: Request) -> Response:
    """``?action=member.create`` (or a prefix such as ``member.*``), ``?actor_id=``."""
    action = request.query_params.get("action") or None
    if action is not None and len(action) > 100:
        raise invalid_query(FieldError("action", "at most 100 characters"))
    actor: uuid.UUID | None = None
    if (raw := request.query_params.get("actor_id")) is not None:
        try:
            actor = uuid.UUID(raw)
        except ValueError as exc:
            raise invalid_query(FieldError("actor_id", "must be a UUID")) from exc
    return await paged(
        request,
        list_entries,
        action=action,
        actor_id=actor,
    )


def audit_operations() -> list[Operation]:
    return [
        Operation(
            "GET",
            "/v1/audit-log",
            index_audit_log,
            "audit_log.list",
            "Who did what, newest first",
            "audit",
            role="admin",
            response=list[AuditEntry],
            listing=True,
            query=(
                QueryParam("action", str, "an action (`member.create`) or prefix (`member.*`)"),
                QueryParam("actor_id", uuid.UUID, "a staff user's or API key's id"),
            ),
        )
    ]
