"""Recipient statuses and the only transitions allowed between them.

``queued → sending → sent → delivered | undelivered``, ``sending → failed``,
and ``skipped`` for a recipient not sent to. Transitions never go backwards, so
a late or duplicated provider webhook changes nothing.
"""

from __future__ import annotations

from enum import StrEnum


class RecipientStatus(StrEnum):
    QUEUED = "queued"
    SENDING = "sending"
    SENT = "sent"
    DELIVERED = "delivered"
    FAILED = "failed"
    UNDELIVERED = "undelivered"
    SKIPPED = "skipped"


ALL_STATUSES: tuple[RecipientStatus, ...] = tuple(RecipientStatus)

FINAL: frozenset[RecipientStatus] = frozenset(
    {
        RecipientStatus.DELIVERED,
        RecipientStatus.FAILED,
        RecipientStatus.UNDELIVERED,
        RecipientStatus.SKIPPED,
    }
)

_FINAL_VALUES = frozenset(s.value for s in FINAL)

# For every target status, the statuses a row may be in to move there.
_ALLOWED_FROM: dict[RecipientStatus, frozenset[RecipientStatus]] = {
    RecipientStatus.QUEUED: frozenset(),
    RecipientStatus.SENDING: frozenset({RecipientStatus.QUEUED}),
    RecipientStatus.SENT: frozenset({RecipientStatus.QUEUED, RecipientStatus.SENDING}),
    RecipientStatus.DELIVERED: frozenset(
        {RecipientStatus.QUEUED, RecipientStatus.SENDING, RecipientStatus.SENT}
    ),
    RecipientStatus.UNDELIVERED: frozenset(
        {RecipientStatus.QUEUED, RecipientStatus.SENDING, RecipientStatus.SENT}
    ),
    RecipientStatus.FAILED: frozenset({RecipientStatus.QUEUED, RecipientStatus.SENDING}),
    RecipientStatus.SKIPPED: frozenset({RecipientStatus.QUEUED, RecipientStatus.SENDING}),
}


def allowed_from(target: RecipientStatus) -> frozenset[RecipientStatus]:
    """The statuses from which ``target`` may be reached (the SQL guard's list)."""
    return _ALLOWED_FROM[target]


def can_transition(current: RecipientStatus, target: RecipientStatus) -> bool:
    return current in _ALLOWED_FROM[target]


# Telnyx reports per-destination statuses; docs/protocol.md "Recipient statuses" maps them.
_TELNYX: dict[str, RecipientStatus] = {
    "queued": RecipientStatus.SENDING,
    "sending": RecipientStatus.SENDING,
    "sent": RecipientStatus.SENT,
    "delivered": RecipientStatus.DELIVERED,
    "sending_failed": RecipientStatus.FAILED,
    "delivery_failed": RecipientStatus.UNDELIVERED,
    "delivery_unconfirmed": RecipientStatus.SENT,
    "expired": RecipientStatus.FAILED,
}


UNCONFIRMED = "delivery_unconfirmed"
"""The error code of a recipient that ends ``sent`` for good: the carrier never
confirmed it (Telnyx ``delivery_unconfirmed``), or no receipt came within the
provider's window. Such a recipient is final though ``sent`` is not."""


def is_final(status: str, error_code: str | None) -> bool:
    return status in _FINAL_VALUES or (status == RecipientStatus.SENT and error_code == UNCONFIRMED)


def from_telnyx(status: str) -> RecipientStatus | None:
    """Our status for a Telnyx ``to[].status``; None for ones we do not track."""
    return _TELNYX.get(status)


class MessageStatus(StrEnum):
    SCHEDULED = "scheduled"
    QUEUED = "queued"
    SENDING = "sending"
    COMPLETED = "completed"
    CANCELED = "canceled"
