"""Events: the typed payloads realtime clients and webhooks share (docs/protocol.md "Events").

An event is a tagged union: one ``Event`` subclass per type, its tag the ``type``
on the wire and its ``data`` the payload of that type, so a type can only ever
travel with its own payload. Make one with ``MessageCreatedEvent.new(data)`` (a
fresh id and time; mypy rejects another payload), decode any with
``msgspec.json.decode(raw, type=AnyEvent)`` (a payload that does not match its
type fails). ``EVENT_TYPES`` and ``WEBHOOK_EVENT_TYPES`` are read from the union.

Publishing them is ``storage/redis/publisher.py``'s; this module is pure types
and bytes, shared by every process.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar, Generic, Self, TypeVar, cast, get_args

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


class MediaItem(Base, frozen=True):
    """One MMS file as clients see it; ``url`` opens it for the church's staff and keys."""

    id: uuid.UUID
    content_type: str
    size: int
    url: str


class ConversationMessageCreated(Base, frozen=True):
    conversation_id: uuid.UUID
    message_id: uuid.UUID
    member_id: uuid.UUID
    direction: str
    body: str
    created_at: datetime
    media: list[MediaItem] = []


class ConversationMessageStatus(Base, frozen=True):
    conversation_id: uuid.UUID
    message_id: uuid.UUID
    status: str


class ConversationTyping(Base, frozen=True):
    conversation_id: uuid.UUID
    user_id: uuid.UUID


class MemberChanged(Base, frozen=True):
    member_id: uuid.UUID


class MemberJoinedGroup(Base, frozen=True):
    member_id: uuid.UUID
    group_id: uuid.UUID
    source: str
    """What added them: ``keyword`` (a group keyword texted in)."""


class Viewer(Base, frozen=True):
    user_id: uuid.UUID
    since: datetime


class ConversationViewers(Base, frozen=True):
    conversation_id: uuid.UUID
    viewers: list[Viewer]


class StaffPresence(Base, frozen=True):
    user_id: uuid.UUID
    status: str
    """``online`` or ``offline``."""


class MemberOptChanged(Base, frozen=True):
    member_id: uuid.UUID
    source: str
    """What moved the consent: ``keyword``, ``staff``, ``api``, ``import``."""


class WebhookEndpointDisabled(Base, frozen=True):
    endpoint_id: uuid.UUID
    reason: str


class WebhookEndpointTest(Base, frozen=True):
    endpoint_id: uuid.UUID


D = TypeVar("D", bound=Base)


class Event(Base, Generic[D], frozen=True, tag_field="type"):
    """The envelope every event travels in (docs/protocol.md "Events"):
    ``{"type","id","occurred_at","data"}``, the type being the subclass's tag."""

    id: str
    occurred_at: str
    data: D

    subscribable: ClassVar[bool] = True
    """Whether webhook endpoints can subscribe to this type (their ``events``)."""

    @classmethod
    def new(cls, data: D) -> Self:
        """This event with a fresh id and the time now."""
        now = datetime.now(UTC)
        return cls(
            id=str(uuid7()),
            occurred_at=now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            data=data,
        )

    @property
    def type(self) -> str:
        return cast(str, self.__struct_config__.tag)


class MessageCreatedEvent(Event[MessageCreated], frozen=True, tag="message.created"):
    pass


class MessageProgressEvent(Event[MessageProgress], frozen=True, tag="message.progress"):
    pass


class MessageCompletedEvent(Event[MessageCompleted], frozen=True, tag="message.completed"):
    pass


class MessageRecipientStatusEvent(
    Event[RecipientStatusChanged], frozen=True, tag="message.recipient.status"
):
    pass


class ConversationCreatedEvent(Event[ConversationChanged], frozen=True, tag="conversation.created"):
    pass


class ConversationUpdatedEvent(Event[ConversationChanged], frozen=True, tag="conversation.updated"):
    pass


class ConversationMessageCreatedEvent(
    Event[ConversationMessageCreated], frozen=True, tag="conversation.message.created"
):
    pass


class ConversationMessageStatusEvent(
    Event[ConversationMessageStatus], frozen=True, tag="conversation.message.status"
):
    pass


class ConversationTypingEvent(Event[ConversationTyping], frozen=True, tag="conversation.typing"):
    """Realtime only: pub/sub, never logged, stored or sent to webhooks."""

    subscribable: ClassVar[bool] = False


class ConversationViewersEvent(Event[ConversationViewers], frozen=True, tag="conversation.viewers"):
    """Realtime only: pub/sub, never logged, stored or sent to webhooks."""

    subscribable: ClassVar[bool] = False


class StaffPresenceEvent(Event[StaffPresence], frozen=True, tag="staff.presence"):
    """Realtime only: pub/sub, never logged, stored or sent to webhooks."""

    subscribable: ClassVar[bool] = False


class MemberCreatedEvent(Event[MemberChanged], frozen=True, tag="member.created"):
    pass


class MemberUpdatedEvent(Event[MemberChanged], frozen=True, tag="member.updated"):
    pass


class MemberOptedOutEvent(Event[MemberOptChanged], frozen=True, tag="member.opted_out"):
    pass


class MemberOptedInEvent(Event[MemberOptChanged], frozen=True, tag="member.opted_in"):
    pass


class MemberJoinedGroupEvent(Event[MemberJoinedGroup], frozen=True, tag="member.joined_group"):
    pass


class WebhookEndpointDisabledEvent(
    Event[WebhookEndpointDisabled], frozen=True, tag="webhook_endpoint.disabled"
):
    pass


class WebhookEndpointTestEvent(
    Event[WebhookEndpointTest], frozen=True, tag="webhook_endpoint.test"
):
    """Sent to one endpoint on request, whatever its filters."""

    subscribable: ClassVar[bool] = False


AnyEvent = (
    MessageCreatedEvent
    | MessageProgressEvent
    | MessageCompletedEvent
    | MessageRecipientStatusEvent
    | ConversationCreatedEvent
    | ConversationUpdatedEvent
    | ConversationMessageCreatedEvent
    | ConversationMessageStatusEvent
    | ConversationTypingEvent
    | ConversationViewersEvent
    | StaffPresenceEvent
    | MemberCreatedEvent
    | MemberUpdatedEvent
    | MemberOptedOutEvent
    | MemberOptedInEvent
    | MemberJoinedGroupEvent
    | WebhookEndpointDisabledEvent
    | WebhookEndpointTestEvent
)
"""Every event there is: ``msgspec.json.decode(raw, type=AnyEvent)``."""

MemberEvent = MemberCreatedEvent | MemberUpdatedEvent | MemberOptedOutEvent | MemberOptedInEvent


def tag_of(kind: type[Event[Any]]) -> str:
    """The ``type`` of an event class, as on the wire."""
    return cast(str, kind.__struct_config__.tag)


EVENT_KINDS: tuple[type[Event[Any]], ...] = get_args(AnyEvent)
EVENT_TYPES: tuple[str, ...] = tuple(tag_of(k) for k in EVENT_KINDS)
"""Every event type, in the union's order."""
WEBHOOK_EVENT_TYPES = frozenset(tag_of(k) for k in EVENT_KINDS if k.subscribable)
"""What integrators can subscribe to (typing, viewers and presence are realtime only,
the test on request)."""


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
