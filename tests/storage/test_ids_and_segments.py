from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime

import msgspec
import pytest

from storage.errors import InvalidInput
from storage.ids import created_at_of, uuid7
from storage.pagination import decode_cursor, encode_cursor
from storage.segments import count_segments


def test_uuid7_embeds_its_creation_time() -> None:
    before = int(time.time() * 1000)
    value = uuid7()
    after = int(time.time() * 1000)
    assert value.version == 7
    ms = int(created_at_of(value).timestamp() * 1000)
    assert before <= ms <= after


def test_uuid7_sorts_by_creation() -> None:
    values = [uuid7() for _ in range(2000)]
    assert values == sorted(values)
    assert len(set(values)) == len(values)


def test_created_at_is_exact_to_the_millisecond() -> None:
    value = uuid7(at_ms=1_795_000_000_123)
    expected = datetime.fromtimestamp(1_795_000_000, tz=UTC).replace(microsecond=123_000)
    assert created_at_of(value) == expected


def test_created_at_refuses_other_versions() -> None:
    with pytest.raises(ValueError, match="UUIDv7"):
        created_at_of(uuid.uuid4())


def test_cursor_round_trip_and_garbage() -> None:
    at = datetime(2026, 11, 22, tzinfo=UTC)
    ident = uuid7()
    cursor = decode_cursor(encode_cursor(at, ident))
    assert (cursor.at, cursor.id) == (at, ident)
    with pytest.raises(InvalidInput):
        decode_cursor("not-a-cursor")
    with pytest.raises(InvalidInput):
        decode_cursor(msgspec.json.encode([1, 2]).decode())


@pytest.mark.parametrize(
    ("body", "encoding", "segments"),
    [
        ("a" * 160, "GSM-7", 1),
        ("a" * 161, "GSM-7", 2),
        ("a" * 306, "GSM-7", 2),
        ("a" * 307, "GSM-7", 3),
        ("{" * 80, "GSM-7", 1),  # extension characters take two septets
        ("{" * 81, "GSM-7", 2),
        ("é" * 160, "GSM-7", 1),  # é is in the GSM-7 basic set
        ("ä" + "x" * 69, "GSM-7", 1),
        ("ł" * 70, "UCS-2", 1),
        ("ł" * 71, "UCS-2", 2),
        ("ł" * 134, "UCS-2", 2),
        ("ł" * 135, "UCS-2", 3),
        ("🙏" * 35, "UCS-2", 1),  # outside the BMP: two UTF-16 units each
        ("🙏" * 36, "UCS-2", 2),
    ],
)
def test_segments(body: str, encoding: str, segments: int) -> None:
    info = count_segments(body)
    assert (info.encoding, info.segments) == (encoding, segments)


def test_recipient_ids_follow_their_message() -> None:
    from storage.recipients import recipient_id

    message = uuid7()
    ids = [recipient_id(message, n) for n in (1, 2, 255, 256, 70_000)]
    assert ids == sorted(ids)
    assert all(i.bytes[:10] == message.bytes[:10] for i in ids)
    assert str(ids[0]).replace("-", "") == message.hex[:20] + "000000000001"
