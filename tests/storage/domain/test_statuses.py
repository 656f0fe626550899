from __future__ import annotations

import pytest

from storage.domain.statuses import FINAL, RecipientStatus, can_transition, from_telnyx

S = RecipientStatus


@pytest.mark.parametrize(
    ("current", "target"),
    [
        (S.QUEUED, S.SENDING),
        (S.SENDING, S.SENT),
        (S.SENT, S.DELIVERED),
        (S.SENT, S.UNDELIVERED),
        (S.SENDING, S.FAILED),
        (S.QUEUED, S.SKIPPED),
        (S.SENDING, S.DELIVERED),  # a finalized webhook that overtook message.sent
    ],
)
def test_forward_transitions_are_allowed(current: S, target: S) -> None:
    assert can_transition(current, target)


@pytest.mark.parametrize(
    ("current", "target"),
    [
        (S.DELIVERED, S.SENT),
        (S.SENT, S.SENDING),
        (S.DELIVERED, S.UNDELIVERED),
        (S.FAILED, S.SENT),
        (S.SENT, S.FAILED),
        (S.SKIPPED, S.SENDING),
        (S.SENDING, S.QUEUED),
        (S.DELIVERED, S.DELIVERED),
    ],
)
def test_backward_or_repeated_transitions_are_refused(current: S, target: S) -> None:
    assert not can_transition(current, target)


def test_no_transition_leaves_a_final_status() -> None:
    for final in FINAL:
        assert not any(can_transition(final, target) for target in S)


def test_telnyx_statuses_map_as_the_protocol_says() -> None:
    assert from_telnyx("queued") is S.SENDING
    assert from_telnyx("sending") is S.SENDING
    assert from_telnyx("sent") is S.SENT
    assert from_telnyx("delivered") is S.DELIVERED
    assert from_telnyx("sending_failed") is S.FAILED
    assert from_telnyx("delivery_failed") is S.UNDELIVERED
    assert from_telnyx("delivery_unconfirmed") is S.SENT
    assert from_telnyx("expired") is S.FAILED
    assert from_telnyx("webhook_delivered") is None
