"""Archive files (storage/archive/format.py): every column type round-trips, lookups
by key find exactly their rows across frames, files of other versions and other
writers read as the format promises, and a wrong file is refused."""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec
import pytest

from storage.archive import format as archive
from storage.archive.format import (
    ArchiveError,
    UnsupportedSchema,
    VerificationFailed,
    read_header,
    read_key,
    read_month,
    verify,
    write_month,
    zstd,
)
from storage.archive.schema import COLUMNS, SCHEMA_VERSION, TABLES, Table
from storage.domain.ids import uuid7

CHURCH = uuid.UUID("0190f1c2-0000-7000-8000-000000000001")
T0 = datetime(2024, 3, 14, 15, 9, 26, 535897, tzinfo=UTC)
PLUS2 = timezone(timedelta(hours=2))
WEIRD = 'quote " backslash \\ newline \n tab \t emoji 🙏 "id":"x" é'


def message(n: int, **over: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "church_id": CHURCH,
        "id": uuid7(1_710_000_000_000 + n),
        "created_at": T0 + timedelta(seconds=n),
        "body": f"Service at 10am #{n}",
        "target": {"all": True},
        "status": "completed",
        "recipient_count": 2,
        "segments": 1,
        "encoding": "GSM-7",
        "from_number": "+15550001234",
        "send_at": None,
        "created_by": None,
        "materialized_at": None,
        "completed_at": None,
        "template_id": None,
        "recurring_id": None,
        "canceled_at": None,
        "kind": "broadcast",
        "conversation_id": None,
        "consent_exempt": False,
        "traceparent": None,
        "media_ids": None,
    }
    row.update(over)
    return row


def recipient(message_id: uuid.UUID, n: int, **over: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "church_id": CHURCH,
        "message_id": message_id,
        "id": uuid.UUID(bytes=message_id.bytes[:10] + n.to_bytes(6, "big")),
        "created_at": T0,
        "member_id": uuid.uuid4(),
        "status": "delivered",
        "provider_message_id": f"sim-{n}",
        "error_code": None,
        "attempts": 1,
        "segments": 1,
        "updated_at": T0 + timedelta(seconds=3),
        "not_before": None,
    }
    row.update(over)
    return row


def thread_message(conversation_id: uuid.UUID, n: int, **over: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "church_id": CHURCH,
        "id": uuid7(1_710_000_000_000 + n),
        "created_at": T0 + timedelta(minutes=n),
        "conversation_id": conversation_id,
        "direction": "inbound",
        "body": "Is there childcare on Sunday?",
        "media": [],
        "status": "received",
        "provider_message_id": None,
        "sent_by": None,
        "author_id": None,
    }
    row.update(over)
    return row


def as_dict(row: msgspec.Struct) -> dict[str, Any]:
    return msgspec.structs.asdict(row)


def file_of(header: dict[str, Any], lines: list[bytes]) -> bytes:
    """A file laid out as the format describes, from a header and row lines given
    here: what another writer (a newer koinonia, another tool) would produce."""
    body = zstd.compress(b"".join(line + b"\n" for line in lines))
    header = {
        **header,
        "rows": len(lines),
        "frames": [[header["frames"][0][0], len(body), len(lines)]],
    }
    return zstd.compress(json.dumps(header).encode() + b"\n") + body


def decoded(data: bytes) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Header and rows as plain JSON, read with nothing but a zstd decompressor."""
    lines = zstd.decompress(data).splitlines()
    return json.loads(lines[0]), [json.loads(line) for line in lines[1:]]


# -- round trips ------------------------------------------------------------------------


def test_every_column_type_round_trips_with_and_without_nulls() -> None:
    conversation = uuid7(1_700_000_000_000)
    full = message(
        1,
        created_at=datetime(2024, 3, 14, 17, 9, 26, 535897, tzinfo=PLUS2),
        body=WEIRD,
        target={"group_ids": [str(uuid.uuid4())], "nested": {"n": 1.5, "none": None}, "ü": []},
        send_at=T0 - timedelta(days=1),
        created_by=uuid.uuid4(),
        materialized_at=T0,
        completed_at=T0 + timedelta(microseconds=1),
        template_id=uuid.uuid4(),
        recurring_id=uuid.uuid4(),
        canceled_at=T0,
        kind="reply",
        conversation_id=conversation,
        consent_exempt=True,
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        recipient_count=2_147_483_647,
        media_ids=[uuid.uuid4(), uuid.uuid4()],
    )
    sparse = message(2, target=[], recipient_count=0)
    m_id = full["id"]
    recipients = [
        recipient(m_id, 1, not_before=T0 + timedelta(hours=9), error_code="40001", attempts=32767),
        recipient(m_id, 2, provider_message_id=None, status="failed"),
    ]
    thread = [
        thread_message(conversation, 1, media=[{"url": "s3://x/y.jpg", "type": "image/jpeg"}]),
        thread_message(conversation, 2, body=WEIRD, sent_by=uuid.uuid4(), direction="outbound"),
    ]
    for table, rows in (
        ("message", [full, sparse]),
        ("message_recipient", recipients),
        ("conversation_message", thread),
    ):
        written = write_month(reversed(rows), table)  # type: ignore[arg-type]
        assert written.rows == len(rows)
        assert written.sha256 == hashlib.sha256(written.data).hexdigest()
        got = read_month(written.data, table)  # type: ignore[arg-type]
        assert [as_dict(r) for r in got] == rows, table
        for r in got:
            # An instant with its zone, never a naive time that a reader would guess at.
            assert all(
                getattr(r, c.name).utcoffset() is not None
                for c in COLUMNS[table]  # type: ignore[index]
                if c.kind == "timestamptz" and getattr(r, c.name) is not None
            )
    again = read_month(write_month([full], "message").data, "message")[0]
    assert again.created_at.utcoffset() == timedelta(hours=2)
    assert again.target == full["target"]  # type: ignore[union-attr]


def test_structs_read_back_write_the_same_bytes() -> None:
    rows = [recipient(uuid7(1_710_000_000_000), n) for n in range(1, 50)]
    first = write_month(rows, "message_recipient")
    second = write_month(read_month(first.data, "message_recipient"), "message_recipient")
    assert second.data == first.data
    assert second.sha256 == first.sha256


def test_an_empty_month_is_a_valid_file() -> None:
    written = write_month([], "conversation_message")
    assert written.rows == 0
    assert read_month(written.data, "conversation_message") == []
    assert verify(written.data, written.sha256, 0).rows == 0


def test_any_zstd_reader_sees_a_header_and_one_json_object_per_row() -> None:
    m_id = uuid7(1_710_000_000_000)
    written = write_month([recipient(m_id, 2), recipient(m_id, 1)], "message_recipient")
    header, rows = decoded(written.data)
    assert header["format"] == "koinonia-archive"
    assert header["table"] == "message_recipient"
    assert header["schema_version"] == SCHEMA_VERSION
    assert [c[0] for c in header["columns"]] == [c.name for c in COLUMNS["message_recipient"]]
    assert ["updated_at", "timestamptz", False] in header["columns"]
    # Sorted by the key the index is on, then the recipient id pages are ordered by.
    assert [r["id"] for r in rows] == [str(recipient(m_id, n)["id"]) for n in (1, 2)]
    assert rows[0]["created_at"] == "2024-03-14T15:09:26.535897Z"


# -- lookups by key ------------------------------------------------------------------------


@pytest.mark.parametrize("frame_rows", [3, 7, 8000])
def test_read_key_finds_exactly_a_keys_rows_across_frames(
    monkeypatch: pytest.MonkeyPatch, frame_rows: int
) -> None:
    monkeypatch.setattr(archive, "FRAME_ROWS", frame_rows)
    messages = sorted(uuid7(1_710_000_000_000 + n * 1000) for n in range(6))
    sizes = [1, 9, 2, 14, 3, 1]
    rows = [
        recipient(m, n) for m, size in zip(messages, sizes, strict=True) for n in range(1, size + 1)
    ]
    written = write_month(rows, "message_recipient")
    header, _ = read_header(written.data)
    assert len(header.frames) == -(-len(rows) // frame_rows)
    for m, size in zip(messages, sizes, strict=True):
        got = read_key(written.data, "message_recipient", m)
        assert [r.id for r in got] == [recipient(m, n)["id"] for n in range(1, size + 1)]
    for missing in (uuid7(1_600_000_000_000), uuid7(1_800_000_000_000), uuid7(1_710_000_000_500)):
        assert read_key(written.data, "message_recipient", missing) == []


def test_read_key_of_conversations_and_messages() -> None:
    conversations = [uuid7(1_700_000_000_000 + n) for n in range(3)]
    rows = [
        thread_message(c, i * 10 + n, body=f"{i}/{n}")
        for i, c in enumerate(conversations)
        for n in range(4)
    ]
    written = write_month(rows[::-1], "conversation_message")
    got = read_key(written.data, "conversation_message", conversations[1])
    assert [r.body for r in got] == ["1/0", "1/1", "1/2", "1/3"]  # type: ignore[union-attr]
    # A body quoting another key's text is not that key's row.
    m = message(5, body=f'"id":"{rows[0]["id"]}"')
    found = read_key(write_month([m], "message").data, "message", m["id"])
    assert [as_dict(r) for r in found] == [m]
    assert read_key(write_month([m], "message").data, "message", rows[0]["id"]) == []


# -- other writers and versions --------------------------------------------------------------


def _header(table: Table) -> dict[str, Any]:
    return {
        "format": "koinonia-archive",
        "table": table,
        "schema_version": SCHEMA_VERSION,
        "columns": [[c.name, c.kind, c.nullable] for c in COLUMNS[table]],
        "key": "message_id",
        "frames": [["", 0, 0]],
    }


def test_a_file_with_columns_this_reader_does_not_know_still_reads() -> None:
    row = recipient(uuid7(1_710_000_000_000), 1)
    line = msgspec.json.encode({**row, "carrier": "T-Mobile", "cost": {"usd": 0.0079}})
    header = {
        **_header("message_recipient"),
        "columns": [*_header("message_recipient")["columns"], ["carrier", "money", True]],
        "compression_dictionary": None,
    }
    data = file_of(header, [line])
    assert [as_dict(r) for r in read_month(data, "message_recipient")] == [row]
    assert len(read_key(data, "message_recipient", row["message_id"])) == 1


def test_a_file_written_before_a_nullable_column_was_added_reads_it_as_null() -> None:
    row = recipient(uuid7(1_710_000_000_000), 1)
    older = {k: v for k, v in row.items() if k != "not_before"}
    data = file_of(_header("message_recipient"), [msgspec.json.encode(older)])
    assert [as_dict(r) for r in read_month(data, "message_recipient")] == [row]


def test_a_future_schema_version_is_refused_clearly() -> None:
    # A newer version may change anything else in its header, and its rows.
    header = {
        "format": "koinonia-archive",
        "table": "message_recipient",
        "schema_version": SCHEMA_VERSION + 1,
        "columns": {"renamed": "differently"},
        "frames": "elsewhere",
    }
    data = zstd.compress(json.dumps(header).encode() + b"\n") + zstd.compress(b"[1, 2]\n")
    with pytest.raises(UnsupportedSchema, match=f"schema version {SCHEMA_VERSION + 1}.*upgrade"):
        read_month(data, "message_recipient")
    with pytest.raises(UnsupportedSchema):
        verify(data, hashlib.sha256(data).hexdigest(), 1)
    with pytest.raises(ValueError, match="schema version"):
        write_month([], "message", schema_version=SCHEMA_VERSION + 1)


# -- verification and refusals ---------------------------------------------------------------


def test_verify_accepts_the_right_checksum_and_count_and_refuses_others() -> None:
    m_id = uuid7(1_710_000_000_000)
    written = write_month([recipient(m_id, n) for n in range(1, 11)], "message_recipient")
    header = verify(written.data, written.sha256.upper(), 10)
    assert (header.table, header.rows) == ("message_recipient", 10)
    with pytest.raises(VerificationFailed, match="checksum"):
        verify(written.data, hashlib.sha256(b"other").hexdigest(), 10)
    with pytest.raises(VerificationFailed, match="10 rows, the index has 9"):
        verify(written.data, written.sha256, 9)
    flipped = bytearray(written.data)
    flipped[-5] ^= 0x40
    with pytest.raises(VerificationFailed, match="checksum"):
        verify(bytes(flipped), written.sha256, 10)
    # Damage that matches its own checksum (a bad copy recorded as is) still fails
    # the read-back: the archiver never drops a partition on it.
    for bad in (bytes(flipped), written.data[:-7], written.data + b"\0"):
        with pytest.raises(ArchiveError):
            verify(bad, hashlib.sha256(bad).hexdigest(), 10)


def test_a_row_count_that_disagrees_with_the_header_is_refused() -> None:
    row = msgspec.json.encode(recipient(uuid7(1_710_000_000_000), 1))
    data = file_of(_header("message_recipient"), [row, row])
    header = json.loads(zstd.decompress(data).splitlines()[0])
    header["rows"] = 3
    header["frames"][0][2] = 3
    lying = (
        zstd.compress(json.dumps(header).encode() + b"\n")
        + data[len(data) - header["frames"][0][1] :]
    )
    with pytest.raises(ArchiveError, match="2 rows, the header says 3"):
        read_month(lying, "message_recipient")


def test_unreadable_or_mismatched_files_are_refused() -> None:
    written = write_month([message(1)], "message")
    with pytest.raises(ArchiveError, match="a message file, not message_recipient"):
        read_month(written.data, "message_recipient")
    with pytest.raises(ArchiveError, match="zstd"):
        read_month(b"PAR1 not an archive", "message")
    with pytest.raises(ArchiveError, match="not a koinonia-archive file"):
        read_month(file_of({**_header("message"), "format": "parquet"}, []), "message")
    bad_row = file_of(_header("message_recipient"), [b'{"id": "not a uuid"}'])
    with pytest.raises(ArchiveError, match="rows unreadable"):
        read_month(bad_row, "message_recipient")


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"shoe_size": 42}, r"unknown columns \['shoe_size'\]"),
        ({"created_at": T0.replace(tzinfo=None)}, "created_at"),
        ({"id": "0190f1c2-0000-7000-8000-000000000001x"}, r"\$\.id"),
        ({"status": None}, "status"),
        ({"attempts": "1"}, "attempts"),
    ],
)
def test_rows_that_would_not_read_back_are_refused_when_written(
    change: dict[str, Any], error: str
) -> None:
    row = {**recipient(uuid7(1_710_000_000_000), 1), **change}
    with pytest.raises(ValueError, match=error):
        write_month([row], "message_recipient")


def test_a_missing_column_or_another_tables_struct_is_refused() -> None:
    row = recipient(uuid7(1_710_000_000_000), 1)
    del row["not_before"]
    with pytest.raises(ValueError, match=r"missing \['not_before'\]"):
        write_month([row], "message_recipient")
    struct = read_month(write_month([message(1)], "message").data, "message")[0]
    with pytest.raises(ValueError, match="not a message_recipient row"):
        write_month([struct], "message_recipient")


def test_every_table_has_a_frame_index_on_its_first_sort_column() -> None:
    for table in TABLES:
        header, _ = read_header(write_month([], table).data, table)
        assert header.key == {"message": "id", "message_recipient": "message_id"}.get(
            table, "conversation_id"
        )
