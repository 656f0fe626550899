from __future__ import annotations

import uuid

from delivery.receipts import rounds
from storage.domain.ids import uuid7
from storage.domain.statuses import RecipientStatus
from storage.pg.recipients import ProviderStatus


def _receipt(recipient: uuid.UUID, status: RecipientStatus, n: int) -> ProviderStatus:
    return ProviderStatus(
        event_id=f"e{n}",
        event_type="message.finalized",
        church_id=uuid.UUID(int=1),
        message_id=uuid7(),
        recipient_id=recipient,
        target=status,
        provider_message_id="p",
        error_code=None,
    )


def test_one_receipt_per_recipient_per_round_in_arrival_order() -> None:
    a, b, c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    batch = [
        _receipt(a, RecipientStatus.SENT, 1),
        _receipt(b, RecipientStatus.SENT, 2),
        _receipt(a, RecipientStatus.DELIVERED, 3),
        _receipt(c, RecipientStatus.SENT, 4),
        _receipt(a, RecipientStatus.DELIVERED, 5),
    ]
    split = rounds(batch)
    assert [[r.event_id for r in part] for part in split] == [["e1", "e2", "e4"], ["e3"], ["e5"]]
    for part in split:
        ids = [r.recipient_id for r in part]
        assert len(ids) == len(set(ids))


def test_empty_batch_has_no_rounds() -> None:
    assert rounds([]) == []
