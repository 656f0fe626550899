"""Time-ordered identifiers (UUIDv7) and the creation time they carry.

Partitioned rows (messages, recipients, conversation messages) are found by id
alone in URLs; because the id embeds its creation millisecond, every lookup by
id also names the partition (``created_at = created_at_of(id)``), so Postgres
prunes to one partition instead of probing all of them.
"""

from __future__ import annotations

import os
import time
import uuid
from datetime import UTC, datetime, timedelta

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_last_ms = 0
_seq = 0


def uuid7(at_ms: int | None = None) -> uuid.UUID:
    """A UUIDv7 (RFC 9562): 48-bit Unix ms, version, 12 bits of a per-process
    counter (monotonic within one millisecond), variant, 62 random bits."""
    global _last_ms, _seq
    ms = time.time_ns() // 1_000_000 if at_ms is None else at_ms
    if at_ms is None:
        if ms <= _last_ms:
            ms = _last_ms
            _seq += 1
            if _seq > 0xFFF:
                ms += 1
                _seq = 0
        else:
            _seq = int.from_bytes(os.urandom(2), "big") & 0x3FF
        _last_ms = ms
        seq = _seq
    else:
        seq = int.from_bytes(os.urandom(2), "big") & 0xFFF
    rand = int.from_bytes(os.urandom(8), "big") & ((1 << 62) - 1)
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | seq << 64 | 0b10 << 62 | rand
    return uuid.UUID(int=value)


def created_at_of(value: uuid.UUID) -> datetime:
    """The creation time a UUIDv7 carries (millisecond precision, UTC)."""
    if value.version != 7:
        raise ValueError("not a UUIDv7")
    return _EPOCH + timedelta(milliseconds=value.int >> 80)
