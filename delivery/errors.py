"""Errors of the delivery package.

The tree::

    DeliveryError
    └── SignatureRejected   an inbound provider webhook failed verification

Routes turn them into HTTP answers; the core never speaks HTTP.
"""

from __future__ import annotations


class DeliveryError(Exception):
    pass


class SignatureRejected(DeliveryError):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
