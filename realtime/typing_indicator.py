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

from storage.domain.events import ConversationTyping, encode, new_event
from storage.redis import key_names
from storage.redis.publisher import HISTORY_TTL_S, EventPublisher, new_epoch

TYPING_INTERVAL_S = 1.0
"""At most one event per conversation per connection in this time."""
MAX_CONVERSATIONS = 16
"""Conversations a connection's gate remembers; the oldest is forgotten first."""

# KEYS: history, epoch. ARGV: pub/sub channel, json-encoded channel name, event
# json, epoch candidate, ttl seconds, event type. Finds the channel's epoch and
# latest offset as `head` does (creating both for a channel without history, as
# any subscriber's `head` would) and publishes the frame with a `~` offset.
_TYPING_LUA = """
local epoch = redis.call('GET', KEYS[2])
if (not epoch) or redis.call('EXISTS', KEYS[1]) == 0 then
  epoch = ARGV[4]
  redis.call('SET', KEYS[2], epoch, 'EX', ARGV[5])
  redis.call('XADD', KEYS[1], 'MAXLEN', '0', '*', 'x', '')
  redis.call('EXPIRE', KEYS[1], ARGV[5])
end
local offset = '0-0'
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if last[1] then
  offset = last[1][1]
else
  local info = redis.call('XINFO', 'STREAM', KEYS[1])
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then offset = info[i + 1] end
  end
end
local frame = '{"type":"event","channel":' .. ARGV[2] .. ',"offset":"' .. offset ..
  '","event":' .. ARGV[3] .. '}'
local header = ARGV[6] .. '\\n' .. epoch .. '\\n~' .. offset .. '\\n'
return redis.call('PUBLISH', ARGV[1], header .. frame)
"""


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
    event = new_event(
        "conversation.typing", ConversationTyping(conversation_id=conversation_id, user_id=user_id)
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
                ],
            )
        )
    await publisher.scripts.run(calls)
