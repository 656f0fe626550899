"""CSV member imports, streamed: bytes in, members upserted in batches, a summary out.

The same ``MemberImporter`` serves ``POST /v1/members/import`` and
``koinonia import-members``. It never holds the file: ``CsvRecords`` turns
chunks into complete records (a quoted field may span lines and chunks), and
every ``BATCH_ROWS`` valid rows are written in one transaction.

The file's first record is the header; columns are matched by name
(case-insensitive): ``phone`` (required), ``first_name``, ``last_name``,
``email``, ``groups`` (names separated by ``;``, created when missing),
``branch`` (an existing branch's name) and ``opted_in`` (true/false, yes/no,
1/0). Rows are numbered as a spreadsheet shows them: the header is row 1.

Rows upsert by phone (its lookup hash). A new member needs a first name; an
existing one gets the names, email and branch the row gives (blank cells
change nothing) and joins the row's groups (never leaves any). ``opted_in``
sets a new member's consent (default: opted in, source ``import``); for an
existing member ``false`` opts them out, while ``true`` never re-subscribes
someone who opted out: that consent comes from the member (START) or staff.
"""

from __future__ import annotations

import codecs
import csv
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import anyio.to_thread
import msgspec

from storage.domain.errors import InvalidInput, InvalidPhone
from storage.domain.events import (
    MemberChanged,
    MemberCreatedEvent,
    MemberEvent,
    MemberOptChanged,
    MemberOptedOutEvent,
    MemberUpdatedEvent,
)
from storage.domain.ids import uuid7
from storage.domain.phones import PhoneVault, normalize
from storage.pg.branches import branch_ids_by_name
from storage.pg.database import Conn, Pool
from storage.pg.event_log import append
from storage.pg.groups import CACHE_TOPIC, add_memberships, group_ids_for_names
from storage.redis.cache import Cache

IMPORT_PATH = "/v1/members/import"
MAX_IMPORT_BYTES = 50 * 1024 * 1024
"""Import bodies may be this large (the global request body limit is far smaller)."""
BATCH_ROWS = 500
MAX_ERRORS = 100
MAX_RECORD_CHARS = 64 * 1024
MAX_NAME = 200
MAX_GROUPS_PER_ROW = 100

COLUMNS = ("first_name", "last_name", "phone", "email", "groups", "branch", "opted_in")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+$")
_TRUE = frozenset({"true", "yes", "y", "1"})
_FALSE = frozenset({"false", "no", "n", "0"})


class RowError(msgspec.Struct, frozen=True):
    row: int
    field: str
    message: str


class ImportSummary(msgspec.Struct, frozen=True):
    processed: int
    """Data rows read (blank lines not counted): created + updated + failed."""
    created: int
    updated: int
    failed: int
    errors: list[RowError]
    """The first 100 problems, by row."""


class CsvRecords:
    """Sans-I/O CSV framing: feed bytes, get back the records completed so far.

    A newline ends a record only outside quotes (an even count of ``"`` since the
    record began; RFC 4180 escapes a quote by doubling it, which keeps the count
    even). Invalid UTF-8 becomes U+FFFD, which row validation rejects.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8-sig")(errors="replace")
        self._pending: list[str] = []
        self._pending_chars = 0
        self._quotes = 0
        self.delimiter = ","
        self._first = True

    def feed(self, data: bytes) -> list[list[str]]:
        return self._parse(self._split(self._decoder.decode(data)))

    def close(self) -> list[list[str]]:
        lines = self._split(self._decoder.decode(b"", final=True))
        if self._pending:
            lines.append("".join(self._pending))
            self._pending, self._pending_chars = [], 0
        return self._parse(lines)

    @property
    def overlong(self) -> bool:
        """An unfinished record longer than any real row (an unclosed quote?)."""
        return self._pending_chars > MAX_RECORD_CHARS

    def _split(self, text: str) -> list[str]:
        complete: list[str] = []
        pos = 0
        while (nl := text.find("\n", pos)) >= 0:
            self._quotes += text.count('"', pos, nl)
            piece = text[pos : nl + 1]
            if self._quotes % 2 == 0:
                if self._pending:
                    piece = "".join(self._pending) + piece
                    self._pending, self._pending_chars = [], 0
                complete.append(piece)
                self._quotes = 0
            else:
                self._pending.append(piece)
                self._pending_chars += len(piece)
            pos = nl + 1
        if pos < len(text):
            rest = text[pos:]
            self._quotes += rest.count('"')
            self._pending.append(rest)
            self._pending_chars += len(rest)
        return complete

    def _parse(self, lines: list[str]) -> list[list[str]]:
        if not lines:
            return []
        if self._first:
            self._first = False
            header = lines[0]
            if "," not in header:
                self.delimiter = next((d for d in ("\t", ";") if d in header), ",")
        return list(csv.reader(lines, delimiter=self.delimiter))


class _Row(msgspec.Struct):
    number: int
    first_name: str | None
    last_name: str | None
    email: str | None
    phone_hash: bytes
    phone_cipher: bytes
    groups: list[str]
    branch: str | None
    opted_in: bool | None


def _parse_header(record: list[str]) -> dict[str, int]:
    columns: dict[str, int] = {}
    for i, raw in enumerate(record):
        name = raw.strip().lower().replace(" ", "_").replace("-", "_")
        if not name:
            continue
        if name not in COLUMNS:
            raise InvalidInput(
                "header", f"unknown column {raw.strip()!r}; known: {', '.join(COLUMNS)}"
            )
        if name in columns:
            raise InvalidInput("header", f"column {name!r} appears twice")
        columns[name] = i
    if "phone" not in columns:
        raise InvalidInput("header", "the first row must name the columns, phone among them")
    return columns


def _validate(
    number: int,
    record: list[str],
    columns: dict[str, int],
    vault: PhoneVault,
    church_id: uuid.UUID,
    country: str,
) -> _Row | list[RowError]:
    """One data row, checked, with its phone normalised, hashed and encrypted."""
    problems: list[RowError] = []

    def cell(name: str) -> str:
        i = columns.get(name)
        return record[i].strip() if i is not None and i < len(record) else ""

    def fail(field: str, message: str) -> None:
        problems.append(RowError(number, field, message))

    if len(record) > len(columns) and any(v.strip() for v in record[len(columns) :]):
        fail("row", f"has {len(record)} values but the header names {len(columns)} columns")
    for name in columns:
        if "\ufffd" in cell(name):
            fail(name, "is not valid UTF-8 text")
        elif "\x00" in cell(name):
            fail(name, "must not contain NUL characters")
    phone = ""
    raw_phone = cell("phone")
    if not raw_phone:
        fail("phone", "is required")
    else:
        try:
            phone = normalize(raw_phone, country)
        except InvalidPhone:
            fail("phone", "must be a valid phone number")
    for name in ("first_name", "last_name"):
        if len(cell(name)) > MAX_NAME:
            fail(name, f"must be at most {MAX_NAME} characters")
    email = cell("email")
    if email and (len(email) > 320 or not _EMAIL.match(email)):
        fail("email", "must be an email address")
    groups = [g.strip() for g in cell("groups").split(";") if g.strip()]
    if any(len(g) > MAX_NAME for g in groups):
        fail("groups", f"group names must be at most {MAX_NAME} characters")
    if len(groups) > MAX_GROUPS_PER_ROW:
        fail("groups", f"at most {MAX_GROUPS_PER_ROW} groups per row")
    opted_in: bool | None = None
    flag = cell("opted_in").lower()
    if flag in _TRUE:
        opted_in = True
    elif flag in _FALSE:
        opted_in = False
    elif flag:
        fail("opted_in", "must be true or false (yes/no, 1/0)")
    if problems:
        return problems
    return _Row(
        number=number,
        first_name=cell("first_name") or None,
        last_name=cell("last_name") or None,
        email=email or None,
        phone_hash=vault.lookup_hash(phone),
        phone_cipher=vault.encrypt(church_id, phone),
        groups=groups,
        branch=cell("branch") or None,
        opted_in=opted_in,
    )


class MemberImporter:
    """Feed it the file's bytes in chunks, then ``finish()`` for the summary."""

    def __init__(
        self,
        pool: Pool,
        vault: PhoneVault,
        church_id: uuid.UUID,
        *,
        country: str,
        cache: Cache | None = None,
        batch_rows: int = BATCH_ROWS,
    ) -> None:
        self._pool = pool
        self._vault = vault
        self._church_id = church_id
        self._country = country
        self._cache = cache
        self._batch_rows = batch_rows
        self._records = CsvRecords()
        self._columns: dict[str, int] | None = None
        self._number = 0
        """The spreadsheet row number of the last record read (the header is 1)."""
        self._pending: list[tuple[int, list[str]]] = []
        self._stopped = False
        self._branches: dict[str, uuid.UUID] | None = None
        self._groups: dict[str, uuid.UUID] = {}
        self.processed = 0
        self.created = 0
        self.updated = 0
        self.failed = 0
        self.errors: list[RowError] = []

    async def feed(self, data: bytes) -> None:
        """Take the next chunk; writes every full batch it completes. Raises
        ``InvalidInput("header", ...)`` for a bad header, before writing anything."""
        if self._stopped:
            return
        await self._take(self._records.feed(data))
        if self._records.overlong:
            self._stopped = True
            await self._flush()
            self._error(
                RowError(
                    self._number + 1,
                    "row",
                    f"is longer than {MAX_RECORD_CHARS} characters (an unclosed quote?); "
                    "the file was not read further",
                )
            )
            self.failed += 1
            self.processed += 1

    async def finish(self) -> ImportSummary:
        if not self._stopped:
            await self._take(self._records.close())
            await self._flush()
        if self._columns is None and not self._stopped:
            raise InvalidInput("header", "the file is empty; its first row must name the columns")
        return ImportSummary(
            processed=self.processed,
            created=self.created,
            updated=self.updated,
            failed=self.failed,
            errors=self.errors,
        )

    async def _take(self, records: list[list[str]]) -> None:
        for record in records:
            self._number += 1
            if not any(v.strip() for v in record):
                continue
            if self._columns is None:
                self._columns = _parse_header(record)
                continue
            self.processed += 1
            self._pending.append((self._number, record))
            if len(self._pending) >= self._batch_rows:
                await self._flush()

    def _error(self, error: RowError) -> None:
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(error)

    def _reject(self, problems: list[RowError]) -> None:
        self.failed += 1
        for p in problems:
            self._error(p)

    async def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if not pending or self._columns is None:
            return
        columns = self._columns
        checked = await anyio.to_thread.run_sync(self._validate_all, pending, columns)
        rows: list[_Row] = []
        for result in checked:
            if isinstance(result, _Row):
                rows.append(result)
            else:
                self._reject(result)
        if not rows:
            return
        async with self._pool.connection() as conn:
            if self._branches is None:
                self._branches = await branch_ids_by_name(conn, self._church_id)
            rows = self._with_known_branches(rows)
            new_groups: dict[str, uuid.UUID] = {}
            async with conn.transaction():
                missing = [g for r in rows for g in r.groups if g.lower() not in self._groups]
                if missing:
                    new_groups = await group_ids_for_names(conn, self._church_id, missing)
                groups = {**self._groups, **new_groups}
                created = updated = 0
                for part in _unique_phones(rows):
                    made, changed = await self._write(conn, part, groups)
                    created += made
                    updated += changed
            self._groups.update(new_groups)
        self.created += created
        self.updated += updated
        if self._cache is not None:
            await self._cache.invalidate(self._church_id, CACHE_TOPIC)

    def _validate_all(
        self, pending: list[tuple[int, list[str]]], columns: dict[str, int]
    ) -> list[_Row | list[RowError]]:
        return [
            _validate(n, rec, columns, self._vault, self._church_id, self._country)
            for n, rec in pending
        ]

    def _with_known_branches(self, rows: list[_Row]) -> list[_Row]:
        assert self._branches is not None
        kept: list[_Row] = []
        for row in rows:
            if row.branch is not None and row.branch.lower() not in self._branches:
                self._reject([RowError(row.number, "branch", f"no branch named {row.branch!r}")])
            else:
                kept.append(row)
        return kept

    async def _write(
        self, conn: Conn, rows: list[_Row], groups: dict[str, uuid.UUID]
    ) -> tuple[int, int]:
        """Upsert rows whose phones are distinct; returns (created, updated)."""
        church_id = self._church_id
        assert self._branches is not None
        branches = self._branches
        existing = await _members_by_phone(conn, church_id, [r.phone_hash for r in rows])
        fresh: list[tuple[uuid.UUID, _Row]] = []
        for row in rows:
            if row.phone_hash not in existing:
                if row.first_name is None:
                    self._reject([RowError(row.number, "first_name", "is required")])
                else:
                    fresh.append((uuid7(), row))
        created: set[uuid.UUID] = set()
        if fresh:
            cur = await conn.execute(
                "INSERT INTO member (church_id, id, first_name, last_name, email, phone_cipher, "
                "phone_hash, branch_id, opted_in, opt_source) "
                "SELECT %s, u.id, u.first_name, u.last_name, u.email, u.cipher, u.hash, "
                "u.branch_id, u.opted_in, 'import' FROM unnest(%s::uuid[], %s::text[], "
                "%s::text[], %s::text[], %b::bytea[], %b::bytea[], %s::uuid[], %s::bool[]) "
                "AS u(id, first_name, last_name, email, cipher, hash, branch_id, opted_in) "
                "ON CONFLICT (church_id, phone_hash) WHERE deleted_at IS NULL DO NOTHING "
                "RETURNING id",
                (
                    church_id,
                    [i for i, _ in fresh],
                    [r.first_name for _, r in fresh],
                    [r.last_name or "" for _, r in fresh],
                    [r.email for _, r in fresh],
                    [r.phone_cipher for _, r in fresh],
                    [r.phone_hash for _, r in fresh],
                    [branches[r.branch.lower()] if r.branch else None for _, r in fresh],
                    [r.opted_in is not False for _, r in fresh],
                ),
            )
            created = {r[0] for r in await cur.fetchall()}
            if len(created) < len(fresh):
                # Created meanwhile by someone else (the API, another import): update them.
                raced = [r for i, r in fresh if i not in created]
                existing.update(
                    await _members_by_phone(conn, church_id, [r.phone_hash for r in raced])
                )
        member_of: dict[int, uuid.UUID] = {r.number: i for i, r in fresh if i in created}
        stale = [r for r in rows if r.phone_hash in existing and r.number not in member_of]
        opted_out: list[uuid.UUID] = []
        if stale:
            ids = [existing[r.phone_hash][0] for r in stale]
            outs = [r.opted_in is False and existing[r.phone_hash][1] for r in stale]
            await conn.execute(
                "UPDATE member m SET first_name = coalesce(u.first_name, m.first_name), "
                "last_name = coalesce(u.last_name, m.last_name), "
                "email = coalesce(u.email, m.email), "
                "branch_id = coalesce(u.branch_id, m.branch_id), "
                "opted_in = m.opted_in AND NOT u.opt_out, "
                "opt_source = CASE WHEN u.opt_out THEN 'import' ELSE m.opt_source END, "
                "opt_changed_at = CASE WHEN u.opt_out THEN now() ELSE m.opt_changed_at END "
                "FROM unnest(%s::uuid[], %s::text[], %s::text[], %s::text[], %s::uuid[], "
                "%s::bool[]) AS u(id, first_name, last_name, email, branch_id, opt_out) "
                "WHERE m.church_id = %s AND m.id = u.id",
                (
                    ids,
                    [r.first_name for r in stale],
                    [r.last_name for r in stale],
                    [r.email for r in stale],
                    [branches[r.branch.lower()] if r.branch else None for r in stale],
                    outs,
                    church_id,
                ),
            )
            member_of.update({r.number: i for r, i in zip(stale, ids, strict=True)})
            opted_out = [i for i, out in zip(ids, outs, strict=True) if out]
        pairs = list(
            dict.fromkeys(
                (groups[g.lower()], member_of[r.number])
                for r in rows
                if r.number in member_of
                for g in r.groups
            )
        )
        await add_memberships(conn, church_id, pairs)
        events: list[MemberEvent] = [
            *(MemberCreatedEvent.new(MemberChanged(i)) for i in created),
            *(MemberUpdatedEvent.new(MemberChanged(member_of[r.number])) for r in stale),
            *(MemberOptedOutEvent.new(MemberOptChanged(i, "import")) for i in opted_out),
        ]
        await append(conn, [(church_id, (), e) for e in events])
        return len(created), len(stale)


async def _members_by_phone(
    conn: Conn, church_id: uuid.UUID, hashes: list[bytes]
) -> dict[bytes, tuple[uuid.UUID, bool]]:
    """(id, opted in) of the members with these phone hashes, locked for the update.
    One index lookup per hash (LATERAL): with ``= ANY(...)`` the planner, on the
    statistics of a table an import is filling, scans the church's every member
    per batch, which makes a large import quadratic."""
    cur = await conn.execute(
        "SELECT m.phone_hash, m.id, m.opted_in FROM unnest(%b::bytea[]) AS h(hash), "
        "LATERAL (SELECT phone_hash, id, opted_in FROM member WHERE church_id = %s "
        "AND phone_hash = h.hash AND deleted_at IS NULL FOR UPDATE) m",
        (hashes, church_id),
    )
    return {bytes(h): (i, o) for h, i, o in await cur.fetchall()}


def _unique_phones(rows: list[_Row]) -> list[list[_Row]]:
    """Consecutive runs of rows with distinct phones: a phone twice in one batch
    is written in order (the later row updates what the earlier one made)."""
    parts: list[list[_Row]] = [[]]
    seen: set[bytes] = set()
    for row in rows:
        if row.phone_hash in seen:
            parts.append([])
            seen = set()
        parts[-1].append(row)
        seen.add(row.phone_hash)
    return parts


FILE_CHUNK = 256 * 1024


class Progress(msgspec.Struct, frozen=True):
    rows: int
    bytes_read: int
    total_bytes: int
    elapsed_s: float


async def import_file(
    importer: MemberImporter,
    path: Path,
    *,
    on_progress: Callable[[Progress], None] | None = None,
    every_s: float = 1.0,
) -> ImportSummary:
    """Feed a file to ``importer`` chunk by chunk (never the whole file in memory),
    reporting progress about every ``every_s`` seconds and once at the end."""
    file_path = anyio.Path(path)
    total = (await file_path.stat()).st_size
    started = time.monotonic()
    done = 0

    def report() -> None:
        if on_progress is not None:
            on_progress(Progress(importer.processed, done, total, time.monotonic() - started))

    async def tick() -> None:
        while True:
            await anyio.sleep(every_s)
            report()

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(tick)
        async with await file_path.open("rb") as file:
            while chunk := await file.read(FILE_CHUNK):
                done += len(chunk)
                await importer.feed(chunk)
        summary = await importer.finish()
        tasks.cancel_scope.cancel()
    report()
    return summary
