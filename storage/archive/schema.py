"""The archived tables' rows, as the migrations leave them (storage/pg/migrations).

One Struct per table, fields in the table's column order: what ``read_month`` returns
and what ``write_month`` checks every row against before it is written, so a file
never holds a value its reader could not type. An archive file also records its
columns (name, kind, nullable) in its header, so it reads years later without this
module.

``SCHEMA_VERSION`` goes up whenever a column is removed, renamed or changes type, or
the file layout changes. Adding a nullable column keeps the version: it gets a
``None`` default here, older files read with ``None`` there, and a reader ignores
columns it does not know, so an older reader still reads newer files.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Final, Literal, get_args, get_origin, get_type_hints

import msgspec

Table = Literal["message", "message_recipient", "conversation_message"]
Kind = Literal["uuid", "uuid[]", "text", "timestamptz", "int", "bool", "jsonb"]

SCHEMA_VERSION: Final = 1
TABLES: Final[tuple[Table, ...]] = ("message", "message_recipient", "conversation_message")

# A timestamptz without its zone would be read back as a different instant.
Timestamp = Annotated[datetime, msgspec.Meta(tz=True)]
Json = Any
"""A jsonb value: dict, list, str, int, float, bool or None, as psycopg returns it."""


class ArchivedMessage(msgspec.Struct, frozen=True, kw_only=True):
    church_id: uuid.UUID
    id: uuid.UUID
    created_at: Timestamp
    body: str
    target: Json
    status: str
    recipient_count: int
    segments: int
    encoding: str
    from_number: str
    send_at: Timestamp | None = None
    created_by: uuid.UUID | None = None
    materialized_at: Timestamp | None = None
    completed_at: Timestamp | None = None
    template_id: uuid.UUID | None = None
    recurring_id: uuid.UUID | None = None
    canceled_at: Timestamp | None = None
    kind: str
    conversation_id: uuid.UUID | None = None
    consent_exempt: bool
    traceparent: str | None = None
    media_ids: list[uuid.UUID] | None = None
    """MMS files (migration 0017); files written before it read None (none)."""


class ArchivedRecipient(msgspec.Struct, frozen=True, kw_only=True):
    church_id: uuid.UUID
    message_id: uuid.UUID
    id: uuid.UUID
    created_at: Timestamp
    member_id: uuid.UUID
    status: str
    provider_message_id: str | None = None
    error_code: str | None = None
    attempts: int
    segments: int
    updated_at: Timestamp
    not_before: Timestamp | None = None


class ArchivedConversationMessage(msgspec.Struct, frozen=True, kw_only=True):
    church_id: uuid.UUID
    id: uuid.UUID
    created_at: Timestamp
    conversation_id: uuid.UUID
    direction: str
    body: str
    media: Json
    status: str
    provider_message_id: str | None = None
    sent_by: uuid.UUID | None = None
    author_id: uuid.UUID | None = None
    """A note's author (migration 0014); files written before it read None."""


ArchivedRow = ArchivedMessage | ArchivedRecipient | ArchivedConversationMessage

ROW_TYPES: Final[dict[Table, type[ArchivedRow]]] = {
    "message": ArchivedMessage,
    "message_recipient": ArchivedRecipient,
    "conversation_message": ArchivedConversationMessage,
}

SORT_KEYS: Final[dict[Table, tuple[str, ...]]] = {
    # The reads an archived month serves: one message by id, one message's
    # recipients paged by recipient id, one conversation's messages in time order.
    # The first column of each is the one the file's frame index is on.
    "message": ("id",),
    "message_recipient": ("message_id", "id"),
    "conversation_message": ("conversation_id", "created_at", "id"),
}


class Column(msgspec.Struct, frozen=True, array_like=True):
    name: str
    kind: Kind
    nullable: bool


_KINDS: Final[dict[Any, Kind]] = {
    uuid.UUID: "uuid",
    str: "text",
    datetime: "timestamptz",
    int: "int",
    bool: "bool",
}


def _columns(row_type: type[ArchivedRow]) -> tuple[Column, ...]:
    out = []
    for name, hint in get_type_hints(row_type, include_extras=True).items():
        args = [a for a in get_args(hint) if a is not type(None)] if hint is not Any else []
        nullable = type(None) in get_args(hint)
        base = args[0] if nullable else hint
        if get_origin(base) is list:  # uuid[]
            kind: Kind = "uuid[]"
        else:
            if get_args(base) and base is not Any:  # Annotated[datetime, ...]
                base = get_args(base)[0]
            kind = "jsonb" if base is Any else _KINDS[base]
        out.append(Column(name, kind, nullable))
    return tuple(out)


COLUMNS: Final[dict[Table, tuple[Column, ...]]] = {t: _columns(ROW_TYPES[t]) for t in TABLES}
