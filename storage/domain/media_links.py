"""Links the provider fetches a message's media from: public, signed, expiring.

A carrier fetches each ``media_urls`` entry without our credentials, so the link
itself carries the right to read one file until a time: ``/media/<church>/<media>
?expires=<unix seconds>&signature=<mac>``, served by ``GET /media/...``
(api/media.py). The MAC is HMAC-SHA256 over church, media and expiry with a key
derived from ``KOINONIA_LOOKUP_KEY`` (no new secret to manage, as receipt
references do), cut to 128 bits. The same route serves every object store backend,
so a file:// development store works exactly as S3 does.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import uuid

_LABEL = b"koinonia media link v1"
_MAC_BYTES = 16


class MediaLinks:
    def __init__(self, lookup_key: bytes) -> None:
        self._key = hmac.new(lookup_key, _LABEL, hashlib.sha256).digest()

    def _mac(self, church_id: uuid.UUID, media_id: uuid.UUID, expires: int) -> str:
        signed = f"{church_id}.{media_id}.{expires}".encode()
        digest = hmac.new(self._key, signed, hashlib.sha256).digest()[:_MAC_BYTES]
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def make(self, public_url: str, church_id: uuid.UUID, media_id: uuid.UUID, expires: int) -> str:
        """The absolute link, valid until ``expires`` (unix seconds)."""
        mac = self._mac(church_id, media_id, expires)
        return (
            f"{public_url.rstrip('/')}/media/{church_id}/{media_id}"
            f"?expires={expires}&signature={mac}"
        )

    def valid(
        self, church_id: uuid.UUID, media_id: uuid.UUID, expires: int, signature: str, now: float
    ) -> bool:
        """The signature is ours for these ids and expiry, and the expiry has not passed."""
        good = hmac.compare_digest(
            signature.encode(), self._mac(church_id, media_id, expires).encode()
        )
        return good and now < expires


def content_url(public_url: str, media_id: uuid.UUID) -> str:
    """Where the church's staff and keys open a file (``GET /v1/media/{id}/content``,
    authenticated like every ``/v1`` read)."""
    return f"{public_url.rstrip('/')}/v1/media/{media_id}/content"
