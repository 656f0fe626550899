"""Dead letters: the church's sends that used every attempt, listed and requeued.

``GET /v1/dead-letters`` lists the caller's church's entries of the dead-letter
stream, newest first; ``POST /v1/dead-letters/{id}/requeue`` (admins) sends one
again with a fresh attempt budget and removes it. Requeueing never texts a
member twice (storage/pg/dead_letters.py says how); an entry past the provider's
idempotency window is a ``409 conflict``. Another church's entry is ``404``.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from api.auth import principal
from api.listing import services_of
from api.operation import Operation, audit_details
from api.validation import page_params, path_id
from storage.pg.dead_letters import DeadLetter, Requeued, list_dead_letters, requeue
from storage.responses import ok


async def index_dead_letters(request: Request) -> Response:
    who = await principal(request, "read")
    limit, cursor = page_params(request)
    page = await list_dead_letters(
        services_of(request).redis, who.church_id, limit=limit, cursor=cursor
    )
    return ok(page.items, next_cursor=page.next_cursor)


async def requeue_dead_letter(request: Request) -> Response:
    who = await principal(request, "write")
    entry = path_id(request)
    services = services_of(request)
    delivery = services.settings.delivery
    done = await requeue(
        services.pool,
        services.redis,
        entry,
        church_id=who.church_id,
        shards=delivery.shards,
        max_attempts=delivery.max_attempts,
    )
    audit_details(
        request,
        {
            "message_id": str(done.message_id),
            "requeued": done.requeued,
            "unchanged": done.unchanged,
        },
    )
    return ok(done)


def dead_letter_operations() -> list[Operation]:
    return [
        Operation(
            "GET",
            "/v1/dead-letters",
            index_dead_letters,
            "dead_letter.list",
            "Sends that used every attempt, newest first",
            "dead_letters",
            response=list[DeadLetter],
            listing=True,
        ),
        Operation(
            "POST",
            "/v1/dead-letters/{id}/requeue",
            requeue_dead_letter,
            "dead_letter.requeue",
            "Send a dead letter's recipients again with a fresh attempt budget",
            "dead_letters",
            scope="write",
            role="admin",
            response=Requeued,
            errors=("conflict",),
        ),
    ]
