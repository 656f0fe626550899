"""Channel names and who may read them (docs/protocol.md "Realtime over WebSocket").

Names are relative to the caller's church, which comes from the credentials:
``dashboard``, ``inbox``, ``message:<uuid>``, ``conversation:<uuid>``. Ids are
canonicalised (lower-case, hyphenated) so that every spelling of one channel
maps to the one Redis key publishers use.

A channel the caller may not read and a channel that does not exist answer
the same ``forbidden``, so a caller cannot probe for another church's ids.
"""

from __future__ import annotations

import uuid

import msgspec

from realtime.errors import ForbiddenChannel, UnknownChannel
from storage.pg.conversations import conversation_exists
from storage.pg.credentials import Principal
from storage.pg.messages import message_exists
from storage.process.services import Services

MAX_NAME_LENGTH = 100
_CHURCH_WIDE = frozenset({"dashboard", "inbox"})
_PER_ROW = frozenset({"message", "conversation"})


class ChannelRef(msgspec.Struct, frozen=True):
    kind: str
    """``dashboard``, ``inbox``, ``message`` or ``conversation``."""
    id: uuid.UUID | None
    """The message or conversation; None for church-wide channels."""
    name: str
    """The canonical channel name, as publishers spell it."""


def parse(name: str) -> ChannelRef:
    """The channel a name denotes; raises UnknownChannel for anything malformed."""
    if len(name) > MAX_NAME_LENGTH:
        raise UnknownChannel(name[:MAX_NAME_LENGTH], "channel name too long")
    if name in _CHURCH_WIDE:
        return ChannelRef(kind=name, id=None, name=name)
    kind, sep, raw_id = name.partition(":")
    if not sep or kind not in _PER_ROW:
        raise UnknownChannel(name, f"unknown channel {name!r}")
    # uuid.UUID also accepts braces, URNs and bare hex; only the hyphenated form is a name.
    if len(raw_id) != 36:
        raise UnknownChannel(name, f"malformed id in channel {name!r}")
    try:
        parsed = uuid.UUID(raw_id)
    except ValueError:
        raise UnknownChannel(name, f"malformed id in channel {name!r}") from None
    return ChannelRef(kind=kind, id=parsed, name=f"{kind}:{parsed}")


async def authorize(services: Services, principal: Principal, ref: ChannelRef) -> None:
    """Raise ForbiddenChannel unless the principal may read the channel."""
    if not principal.can("read"):
        raise ForbiddenChannel(ref.name, "read scope required")
    if ref.id is None:
        return
    async with services.pool.connection() as conn:
        if ref.kind == "message":
            found = await message_exists(conn, principal.church_id, ref.id)
        else:
            found = await conversation_exists(conn, principal.church_id, ref.id)
    if not found:
        raise ForbiddenChannel(ref.name, f"channel {ref.name!r} is not available")


async def resolve(services: Services, principal: Principal, name: str) -> ChannelRef:
    """Parse and authorize in one step; raises a ChannelError."""
    ref = parse(name)
    await authorize(services, principal, ref)
    return ref
