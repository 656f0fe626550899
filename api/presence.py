"""Who is here: GET /v1/presence (docs/protocol.md "The inbox")."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from api.auth import principal
from api.listing import services_of
from api.operation import Operation
from storage.redis.presence import PresenceStore, Snapshot
from storage.responses import ok


async def show_presence(request: Request) -> Response:
    """The church's staff online and each viewed conversation's viewers, from Redis
    (entries of nodes that died are swept first, and that change is published)."""
    who = await principal(request, "read")
    store = PresenceStore(services_of(request).publisher)
    return ok(await store.read(who.church_id))


def presence_operations() -> list[Operation]:
    return [
        Operation(
            "GET",
            "/v1/presence",
            show_presence,
            "presence.show",
            "Staff online and who views which conversation",
            "inbox",
            response=Snapshot,
            description=(
                "Realtime clients follow the same state as `staff.presence` and "
                "`conversation.viewers` events on `inbox`."
            ),
        ),
    ]
