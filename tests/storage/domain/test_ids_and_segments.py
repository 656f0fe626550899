from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest

from storage.domain.errors import InvalidInput
from storage.domain.ids import created_at_of, uuid7
from storage.domain.segments import count_segments
from storage.pg.pagination import decode_cursor, encode_cursor


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


VECTORS = json.loads((Path(__file__).parents[2] / "vectors" / "segments.json").read_text())["cases"]


@pytest.mark.parametrize("case", VECTORS, ids=lambda c: f"{c['encoding']}-{len(c['text'])}")
def test_segments_match_the_shared_vectors(case: dict[str, object]) -> None:
    info = count_segments(str(case["text"]))
    assert (info.encoding, info.segments) == (case["encoding"], case["segments"]), case.get("why")


def test_the_vectors_cover_every_boundary() -> None:
    """A vector file that lost its hard cases would let a naive counter pass."""
    texts = {c["text"]: c["segments"] for c in VECTORS}
    assert texts["a" * 152 + "€" + "a" * 152] == 3
    assert texts["a" * 66 + "😀" + "a" * 66] == 3
    naive = [c for c in VECTORS if c["segments"] != _naive(str(c["text"]), str(c["encoding"]))]
    assert len(naive) >= 4, "the vectors must include cases a ceil(units / part) counter gets wrong"


def _naive(text: str, encoding: str) -> int:
    if encoding == "GSM-7":
        units = sum(2 if ch in "\f^{}\\[]~|€" else 1 for ch in text)
        return 1 if units <= 160 else -(-units // 153)
    units = len(text.encode("utf-16-le")) // 2
    return 1 if units <= 70 else -(-units // 67)


def test_recipient_ids_follow_their_message() -> None:
    from storage.pg.recipients import recipient_id

    message = uuid7()
    ids = [recipient_id(message, n) for n in (1, 2, 255, 256, 70_000)]
    assert ids == sorted(ids)
    assert all(i.bytes[:10] == message.bytes[:10] for i in ids)
    assert str(ids[0]).replace("-", "") == message.hex[:20] + "000000000001"
