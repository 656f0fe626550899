"""Keep one file as a church's media: judge it, store its bytes, then its row.

Both ways a file arrives go through here: a staff upload (``POST /v1/media``) and a
member's MMS copied from the provider's expiring link (delivery/inbound.py). The
object is written before the row, so a row always names bytes that exist; a crash
between the two leaves an unreferenced object and nothing else.
"""

from __future__ import annotations

import hashlib
import uuid

from storage.domain.ids import uuid7
from storage.domain.media_types import EXTENSIONS, MAX_MEDIA_BYTES, sniff
from storage.objects import ObjectStore
from storage.objects.keys import media_key
from storage.pg.database import Conn
from storage.pg.media import Media, insert_media


class UnsupportedMedia(Exception):
    """Not a type carriers take (judged by content)."""

    code = "unsupported_media_type"


class MediaTooLarge(Exception):
    code = "payload_too_large"


def check(data: bytes) -> str:
    """The content type of ``data``; UnsupportedMedia or MediaTooLarge when it cannot
    be sent as MMS."""
    if len(data) > MAX_MEDIA_BYTES:
        raise MediaTooLarge(f"media is larger than {MAX_MEDIA_BYTES} bytes")
    if not data:
        raise UnsupportedMedia("media is empty")
    content_type = sniff(data)
    if content_type is None:
        raise UnsupportedMedia(
            "media must be JPEG, PNG, GIF, MP4, MP3, vCard or PDF (judged by content)"
        )
    return content_type


async def keep(
    objects: ObjectStore,
    conn: Conn,
    church_id: uuid.UUID,
    data: bytes,
    *,
    source: str,
    created_by: uuid.UUID | None = None,
) -> Media:
    """Check, store and record ``data``; the new row (``conn``'s transaction commits it)."""
    content_type = check(data)
    media_id = uuid7()
    key = media_key(church_id, media_id, EXTENSIONS[content_type])
    await objects.put(key, data, content_type=content_type)
    return await insert_media(
        conn,
        church_id,
        media_id,
        content_type=content_type,
        size=len(data),
        object_key=key,
        sha256=hashlib.sha256(data).hexdigest(),
        source=source,
        created_by=created_by,
    )
