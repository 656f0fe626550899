"""The church's archived months (docs/operations.md "Object store, retention and
archive"): what left the database, month by month. The rows themselves are read
through the usual message and conversation endpoints."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from api.auth import principal
from api.listing import read
from api.operation import Operation
from storage.pg.archive_index import ArchivedMonth, archived_months
from storage.responses import ok


async def index_archive(request: Request) -> Response:
    who = await principal(request, "read")
    return ok(await read(request, archived_months, who.church_id))


def archive_operations() -> list[Operation]:
    return [
        Operation(
            "GET",
            "/v1/archive",
            index_archive,
            "archive.list",
            "The church's archived months, newest first, with their rows per table",
            "messages",
            response=list[ArchivedMonth],
            description=(
                "Months whose messages, recipients and conversation messages were moved "
                "to the object store (`koinonia archive`). They stay readable through "
                "`GET /v1/messages/{id}`, its recipients, the conversation threads and "
                "`GET /v1/messages?include_archived=true`; `messages` counts every text "
                "of the month (broadcasts, replies and automatic answers)."
            ),
        )
    ]
