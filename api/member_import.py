"""``POST /v1/members/import``: members from a CSV body, streamed.

The body is read chunk by chunk into ``storage.member_import.MemberImporter``
(the same code ``koinonia import-members`` runs), which writes every 500 valid
rows in one transaction. The answer is a summary: rows processed, created,
updated and failed, and the first 100 row errors (``row`` numbered as a
spreadsheet shows them, the header being row 1). Imports may be up to 50 MiB,
past the global body limit (``api/middleware.py`` knows this path).
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from api.auth import principal
from api.errors import ApiError
from api.listing import services_of
from api.operation import Operation, audit_details
from storage.pg.churches import get_church
from storage.pg.member_import import IMPORT_PATH, MAX_IMPORT_BYTES, ImportSummary, MemberImporter
from storage.responses import ok

_CSV_TYPES = frozenset({"text/csv", "application/csv"})


async def import_members(request: Request) -> Response:
    who = await principal(request, "write")
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type not in _CSV_TYPES:
        raise ApiError("unsupported_media_type", "send the file with Content-Type: text/csv")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_IMPORT_BYTES:
        raise ApiError("payload_too_large", f"imports are limited to {MAX_IMPORT_BYTES} bytes")
    services = services_of(request)
    async with services.pool.connection() as conn:
        church = await get_church(conn, who.church_id)
    importer = MemberImporter(
        services.pool,
        services.vault,
        who.church_id,
        country=church.country if church else "US",
        cache=services.cache,
    )
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_IMPORT_BYTES:
            raise ApiError(
                "payload_too_large",
                f"imports are limited to {MAX_IMPORT_BYTES} bytes; the first "
                f"{importer.processed} rows were processed before the limit",
            )
        await importer.feed(chunk)
    summary = await importer.finish()
    audit_details(
        request,
        {
            "processed": summary.processed,
            "created": summary.created,
            "updated": summary.updated,
            "failed": summary.failed,
        },
    )
    return ok(summary)


def import_operations() -> list[Operation]:
    return [
        Operation(
            "POST",
            IMPORT_PATH,
            import_members,
            "member.import",
            "Import members from a CSV file (up to 50 MiB)",
            "members",
            scope="write",
            body=str,
            body_media_type="text/csv",
            response=ImportSummary,
            errors=("unsupported_media_type", "payload_too_large"),
            description=(
                "Columns by header (case-insensitive): `phone` (required), `first_name` "
                "(required for new members), `last_name`, `email`, `groups` (names separated "
                "by `;`, created when missing), `branch` (an existing branch's name), "
                "`opted_in` (true/false). Rows upsert by phone: an existing member gets the "
                "row's non-blank values and joins its groups. Bad rows are skipped and "
                "reported (the first 100) with their row number, the header being row 1; "
                "a bad header is a `validation_error` on field `header` and imports nothing."
            ),
            examples={
                "csv": "first_name,last_name,phone,groups\nAda,Lovelace,+12025550143,Choir;Youth\n"
            },
        ),
    ]
