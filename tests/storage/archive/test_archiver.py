"""The archiver in-process on the session stack's database: crashes at many points
(a store that fails at its Nth call, a progress callback that raises), rows written
while a month is archived, back-dated rows in a month already archived; and the
scheduler's daily timing, pure.

Months archived are those of tests/deploy/test_archive_command.py (before the current
month minus 9), which no other test writes.
"""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from delivery.scheduler import archive_due, next_archive_at
from deploy.stack import Stack
from storage.archive.archiver import (
    ArchiveIntegrityError,
    ArchiveProgress,
    Archiver,
    UnfinishedMonth,
    add_months,
    erase,
)
from storage.archive.schema import ArchivedConversationMessage, ArchivedMessage
from storage.domain.ids import uuid7
from storage.objects import ObjectStore, open_object_store
from storage.pg.partitions import ensure_partitions, partition_name
from storage.process.settings import Settings
from tests.deploy.test_archive_command import (
    BEFORE,
    archived_rows,
    as_sets,
    live_rows,
    make_history,
    objects_match_index,
    partitions_left,
    stack_store,
)


class Crash(Exception):
    """Where a kill -9 would have stopped the run."""


class FailingStore:
    """The real store, failing at the ``at``-th call of ``op``: after it took effect
    for ``put`` and ``delete`` (the process died before it learned the answer),
    before it for ``get`` and ``list``."""

    def __init__(self, store: ObjectStore, op: str, at: int) -> None:
        self.store, self.op, self.at, self.calls = store, op, at, 0

    def _tick(self, op: str) -> None:
        if op == self.op:
            self.calls += 1
            if self.calls == self.at:
                raise Crash(f"{op} #{self.at}")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    async def put(self, key: str, data: bytes, *, content_type: str | None = None) -> None:
        await self.store.put(key, data, content_type=content_type)
        self._tick("put")

    async def delete(self, key: str) -> None:
        await self.store.delete(key)
        self._tick("delete")

    async def get(self, key: str) -> bytes:
        self._tick("get")
        return await self.store.get(key)

    async def list(self, prefix: str = "") -> list[str]:
        self._tick("list")
        return await self.store.list(prefix)


def raise_at(phase: str, at: int) -> Any:
    seen = [0]

    def on_progress(p: ArchiveProgress) -> None:
        if p.phase == phase:
            seen[0] += 1
            if seen[0] == at:
                raise Crash(f"{phase} #{at}")

    return on_progress


def archiver(stack: Stack, store: Any, on_progress: Any = None) -> Archiver:
    return Archiver.for_url(stack.env["DATABASE_URL"], store, on_progress)


@pytest.mark.anyio
async def test_crashes_anywhere_then_a_clean_run(stack: Stack) -> None:
    demo = make_history(stack, members=20, seed=8)
    church_id = demo["church_id"]
    before = live_rows(stack, church_id)
    months = sorted({m for m, _ in before})
    store = stack_store(stack)
    crashes = [
        (FailingStore(store, "put", 2), None),  # a file stored, not yet read back
        (FailingStore(store, "get", 2), None),  # read back, not verified nor indexed
        (store, raise_at("file", 3)),  # indexed, month not dropped
        (FailingStore(store, "list", 2), None),  # before cleaning a church-month
        (store, raise_at("month", 1)),  # a month dropped, the next not begun
        (FailingStore(store, "put", 3), None),
    ]
    for crashing_store, on_progress in crashes:
        with pytest.raises(Crash):
            await archiver(stack, crashing_store, on_progress).run(BEFORE)
    assert partitions_left(stack, months), "the crashes left nothing to resume"

    report = await archiver(stack, store).run(BEFORE)
    assert report is not None
    assert as_sets(await archived_rows(stack, store, church_id)) == as_sets(before)
    await objects_match_index(stack, store, church_id)
    assert partitions_left(stack, months) == []

    # Rows written into an archived month (back-dated) are merged into its file.
    month = months[-1]
    with psycopg.connect(stack.env["DATABASE_URL"], autocommit=True) as conn:
        _, rows = conn.execute(
            "SELECT f.object_key, f.row_count FROM archive_file f WHERE f.church_id = %s "
            "AND f.month = %s AND f.table_name = 'message'",
            (church_id, month),
        ).fetchone() or (None, None)
    assert rows is not None
    await _back_dated_message(stack, church_id, month)
    again = await archiver(stack, store).run(BEFORE)
    assert again is not None
    assert f"{month:%Y-%m}" in again.months
    with psycopg.connect(stack.env["DATABASE_URL"], autocommit=True) as conn:
        now = conn.execute(
            "SELECT row_count FROM archive_file WHERE church_id = %s AND month = %s "
            "AND table_name = 'message'",
            (church_id, month),
        ).fetchone()
    assert now == (rows + 1,)
    assert partitions_left(stack, [month]) == []
    await objects_match_index(stack, store, church_id)


async def _back_dated_message(
    stack: Stack, church_id: str, month: date, status: str = "completed"
) -> uuid.UUID:
    at = datetime(month.year, month.month, 15, 12, tzinfo=UTC)
    message_id = uuid7(int(at.timestamp() * 1000))
    async with await psycopg.AsyncConnection.connect(stack.env["DATABASE_URL"]) as conn:
        async with conn.transaction():
            await ensure_partitions(conn, today=month, ahead=0)
        await conn.execute(
            "INSERT INTO message (church_id, id, created_at, body, target, status, "
            "recipient_count, segments, encoding, from_number, kind, consent_exempt) "
            "VALUES (%s, %s, %s, 'back-dated', '{}', %s, 0, 1, 'gsm7', '+15550000000', "
            "'broadcast', false)",
            (church_id, message_id, at, status),
        )
        await conn.commit()
    return message_id


@pytest.mark.anyio
async def test_rows_written_during_the_run_stop_the_drop(archive_s3_stack: Stack) -> None:
    """On the stack whose object store is s3:// (moto on loopback,
    tests/archive_support.py): the same archiver over the other adapter."""
    stack = archive_s3_stack
    demo = make_history(stack, members=8, seed=9)
    church_id = demo["church_id"]
    months = sorted({m for m, _ in live_rows(stack, church_id)})
    written: list[uuid.UUID] = []

    class WritingStore(FailingStore):
        """A church-month's files are indexed when its objects are listed for
        cleaning: a back-dated row arrives then, before the month's drop."""

        async def list(self, prefix: str = "") -> list[str]:
            if not written:
                written.append(await _back_dated_message(stack, church_id, months[0]))
            return await self.store.list(prefix)

    store = stack_store(stack)
    assert store.url.startswith("s3://"), store.url
    with pytest.raises(ArchiveIntegrityError):
        await archiver(stack, WritingStore(store, "", 0)).run(BEFORE)
    assert written
    assert partitions_left(stack, [months[0]]), "dropped despite the new row"
    # The next run takes the new row too.
    before = live_rows(stack, church_id)
    assert await archiver(stack, store).run(BEFORE) is not None
    assert as_sets(await archived_rows(stack, store, church_id)) == as_sets(before)
    assert partitions_left(stack, months) == []
    await objects_match_index(stack, store, church_id)


@pytest.mark.anyio
async def test_a_month_with_an_unfinished_message_stays(archive_s3_stack: Stack) -> None:
    """A broadcast accepted in an old month and scheduled far ahead (or one still
    sending) keeps its month, and every later one, in the database: archived, it would
    never be sent."""
    stack = archive_s3_stack
    demo = make_history(stack, members=4, seed=11)
    months = sorted({m for m, _ in live_rows(stack, demo["church_id"])})
    pending = await _back_dated_message(stack, demo["church_id"], months[1], "scheduled")
    store = stack_store(stack)
    with pytest.raises(UnfinishedMonth, match="1 message"):
        await archiver(stack, store).run(BEFORE)
    # Months before it went; it and the later ones stayed.
    assert partitions_left(stack, [months[0]]) == []
    assert partitions_left(stack, months[1:])
    with psycopg.connect(stack.env["DATABASE_URL"], autocommit=True) as conn:
        conn.execute("UPDATE message SET status = 'canceled' WHERE id = %s", (pending,))
    assert await archiver(stack, store).run(BEFORE) is not None
    assert partitions_left(stack, months) == []


def test_erase_blanks_the_erased_conversations_only() -> None:
    church, gone, kept = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    at = datetime(2024, 1, 2, tzinfo=UTC)

    def text(conversation: uuid.UUID) -> ArchivedConversationMessage:
        return ArchivedConversationMessage(
            church_id=church,
            id=uuid.uuid4(),
            created_at=at,
            conversation_id=conversation,
            direction="inbound",
            body="my address is ...",
            media=[{"url": "x"}],
            status="received",
        )

    reply = ArchivedMessage(
        church_id=church,
        id=uuid.uuid4(),
        created_at=at,
        body="we will visit",
        target={},
        status="completed",
        recipient_count=1,
        segments=1,
        encoding="gsm7",
        from_number="+15550000000",
        kind="reply",
        conversation_id=gone,
        consent_exempt=False,
    )
    rows = erase([text(gone), text(kept), reply], frozenset({gone}))
    assert [(getattr(r, "body", None), getattr(r, "media", None)) for r in rows] == [
        ("", []),
        ("my address is ...", [{"url": "x"}]),
        ("", None),
    ]


def test_months() -> None:
    assert add_months(date(2024, 1, 20), -1) == date(2023, 12, 1)
    assert add_months(date(2024, 12, 1), 1) == date(2025, 1, 1)
    assert add_months(date(2024, 3, 1), -24) == date(2022, 3, 1)
    assert BEFORE.day == 1
    assert partition_name("message", date(2024, 3, 1)) == "message_y2024m03"


@pytest.mark.parametrize(
    ("since", "now", "due"),
    [
        # Started at 03:20: not at start-up, nor later that day; the next day's 03:00.
        ("2026-05-04T03:20", "2026-05-04T03:20", False),
        ("2026-05-04T03:20", "2026-05-04T23:59", False),
        ("2026-05-04T03:20", "2026-05-05T02:59", False),
        ("2026-05-04T03:20", "2026-05-05T03:00", True),
        # Started at 02:59: that same day's 03:00.
        ("2026-05-04T02:59", "2026-05-04T03:00", True),
        ("2026-05-04T02:59", "2026-05-04T02:59:59", False),
        # Ran at 03:00: the next run a day later, not again that hour.
        ("2026-05-04T03:00", "2026-05-04T03:30", False),
        ("2026-05-04T03:00", "2026-05-05T03:00:01", True),
        # A scheduler stopped for days runs once when it comes back after the hour.
        ("2026-05-01T03:00", "2026-05-04T10:00", True),
    ],
)
def test_the_daily_run_is_due_at_the_hour_never_at_start_up(
    since: str, now: str, due: bool
) -> None:
    def utc(text: str) -> datetime:
        return datetime.fromisoformat(text).replace(tzinfo=UTC)

    assert archive_due(utc(now), utc(since), 3) is due


def test_next_archive_at() -> None:
    at = datetime(2026, 5, 4, 3, 20, tzinfo=UTC)
    assert next_archive_at(at, 3) == datetime(2026, 5, 5, 3, tzinfo=UTC)
    assert next_archive_at(at, 23) == datetime(2026, 5, 4, 23, tzinfo=UTC)
    assert next_archive_at(at - timedelta(minutes=21), 3) == datetime(2026, 5, 4, 3, tzinfo=UTC)


@pytest.mark.anyio
async def test_the_archiver_refuses_the_two_recent_months(tmp_path: Path) -> None:
    async def connect() -> Any:
        raise AssertionError("nothing may be opened for a refused month")

    store = open_object_store(Settings.from_env({"KOINONIA_DATA_DIR": str(tmp_path)}))
    this_month = datetime.now(UTC).date().replace(day=1)
    for before in (this_month, add_months(this_month, 1)):
        with pytest.raises(ValueError, match="never archived"):
            await Archiver(connect, store).run(before)
    with pytest.raises(ValueError, match="first of a month"):
        await Archiver(connect, store).run(date(2024, 1, 2))
