"""Phone numbers: E.164 normalisation, encryption at rest, keyed lookup hash.

A member's phone is stored twice: AES-256-GCM ciphertext (nonce prepended, the
church id as associated data so a ciphertext moved to another tenant will not
decrypt) and an HMAC-SHA256 of the E.164 string, keyed separately, so inbound
replies find their member by equality without ever storing the number in clear.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import uuid

import phonenumbers
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from storage.domain.errors import InvalidPhone


def normalize(raw: str, country: str = "US") -> str:
    """E.164 form of ``raw``; national formats are read with ``country``."""
    try:
        parsed = phonenumbers.parse(raw, None if raw.strip().startswith("+") else country)
    except phonenumbers.NumberParseException as exc:
        raise InvalidPhone(raw, str(exc)) from exc
    if not phonenumbers.is_valid_number(parsed):
        raise InvalidPhone(raw, "not a valid phone number")
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


class PhoneVault:
    """Encrypts, decrypts and hashes E.164 numbers with the configured keys."""

    def __init__(self, phone_key: bytes, lookup_key: bytes) -> None:
        if len(phone_key) != 32 or len(lookup_key) != 32:
            raise ValueError("phone and lookup keys must be 32 bytes each")
        self._aead = AESGCM(phone_key)
        self._lookup_key = lookup_key

    def encrypt(self, church_id: uuid.UUID, e164: str) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, e164.encode(), church_id.bytes)

    def decrypt(self, church_id: uuid.UUID, blob: bytes) -> str:
        return self._aead.decrypt(blob[:12], blob[12:], church_id.bytes).decode()

    def lookup_hash(self, e164: str) -> bytes:
        return hmac.new(self._lookup_key, e164.encode(), hashlib.sha256).digest()
