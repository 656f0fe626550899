"""Object keys: one shape on every backend.

A key is ``/``-separated segments of ``A-Z a-z 0-9 . _ = -``, each starting with a
letter or digit (so no ``.``, ``..``, hidden files or the ``name#1`` staging files a
local store writes), no leading or trailing ``/``, at most 1024 bytes (S3's limit).
The narrow alphabet keeps a key the same string on disk, in an S3 URL and in a
signed URL, with no percent-encoding that one backend applies and another doesn't.
"""

from __future__ import annotations

import re

from storage.objects.errors import InvalidObjectKey

MAX_KEY_BYTES = 1024
"""S3's limit on a key; the file backend keeps the same limit so keys move freely."""

_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=-]*")


def validate_key(key: str) -> str:
    """``key`` unchanged when it is a valid key; InvalidObjectKey naming why not."""
    if not key:
        raise InvalidObjectKey(key, "empty")
    if len(key.encode()) > MAX_KEY_BYTES:
        raise InvalidObjectKey(key, f"longer than {MAX_KEY_BYTES} bytes")
    if key.startswith("/"):
        raise InvalidObjectKey(key, "absolute (starts with /)")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidObjectKey(key, f"segment {segment!r} (empty, . and .. are refused)")
        if not _SEGMENT.fullmatch(segment):
            raise InvalidObjectKey(
                key, f"segment {segment!r} (letters, digits, . _ = - only, first alphanumeric)"
            )
    return key


def is_valid_key(key: str) -> bool:
    try:
        validate_key(key)
    except InvalidObjectKey:
        return False
    return True


def validate_prefix(prefix: str) -> str:
    """A listing prefix: empty (everything), or the start of a key. A trailing ``/``
    is allowed (``archive/``); the last segment may be partial (``archive/2024-0``)."""
    if prefix:
        validate_key(prefix.removesuffix("/"))
    return prefix


def media_key(church_id: object, media_id: object, extension: str) -> str:
    """Where one media file lives: ``media/<church>/<media>.<ext>`` (the extension
    only helps a person browsing the bucket; the type is in the media row)."""
    return validate_key(f"media/{church_id}/{media_id}.{extension}")
