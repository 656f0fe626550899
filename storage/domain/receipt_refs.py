"""The reference in a send's callback URL, bound to its recipient by our own MAC.

Every send asks the provider to report on it at
``/v1/provider/telnyx/webhooks?ref=<church>.<message>.<recipient>.<mac>``, so the
inbound handler finds the recipient row in its partition at once. The provider's
Ed25519 signature covers the body, not that URL: without the MAC, anyone holding
one genuine signed receipt could post it with another recipient's reference and
move that recipient. The MAC is HMAC-SHA256 over the three ids, keyed with a key
derived from ``KOINONIA_LOOKUP_KEY`` (so no new secret to manage), cut to 128 bits.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import uuid

from storage.domain.errors import InvalidInput

_LABEL = b"koinonia receipt reference v1"
_MAC_BYTES = 16


class ReceiptRefs:
    def __init__(self, lookup_key: bytes) -> None:
        self._key = hmac.new(lookup_key, _LABEL, hashlib.sha256).digest()

    def _mac(self, ids: str) -> str:
        digest = hmac.new(self._key, ids.encode(), hashlib.sha256).digest()[:_MAC_BYTES]
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def make(self, church_id: uuid.UUID, message_id: uuid.UUID, recipient_id: uuid.UUID) -> str:
        ids = f"{church_id}.{message_id}.{recipient_id}"
        return f"{ids}.{self._mac(ids)}"

    def parse(self, ref: str) -> tuple[uuid.UUID, uuid.UUID, uuid.UUID]:
        """(church, message, recipient) of a reference we made; ``InvalidInput`` for
        anything else (malformed, or a MAC that does not match)."""
        ids, _, mac = ref.rpartition(".")
        if not hmac.compare_digest(mac.encode(), self._mac(ids).encode()):
            raise InvalidInput("ref", "is not a reference this server made")
        parts = ids.split(".")
        try:
            church, message, recipient = (uuid.UUID(p) for p in parts)
        except ValueError as exc:
            raise InvalidInput("ref", "is malformed") from exc
        return church, message, recipient
