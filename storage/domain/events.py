"""Events: the typed payloads realtime clients and webhooks share (docs/protocol.md "Events").

Publishing them is ``storage/redis/publisher.py``'s; this module is pure types
and bytes, shared by every process.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import msgspec

from storage.domain.ids import uuid7


class Base(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    pass


class Counts(Base, frozen=True):
    queued: int = 0
    sending: int = 0
    sent: int = 0
    delivered: int = 0
    failed: int = 0
    undelivered: int = 0
    skipped: int = 0


class MessageCreated(Base, frozen=True):
    message_id: uuid.UUID
    recipient_count: int
    status: str


class MessageProgress(Base, frozen=True):
    message_id: uuid.UUID
    counts: Counts
    recipient_count: int


class MessageCompleted(Base, frozen=True):
    message_id: uuid.UUID
    counts: Counts


class RecipientStatusChanged(Base, frozen=True):
    message_id: uuid.UUID
    recipient_id: uuid.UUID
    member_id: uuid.UUID
    status: str
    provider_message_id: str | None
    error_code: str | None


class ConversationChanged(Base, frozen=True):
    conversation_id: uuid.UUID
    member_id: uuid.UUID
    status: str
    unread_count: int
    assignee_id: uuid.UUID | None
    last_message_at: datetime


class ConversationMessageCreated(Base, frozen=True):
    conversation_id: uuid.UUID
    message_id: uuid.UUID
    member_id: uuid.UUID
    direction: str
    body: str
    created_at: datetime


class ConversationMessageStatus(Base, frozen=True):
    conversation_id: uuid.UUID
    message_id: uuid.UUID
    status: str


class ConversationTyping(Base, frozen=True):
    conversation_id: uuid.UUID
    user_id: uuid.UUID


class MemberChanged(Base, frozen=True, omit_defaults=True):
    member_id: uuid.UUID
    source: str | None = None


class WebhookEndpointDisabled(Base, frozen=True):
    endpoint_id: uuid.UUID
    reason: str


EventData = (
    MessageCreated
    | MessageProgress
    | MessageCompleted
    | RecipientStatusChanged
    | ConversationChanged
    | ConversationMessageCreated
    | ConversationMessageStatus
    | ConversationTyping
    | MemberChanged
    | WebhookEndpointDisabled
)


class Event(Base, frozen=True):
    """The envelope every event travels in (docs/protocol.md "Events")."""

    id: str
    type: str
    occurred_at: str
    data: Any


def new_event(type_: str, data: EventData) -> Event:
    now = datetime.now(UTC)
    return Event(
        id=str(uuid7()),
        type=type_,
        occurred_at=now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        data=data,
    )


_encoder = msgspec.json.Encoder()


def encode(value: object) -> bytes:
    return _encoder.encode(value)


def frame_bytes(channel: str, offset: str, event_json: bytes) -> bytes:
    """The WebSocket ``event`` frame, byte for byte as the publish script builds it."""
    return (
        b'{"type":"event","channel":'
        + encode(channel)
        + b',"offset":"'
        + offset.encode()
        + b'","event":'
        + event_json
        + b"}"
    )
