"""``koinonia archive`` and the scheduler's daily run: whole months of the partitioned
tables moved to the object store (docs/operations.md "Archive").

Partitions hold every church's rows of one UTC month, so the archiver works month by
month, oldest first. For each month: for each church with rows, for each table, the
church's rows are read in the file's key order, written as one archive file
(storage/archive/format.py) under ``archive/<church>/<YYYY-MM>/<table>.<sha>.ndjson.zst``,
read back and verified, then indexed (``archive_file``); then, in one transaction,
each partition's row count per church is checked against what the files hold and the
three partitions are dropped, the month turning ``dropped`` (reads switch to the
archive as that commits). At the end of every run, files still holding text of erased
members are rewritten without it ("compaction").

Killed at any point and run again, nothing is lost and nothing is stored twice:

- an object is indexed only after it was read back and verified, so an object with
  no index row is a leftover; every church-month the archiver passes is cleaned of
  them (the key carries the file's checksum, so a rewrite never overwrites the file
  the index names);
- a church's file already indexed, whose row count still equals the partition's and
  whose object is there at its size, is not written again;
- partitions are dropped only in the transaction that checks their counts and marks
  the month dropped.

Two runs at once: a session advisory lock (``ARCHIVE_LOCK``); ``koinonia archive``
waits for it, the scheduler skips its turn.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, date, datetime
from typing import Any, Final, Literal

import msgspec
import psycopg
from psycopg import AsyncConnection

from storage.archive.format import (
    ArchiveError,
    read_month,
    verify,
    write_month,
)
from storage.archive.schema import (
    ROW_TYPES,
    SCHEMA_VERSION,
    TABLES,
    ArchivedConversationMessage,
    ArchivedMessage,
    ArchivedRow,
    Table,
)
from storage.objects import ObjectNotFound, ObjectStore
from storage.pg.archive_index import (
    IndexedFile,
    begin_month,
    church_files,
    clear_erasures,
    indexed_keys,
    mark_dropped,
    month_files,
    pending_erasures,
    record_file,
)
from storage.pg.archive_rows import (
    church_rows,
    drop_partitions,
    lock_month,
    partition_exists,
    partitioned_months,
    rows_per_church,
    take_archive_lock,
    unfinished_messages,
)
from storage.pg.database import Conn
from storage.pg.partitions import month_start

CONTENT_TYPE: Final = "application/zstd"
FETCH_ROWS: Final = 5000
"""Rows per fetch of the server-side cursor: a big church's month is 100k+ rows."""
DROP_LOCK_TIMEOUT_MS: Final = 300
"""How long the drop waits for the parents' lock before giving up and trying again:
live queries queue behind a waiting ACCESS EXCLUSIVE request, so it never waits long."""
DROP_ATTEMPTS: Final = 40

_PRIMARY: Final[dict[Table, tuple[str, ...]]] = {
    "message": ("id",),
    "message_recipient": ("message_id", "id"),
    "conversation_message": ("id",),
}


class ArchiveIntegrityError(ArchiveError):
    """A partition's rows are not the rows its files hold: nothing was dropped."""


class UnfinishedMonth(ArchiveError):
    """The month still holds messages not completed or canceled: nothing of it or of
    later months is archived (months go oldest first)."""


class ArchiveProgress(msgspec.Struct, frozen=True, kw_only=True):
    phase: Literal["file", "month", "compact"]
    """``file``: a file was written (or found already written); ``month``: the month's
    partitions were dropped; ``compact``: a file was rewritten without erased text."""
    month: str
    """``YYYY-MM``"""
    church: int
    """Which church of the month this is (1-based); the month's count at its end."""
    churches: int
    rows: int
    """Rows written by this run so far."""
    bytes: int
    elapsed_s: float

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.elapsed_s if self.elapsed_s > 0 else 0.0


class ArchiveReport(msgspec.Struct, frozen=True, kw_only=True):
    """What ``koinonia archive`` prints: months dropped by this run, and the files, rows
    and bytes it wrote (files found already written by a killed run are not counted)."""

    before: str
    months: list[str]
    files: int
    rows: int
    bytes: int
    compacted: int


def add_months(month: date, n: int) -> date:
    """The first of the month ``n`` months after (negative: before) ``month``'s."""
    index = month.year * 12 + month.month - 1 + n
    return date(index // 12, index % 12 + 1, 1)


def latest_before(today: date) -> date:
    """The latest ``before`` allowed: the previous month (the current and the previous
    month are never archived)."""
    return add_months(month_start(today), -1)


def object_key(church_id: uuid.UUID, month: date, table: Table, sha256: str) -> str:
    return f"{church_prefix(church_id, month)}{table}.{sha256[:16]}.ndjson.zst"


def church_prefix(church_id: uuid.UUID, month: date) -> str:
    return f"archive/{church_id}/{month:%Y-%m}/"


def erase(rows: Iterable[ArchivedRow], conversations: frozenset[uuid.UUID]) -> list[ArchivedRow]:
    """The rows with erased members' text blanked, as erase_member blanks it live:
    their conversations' texts (body, media) and the copies replies keep as messages."""
    out: list[ArchivedRow] = []
    for row in rows:
        if isinstance(row, ArchivedConversationMessage) and row.conversation_id in conversations:
            row = msgspec.structs.replace(row, body="", media=[])
        elif isinstance(row, ArchivedMessage) and row.conversation_id in conversations:
            row = msgspec.structs.replace(row, body="")
        out.append(row)
    return out


class _Month:
    """What one month's pass knows: its partitions, their rows per church, and the rows
    of each church and table its files hold from them (checked before the drop)."""

    def __init__(self, month: date, state: str) -> None:
        self.month = month
        self.label = f"{month:%Y-%m}"
        self.redo = state == "dropped"
        self.tables: list[Table] = []
        self.counts: dict[Table, dict[uuid.UUID, int]] = {}
        self.taken: dict[tuple[uuid.UUID, Table], int] = {}


class Archiver:
    """One archive run at a time per database (``ARCHIVE_LOCK``).

    ``connect`` opens an autocommit connection straight to Postgres, not through a
    transaction-mode pooler: the lock is a session's. ``on_progress`` is called per
    file and per month."""

    def __init__(
        self,
        connect: Callable[[], Awaitable[Conn]],
        store: ObjectStore,
        on_progress: Callable[[ArchiveProgress], None] | None = None,
        *,
        drop_lock_timeout_ms: int = DROP_LOCK_TIMEOUT_MS,
        drop_attempts: int = DROP_ATTEMPTS,
    ) -> None:
        self._connect = connect
        self.store = store
        self._on_progress = on_progress
        self._drop_lock_timeout_ms = drop_lock_timeout_ms
        self._drop_attempts = drop_attempts
        self._started = 0.0
        self._files = self._rows = self._bytes = self._compacted = 0

    @classmethod
    def for_url(
        cls,
        url: str,
        store: ObjectStore,
        on_progress: Callable[[ArchiveProgress], None] | None = None,
    ) -> Archiver:
        async def connect() -> Conn:
            return await AsyncConnection.connect(url, autocommit=True)

        return cls(connect, store, on_progress)

    async def run(
        self,
        before: date,
        *,
        wait: bool = True,
        on_wait: Callable[[], None] | None = None,
    ) -> ArchiveReport | None:
        """Archive every month before ``before`` (the first of a month) that still has
        partitions, then compact erasures. Another run holding the lock: with ``wait``
        wait for it (``on_wait`` called once first), else return None at once."""
        if before.day != 1:
            raise ValueError("before must be the first of a month")
        latest = latest_before(datetime.now(UTC).date())
        if before > latest:
            raise ValueError(
                f"before must be {latest:%Y-%m} or earlier: the current and the previous "
                "month are never archived"
            )
        conn: Conn = await self._connect()
        try:
            if not await take_archive_lock(conn, wait=False):
                if not wait:
                    return None
                if on_wait is not None:
                    on_wait()
                await take_archive_lock(conn, wait=True)
            # The lock goes with the session: a killed run's is released by Postgres.
            return await self._locked_run(conn, before)
        finally:
            await conn.close()

    async def _locked_run(self, conn: Conn, before: date) -> ArchiveReport:
        self._started = time.monotonic()
        self._files = self._rows = self._bytes = self._compacted = 0
        dropped: list[str] = []
        for month in await partitioned_months(conn, before):
            m = _Month(month, await begin_month(conn, month))
            await self._archive_month(conn, m)
            dropped.append(m.label)
        await self._compact(conn)
        return ArchiveReport(
            before=f"{before:%Y-%m}",
            months=dropped,
            files=self._files,
            rows=self._rows,
            bytes=self._bytes,
            compacted=self._compacted,
        )

    async def _archive_month(self, conn: Conn, m: _Month) -> None:
        unfinished = await unfinished_messages(conn, m.month)
        if unfinished:
            raise UnfinishedMonth(
                f"{m.label} holds {unfinished} message(s) not yet completed or canceled "
                "(scheduled ahead, or still sending): it and later months stay in the "
                "database until they finish"
            )
        for table in TABLES:
            if not await partition_exists(conn, table, m.month):
                continue
            m.tables.append(table)
            m.counts[table] = await rows_per_church(conn, table, m.month)
        churches = sorted({c for counts in m.counts.values() for c in counts})
        indexed = await month_files(conn, m.month)
        erasures = await pending_erasures(conn)
        for n, church_id in enumerate(churches, 1):
            erased = frozenset(e.conversation_id for e in erasures.get(church_id, []))
            for table in m.tables:
                count = m.counts[table].get(church_id, 0)
                if count == 0:
                    continue
                file = indexed.get((church_id, table))
                await self._archive_file(conn, m, church_id, table, count, file, erased)
                self._progress("file", m.label, n, len(churches))
            await self._clean(conn, church_id, m.month)
        await self._drop(conn, m)
        self._progress("month", m.label, len(churches), len(churches))

    async def _archive_file(
        self,
        conn: Conn,
        m: _Month,
        church_id: uuid.UUID,
        table: Table,
        count: int,
        file: IndexedFile | None,
        erased: frozenset[uuid.UUID],
    ) -> None:
        if file is not None and not m.redo and file.rows == count:
            # Written and verified by a run that was stopped before the drop. A
            # missing or cut object is written again; compaction still covers erasures.
            try:
                if await self.store.size(file.object_key) == file.bytes:
                    m.taken[(church_id, table)] = count
                    return
            except ObjectNotFound:
                pass
        rows = await self._read_rows(conn, m.month, table, church_id)
        m.taken[(church_id, table)] = len(rows)
        if m.redo and file is not None:
            # A month already dropped whose partitions back-dated writes made again
            # (koinonia demo, an import): this church's file is kept and the new rows
            # merged into it, a row in both taking the partition's version. The
            # partitions are then dropped again; nothing is lost either way.
            rows = _merge(read_month(await self.store.get(file.object_key), table), rows, table)
        await self._write(conn, church_id, m.month, table, erase(rows, erased))

    async def _read_rows(
        self, conn: Conn, month: date, table: Table, church_id: uuid.UUID
    ) -> list[ArchivedRow]:
        row_type = ROW_TYPES[table]
        rows: list[ArchivedRow] = []
        async with conn.transaction():
            async for batch in church_rows(conn, table, month, church_id, FETCH_ROWS):
                rows += [row_type(**r) for r in batch]
        return rows

    async def _write(
        self,
        conn: Conn,
        church_id: uuid.UUID,
        month: date,
        table: Table,
        rows: list[ArchivedRow],
    ) -> IndexedFile:
        """Write, read back, verify, index. The object of the file it replaces, if
        any, is left to ``_clean``."""
        built = write_month(rows, table, SCHEMA_VERSION)
        key = object_key(church_id, month, table, built.sha256)
        await self.store.put(key, built.data, content_type=CONTENT_TYPE)
        verify(await self.store.get(key), built.sha256, built.rows)
        file = IndexedFile(
            church_id=church_id,
            month=month,
            table=table,
            object_key=key,
            schema_version=SCHEMA_VERSION,
            rows=built.rows,
            bytes=len(built.data),
            sha256=built.sha256,
        )
        await record_file(conn, file)
        self._files += 1
        self._rows += built.rows
        self._bytes += len(built.data)
        return file

    async def _clean(self, conn: Conn, church_id: uuid.UUID, month: date) -> None:
        """Delete the church-month's objects the index does not name: leftovers of
        killed runs and files replaced by newer ones."""
        keep = await indexed_keys(conn, church_id, month)
        for key in await self.store.list(church_prefix(church_id, month)):
            if key not in keep:
                await self.store.delete(key)

    async def _drop(self, conn: Conn, m: _Month) -> None:
        """Check every partition's rows per church against the files and drop the
        month's partitions, in one transaction that waits at most a moment for the
        parents' lock each attempt (live inserts and reads queue behind a waiting
        DROP), retried with a growing pause."""
        for attempt in range(self._drop_attempts):
            try:
                async with conn.transaction():
                    await lock_month(conn, m.tables, m.month, self._drop_lock_timeout_ms)
                    for table in m.tables:
                        await self._check_counts(conn, m, table)
                    await drop_partitions(conn, m.tables, m.month)
                    await mark_dropped(conn, m.month)
                return
            except psycopg.errors.LockNotAvailable:
                await asyncio.sleep(min(0.1 * (attempt + 1), 2.0))
        raise ArchiveIntegrityError(
            f"{m.label}: the partitions stayed in use; nothing dropped (run again later)"
        )

    async def _check_counts(self, conn: Conn, m: _Month, table: Table) -> None:
        for church_id, count in (await rows_per_church(conn, table, m.month)).items():
            taken = m.taken.get((church_id, table), 0)
            if taken != count:
                raise ArchiveIntegrityError(
                    f"{m.label} {table}: church {church_id} has {count} rows, its file "
                    f"{taken}; rows were written meanwhile: nothing dropped, run again"
                )

    async def _compact(self, conn: Conn) -> None:
        """Rewrite every file still holding text of an erased member's conversation,
        then remove the erasures applied."""
        erasures = await pending_erasures(conn)
        for n, (church_id, done) in enumerate(sorted(erasures.items()), 1):
            erased = frozenset(e.conversation_id for e in done)
            months: set[date] = set()
            for file in await church_files(conn, church_id):
                if file.table == "message_recipient":
                    continue
                months.add(file.month)
                rows = read_month(await self.store.get(file.object_key), file.table)
                blanked = erase(rows, erased)
                if blanked == rows:
                    continue
                await self._write(conn, church_id, file.month, file.table, blanked)
                self._compacted += 1
                self._progress("compact", f"{file.month:%Y-%m}", n, len(erasures))
            for month in sorted(months):
                await self._clean(conn, church_id, month)
            await clear_erasures(conn, church_id, list(done))

    def _progress(
        self, phase: Literal["file", "month", "compact"], month: str, n: int, of: int
    ) -> None:
        if self._on_progress is None:
            return
        self._on_progress(
            ArchiveProgress(
                phase=phase,
                month=month,
                church=n,
                churches=of,
                rows=self._rows,
                bytes=self._bytes,
                elapsed_s=time.monotonic() - self._started,
            )
        )


def _merge(old: list[ArchivedRow], new: list[ArchivedRow], table: Table) -> list[ArchivedRow]:
    keys = _PRIMARY[table]

    def key(r: ArchivedRow) -> tuple[Any, ...]:
        return tuple(getattr(r, k) for k in keys)

    merged = {key(r): r for r in old}
    merged.update((key(r), r) for r in new)
    return list(merged.values())


def months_kept_before(today: date, months: int) -> date:
    """``before`` for keeping ``months`` months (the current one included) in the
    database."""
    return add_months(month_start(today), -months)
