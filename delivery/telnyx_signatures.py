"""Telnyx webhook signatures: Ed25519 over ``"{telnyx-timestamp}|{raw body}"``."""

from __future__ import annotations

import base64
import binascii

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from delivery.errors import SignatureRejected


def load_public_key(b64: str) -> Ed25519PublicKey:
    raw = base64.b64decode(b64)
    if len(raw) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    return Ed25519PublicKey.from_public_bytes(raw)


def verify_telnyx(
    key: Ed25519PublicKey,
    body: bytes,
    timestamp: str | None,
    signature: str | None,
    *,
    now: float,
    tolerance_s: int,
) -> None:
    """Raise SignatureRejected unless the signature is valid and fresh."""
    if not timestamp or not signature:
        raise SignatureRejected("missing telnyx-signature-ed25519 or telnyx-timestamp")
    try:
        sent_at = int(timestamp)
    except ValueError as exc:
        raise SignatureRejected("telnyx-timestamp is not a Unix time") from exc
    if abs(now - sent_at) > tolerance_s:
        raise SignatureRejected("telnyx-timestamp outside the tolerance window")
    try:
        raw_signature = base64.b64decode(signature, validate=True)
        key.verify(raw_signature, timestamp.encode() + b"|" + body)
    except (InvalidSignature, binascii.Error, ValueError) as exc:
        raise SignatureRejected("signature does not verify") from exc
