"""The per-connection typing gate, without sockets."""

from __future__ import annotations

import uuid

from realtime.typing_indicator import MAX_CONVERSATIONS, TypingGate


def test_one_event_per_conversation_per_second() -> None:
    gate = TypingGate()
    a, b = uuid.uuid4(), uuid.uuid4()
    assert gate.due(a, 10.0)
    assert not gate.known(a)
    gate.sent(a, 10.0)
    assert gate.known(a)
    assert not gate.due(a, 10.5)
    assert gate.due(b, 10.5)  # each conversation on its own
    assert gate.due(a, 11.0)


def test_the_gate_remembers_a_bounded_number_of_conversations() -> None:
    gate = TypingGate()
    ids = [uuid.uuid4() for _ in range(MAX_CONVERSATIONS + 1)]
    for i, conversation in enumerate(ids):
        gate.sent(conversation, float(i))
    assert not gate.known(ids[0])  # the oldest is forgotten (and checked again)
    assert all(gate.known(c) for c in ids[1:])
