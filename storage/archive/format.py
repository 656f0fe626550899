"""Archive files: one church's month of one table, NDJSON compressed with zstd.

Chosen over Parquet by bench/archive_format.py (bench/README.md "Archive format"):
about as small (27 bytes a row for a 2,000-member church's month, Parquet 27; 36
against 32 for a 10,000-member one), read back into typed rows 4-5x faster
(msgspec decodes uuids and timestamps itself; pyarrow's ``to_pylist`` is most of
Parquet's time), one message's recipients found 3-5x faster through the frame
index below, and a 0.5 MB binding instead of pyarrow's 55 MB wheel (165 MB
installed). In five years it needs nothing of ours: Python 3.14's standard library
has ``compression.zstd`` (backports.zstd is its backport), and ``zstdcat | jq``
reads it anywhere.

A file is a stream of zstd frames whose content is NDJSON:

- line 1, alone in the first frame, the header: ``format``, ``table``,
  ``schema_version``, ``columns`` ([name, kind, nullable], in the table's order),
  ``key`` (the indexed column), ``rows``, and ``frames``: for each later frame its
  first key, compressed length and rows;
- then one JSON object per row, sorted by the table's key (schema.SORT_KEYS), at
  most ``FRAME_ROWS`` rows to a frame.

Any zstd tool decompresses the frames as one stream (``zstdcat f | tail -n +2 | jq``
needs nothing of this code), and a reader looking for one message's recipients or
one conversation's messages decompresses only the frames the index points to.
Values are JSON: uuids as their canonical text, timestamps as RFC 3339 with their
offset, jsonb as itself. Rows are objects rather than arrays so each value carries
its column's name; zstd makes the repeated names nearly free.
"""

from __future__ import annotations

import hashlib
import sys
import uuid
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

import msgspec

from storage.archive.schema import (
    COLUMNS,
    ROW_TYPES,
    SCHEMA_VERSION,
    SORT_KEYS,
    TABLES,
    ArchivedRow,
    Table,
)

if sys.version_info >= (3, 14):
    from compression import zstd as zstd
else:
    from backports import zstd as zstd  # re-exported: tests and the bench build files

FORMAT: Final = "koinonia-archive"
FRAME_ROWS: Final = 8000
"""Rows per frame. A lookup by key decompresses and scans one or two frames, so this
bounds its cost whatever the church's size; but each frame is compressed alone, and
a month's broadcasts repeat the same members' ids, so small frames lose most of
that. At level 9, a 2,000-member church's recipients took 32 bytes a row in frames
of 1,000 rows, 22 in 8,000, 19.5 in one frame; one broadcast's recipients 13, 20 and
68 ms of CPU to read (bench/README.md "Archive format")."""
LEVEL: Final = 9
"""zstd level: a file is written once and read for years; 9 costs twice the CPU of 3
to write, reads as fast, and is 10 % smaller (19 is 30x slower to write)."""


class ArchiveError(Exception):
    """The bytes are not a readable archive file of the expected kind."""


class UnsupportedSchema(ArchiveError):
    """The file was written by a newer schema version than this code reads."""


class VerificationFailed(ArchiveError):
    """The file's checksum or row count is not the one the index recorded."""


class Frame(msgspec.Struct, frozen=True, array_like=True):
    first_key: str
    size: int
    """Compressed bytes."""
    rows: int


class Header(msgspec.Struct, frozen=True):
    format: str
    table: Table
    schema_version: int
    columns: list[Any]
    """[name, kind, nullable] (schema.Column) as written; not typed on reading, so a
    column of a kind this code does not know, added later, does not make the file
    unreadable (its rows' values of it are ignored)."""
    key: str
    rows: int
    frames: list[Frame]


class _Version(msgspec.Struct):
    """The fields read before anything else, so a newer header whose other fields
    changed is still refused for its version rather than as malformed."""

    format: str
    schema_version: int
    table: str


class ArchiveFile(msgspec.Struct, frozen=True):
    data: bytes
    sha256: str
    """Hex SHA-256 of ``data``: what the index records and ``verify`` checks."""
    rows: int


def write_month(
    rows: Iterable[Mapping[str, Any] | ArchivedRow],
    table: Table,
    schema_version: int = SCHEMA_VERSION,
) -> ArchiveFile:
    """One church's month of ``table`` as an archive file.

    Every row must have exactly the table's columns (schema.COLUMNS) with values of
    their types (``ValueError`` otherwise: a column this code does not know would be
    lost, a value of the wrong type unreadable later). Rows are sorted here, so the
    caller's order does not matter. Only the current schema version can be written;
    the argument makes the caller state the version it records in the index.
    """
    if schema_version != SCHEMA_VERSION:
        raise ValueError(f"only schema version {SCHEMA_VERSION} can be written")
    row_type = ROW_TYPES[table]
    names = frozenset(c.name for c in COLUMNS[table])
    typed: list[ArchivedRow] = []
    for row in rows:
        if isinstance(row, msgspec.Struct):
            if not isinstance(row, row_type):
                raise ValueError(f"a {type(row).__name__} is not a {table} row")
            typed.append(row)
            continue
        if row.keys() != names:
            extra, missing = sorted(row.keys() - names), sorted(names - row.keys())
            raise ValueError(f"{table} row: unknown columns {extra}, missing {missing}")
        try:
            typed.append(msgspec.convert(row, row_type))
        except msgspec.ValidationError as e:
            raise ValueError(f"{table} row: {e}") from None
    keys = SORT_KEYS[table]
    typed.sort(key=lambda r: tuple(getattr(r, k) for k in keys))

    encoder = msgspec.json.Encoder()
    index_key = keys[0]
    frames: list[Frame] = []
    chunks: list[bytes] = []
    for start in range(0, len(typed), FRAME_ROWS):
        part = typed[start : start + FRAME_ROWS]
        buf = bytearray()
        for r in part:
            encoder.encode_into(r, buf, -1)
            buf += b"\n"
        chunk = zstd.compress(bytes(buf), LEVEL)
        chunks.append(chunk)
        frames.append(Frame(str(getattr(part[0], index_key)), len(chunk), len(part)))
    header = Header(
        format=FORMAT,
        table=table,
        schema_version=schema_version,
        columns=list(COLUMNS[table]),
        key=index_key,
        rows=len(typed),
        frames=frames,
    )
    data = b"".join([zstd.compress(encoder.encode(header) + b"\n", LEVEL), *chunks])
    return ArchiveFile(data=data, sha256=hashlib.sha256(data).hexdigest(), rows=len(typed))


def read_header(data: bytes, table: Table | None = None) -> tuple[Header, int]:
    """The file's header and the offset of its first row frame. ``UnsupportedSchema``
    for a newer schema version; ``ArchiveError`` for anything else unreadable or
    another table's file."""
    d = zstd.ZstdDecompressor()
    try:
        line = d.decompress(data)
    except zstd.ZstdError as e:
        raise ArchiveError(f"not a zstd stream: {e}") from None
    if not d.eof or not line.endswith(b"\n"):
        raise ArchiveError("truncated archive header")
    try:
        version = msgspec.json.decode(line, type=_Version)
    except msgspec.DecodeError as e:
        raise ArchiveError(f"not an archive header: {e}") from None
    if version.format != FORMAT:
        raise ArchiveError(f"not a {FORMAT} file: {version.format!r}")
    if version.schema_version > SCHEMA_VERSION:
        raise UnsupportedSchema(
            f"archive file of schema version {version.schema_version}; this version of "
            f"koinonia reads up to {SCHEMA_VERSION}: upgrade koinonia to read it"
        )
    if table is not None and version.table != table:
        raise ArchiveError(f"a {version.table} file, not {table}")
    if version.table not in TABLES:
        raise ArchiveError(f"unknown table {version.table!r}")
    try:
        header = msgspec.json.decode(line, type=Header)
    except msgspec.DecodeError as e:
        raise ArchiveError(f"malformed archive header: {e}") from None
    start = len(data) - len(d.unused_data)
    if sum(f.size for f in header.frames) != len(data) - start:
        raise ArchiveError("the frames the header lists do not fill the file")
    if sum(f.rows for f in header.frames) != header.rows:
        raise ArchiveError("the frames' rows do not add up to the header's")
    return header, start


def _decode(table: Table, raw: bytes) -> list[ArchivedRow]:
    try:
        return msgspec.json.Decoder(ROW_TYPES[table]).decode_lines(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ArchiveError(f"{table} rows unreadable: {e}") from None


def _frames(data: bytes, table: Table, start: int, frames: Sequence[Frame]) -> bytes:
    if not frames:
        return b""
    try:
        return zstd.decompress(data[start : start + sum(f.size for f in frames)])
    except zstd.ZstdError as e:
        raise ArchiveError(f"{table} frames unreadable: {e}") from None


def read_month(data: bytes, table: Table) -> list[ArchivedRow]:
    """Every row of the file, in the table's key order, as ``schema.ROW_TYPES[table]``."""
    header, start = read_header(data, table)
    rows = _decode(table, _frames(data, table, start, header.frames))
    if len(rows) != header.rows:
        raise ArchiveError(f"{len(rows)} rows, the header says {header.rows}")
    return rows


def read_key(data: bytes, table: Table, key: uuid.UUID) -> list[ArchivedRow]:
    """The rows whose indexed column (``message_id`` of recipients, ``conversation_id``
    of conversation messages, ``id`` of messages) is ``key``, in key order, decoding
    only the frames that can hold it."""
    header, start = read_header(data, table)
    text = str(key)
    # Canonical uuid text sorts as the uuids do, so the first keys bound each frame:
    # a key equal to a frame's first key may have begun in the frame before.
    firsts = [f.first_key for f in header.frames]
    lo, hi = max(bisect_left(firsts, text) - 1, 0), bisect_right(firsts, text)
    if lo >= hi:
        return []
    offset = start + sum(f.size for f in header.frames[:lo])
    raw = _frames(data, table, offset, header.frames[lo:hi])
    # Only lines naming the key are decoded: a frame is mostly other keys' rows.
    needle = b'"' + header.key.encode() + b'":"' + text.encode() + b'"'
    lines = b"\n".join(line for line in raw.split(b"\n") if needle in line)
    return [r for r in _decode(table, lines) if getattr(r, header.key) == key]


def verify(data: bytes, expected_sha256: str, expected_rows: int) -> Header:
    """Check a file read back from the object store against what the index recorded:
    its SHA-256, then every row decoded to its type and counted. Raises
    ``VerificationFailed`` (or ``ArchiveError``/``UnsupportedSchema`` for a file that
    does not read); returns the header."""
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected_sha256.lower():
        raise VerificationFailed(f"checksum {actual}, the index has {expected_sha256}")
    header, _ = read_header(data)
    rows = len(read_month(data, header.table))
    if rows != expected_rows:
        raise VerificationFailed(f"{rows} rows, the index has {expected_rows}")
    return header
