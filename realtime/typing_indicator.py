"""Typing indicators: ``conversation.typing``, realtime only (docs/protocol.md "Events").

A staff member's client sends ``{"type":"typing","conversation_id":"..."}``;
the event goes to the ``conversation:<id>`` and ``inbox`` channels of the
church on every node, by pub/sub alone: it is never added to a channel's
history and never reaches the outbox, so webhooks never see it and ``since``
never replays it.

Offsets: an ``event`` frame always carries an offset, and a typing frame's is
the channel's latest stored offset at the time it was published (the last
event's, or the empty channel's head), repeated rather than new. A client that
stores the offset of every frame it reads therefore never goes backwards and
resumes with ``since`` exactly where it would have without the typing frame.
The hub tells such a frame by its ``~`` header offset (``realtime.hub``) and a
subscription passes it on only at that very offset (``realtime.connection``).

Only sessions type: ``user_id`` is the staff member. An API key has no user,
so its typing frames are refused with ``forbidden`` (the event's ``user_id``
is never null). Per connection, one event per conversation per second is
published; more are dropped silently (the indicator is already showing).
"""

from __future__ import annotations

import uuid

from storage.domain.events import ConversationTyping, ConversationTypingEvent, encode
from storage.redis import key_names
from storage.redis.publisher import HISTORY_TTL_S, EventPublisher, new_epoch
from storage.redis.scripts import lua

TYPING_INTERVAL_S = 1.0
"""At most one event per conversation per connection in this time."""
MAX_CONVERSATIONS = 16
"""Conversations a connection's gate remembers; the oldest is forgotten first."""

_TYPING_LUA = lua("typing_publish")


class TypingGate:
    """One connection's typing state, with no I/O: which conversations it has been
    allowed to type in (checked once) and when it last published for each."""

    __slots__ = ("_sent",)

    def __init__(self) -> None:
        # Conversation → when its last event was published; insertion-ordered.
        self._sent: dict[uuid.UUID, float] = {}

    def known(self, conversation_id: uuid.UUID) -> bool:
        """Whether the conversation was already found to be the caller's."""
        return conversation_id in self._sent

    def due(self, conversation_id: uuid.UUID, now: float) -> bool:
        """Whether an event may be published now (else the frame is dropped)."""
        last = self._sent.get(conversation_id)
        return last is None or now - last >= TYPING_INTERVAL_S

    def sent(self, conversation_id: uuid.UUID, now: float) -> None:
        sent = self._sent
        sent.pop(conversation_id, None)
        if len(sent) >= MAX_CONVERSATIONS:
            del sent[next(iter(sent))]
        sent[conversation_id] = now


async def publish_typing(
    publisher: EventPublisher, church_id: uuid.UUID, conversation_id: uuid.UUID, user_id: uuid.UUID
) -> None:
    """Publish one ``conversation.typing`` to the conversation's channel and the
    inbox (one round trip), adding nothing to their history."""
    event = ConversationTypingEvent.new(
        ConversationTyping(conversation_id=conversation_id, user_id=user_id)
    )
    body = encode(event)
    sha = publisher.scripts.register(_TYPING_LUA)
    calls = []
    for channel in (f"conversation:{conversation_id}", "inbox"):
        calls.append(
            (
                sha,
                [
                    key_names.channel_history(church_id, channel),
                    key_names.channel_epoch(church_id, channel),
                ],
                [
                    key_names.channel_pubsub(church_id, channel),
                    encode(channel),
                    body,
                    new_epoch(),
                    HISTORY_TTL_S,
                    event.type,
                    publisher.publish_command,
                ],
            )
        )
    await publisher.scripts.run(calls)
