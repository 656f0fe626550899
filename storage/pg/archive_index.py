"""The archive's index in Postgres (migration 0012): which months are archived, where
each church's file of each month and table is, and the erasures still to apply.

A month's rows are read from the archive only once the month is ``dropped``: until
the transaction that drops its partitions commits, they are read live, so no row is
ever read from both places or from neither.
"""

from __future__ import annotations

import uuid
from datetime import date, datetime

import msgspec

from storage.archive.schema import Table
from storage.pg.database import Conn
from storage.pg.freshness import stale_ok


class IndexedFile(msgspec.Struct, frozen=True):
    church_id: uuid.UUID
    month: date
    table: Table
    object_key: str
    schema_version: int
    rows: int
    bytes: int
    sha256: str


class ArchivedMonth(msgspec.Struct, frozen=True):
    """One row of ``GET /v1/archive``: ``month`` as ``YYYY-MM``, rows per table."""

    month: str
    messages: int
    recipients: int
    conversation_messages: int


_FILE = (
    "f.church_id, f.month, f.table_name, f.object_key, f.schema_version, f.row_count, "
    "f.bytes, f.sha256"
)
_DROPPED = "JOIN archive_month am ON am.month = f.month AND am.state = 'dropped'"


@stale_ok
async def archived_file(
    conn: Conn, church_id: uuid.UUID, month: date, table: Table
) -> IndexedFile | None:
    """The church's file of ``table`` for ``month``, when that month is archived and
    the church had rows in it."""
    cur = await conn.execute(
        f"SELECT {_FILE} FROM archive_file f {_DROPPED} "
        "WHERE f.church_id = %s AND f.month = %s AND f.table_name = %s",
        (church_id, month, table),
    )
    row = await cur.fetchone()
    return IndexedFile(*row) if row else None


@stale_ok
async def archived_files(
    conn: Conn, church_id: uuid.UUID, table: Table, *, before: date | None = None
) -> list[IndexedFile]:
    """The church's files of ``table`` in archived months, newest month first;
    ``before``: only months before that one."""
    cur = await conn.execute(
        f"SELECT {_FILE} FROM archive_file f {_DROPPED} "
        "WHERE f.church_id = %s AND f.table_name = %s "
        "AND (%s::date IS NULL OR f.month < %s::date) ORDER BY f.month DESC",
        (church_id, table, before, before),
    )
    return [IndexedFile(*r) for r in await cur.fetchall()]


@stale_ok
async def archived_months(conn: Conn, church_id: uuid.UUID) -> list[ArchivedMonth]:
    """``GET /v1/archive``: the church's archived months, newest first. ``messages``
    counts every text of the month (broadcasts, replies and automatic answers)."""
    cur = await conn.execute(
        "SELECT to_char(f.month, 'YYYY-MM'), "
        "coalesce(sum(f.row_count) FILTER (WHERE f.table_name = 'message'), 0), "
        "coalesce(sum(f.row_count) FILTER (WHERE f.table_name = 'message_recipient'), 0), "
        "coalesce(sum(f.row_count) FILTER (WHERE f.table_name = 'conversation_message'), 0) "
        f"FROM archive_file f {_DROPPED} WHERE f.church_id = %s "
        "GROUP BY f.month ORDER BY f.month DESC",
        (church_id,),
    )
    return [ArchivedMonth(r[0], int(r[1]), int(r[2]), int(r[3])) for r in await cur.fetchall()]


@stale_ok
async def erased_conversations(conn: Conn, church_id: uuid.UUID) -> frozenset[uuid.UUID]:
    """Conversations of erased members whose text archive files may still hold:
    a read blanks it (body, media) until the archiver has rewritten the files."""
    cur = await conn.execute(
        "SELECT conversation_id FROM archive_erasure WHERE church_id = %s", (church_id,)
    )
    return frozenset(r[0] for r in await cur.fetchall())


async def record_erasure(conn: Conn, church_id: uuid.UUID, member_id: uuid.UUID) -> None:
    """In the erasing transaction: the member's conversation, if any, joins the
    erasure list. Recorded whether or not any of it is archived yet: a month being
    archived right now may have been read before the erasure committed."""
    await conn.execute(
        "INSERT INTO archive_erasure (church_id, conversation_id) "
        "SELECT church_id, id FROM conversation WHERE church_id = %s AND member_id = %s "
        "ON CONFLICT (church_id, conversation_id) DO UPDATE SET erased_at = now()",
        (church_id, member_id),
    )


# -- the archiver's side (storage/archive/archiver.py) ------------------------------


async def begin_month(conn: Conn, month: date) -> str:
    """The month's state, recording it as ``writing`` when the archiver meets it for
    the first time: ``writing`` or ``dropped`` (a dropped month whose partitions were
    made again by back-dated writes)."""
    await conn.execute(
        "INSERT INTO archive_month (month, state) VALUES (%s, 'writing') "
        "ON CONFLICT (month) DO NOTHING",
        (month,),
    )
    cur = await conn.execute("SELECT state FROM archive_month WHERE month = %s", (month,))
    row = await cur.fetchone()
    return str(row[0]) if row else "writing"


async def month_files(conn: Conn, month: date) -> dict[tuple[uuid.UUID, Table], IndexedFile]:
    """Every church's indexed file of ``month``, whatever the month's state."""
    cur = await conn.execute(f"SELECT {_FILE} FROM archive_file f WHERE f.month = %s", (month,))
    return {(r[0], r[2]): IndexedFile(*r) for r in await cur.fetchall()}


async def church_files(conn: Conn, church_id: uuid.UUID) -> list[IndexedFile]:
    """Every indexed file of the church, oldest month first."""
    cur = await conn.execute(
        f"SELECT {_FILE} FROM archive_file f WHERE f.church_id = %s ORDER BY f.month, f.table_name",
        (church_id,),
    )
    return [IndexedFile(*r) for r in await cur.fetchall()]


async def indexed_keys(conn: Conn, church_id: uuid.UUID, month: date) -> set[str]:
    """The object keys the index names for the church's month (whatever its state)."""
    cur = await conn.execute(
        "SELECT object_key FROM archive_file WHERE church_id = %s AND month = %s",
        (church_id, month),
    )
    return {r[0] for r in await cur.fetchall()}


async def record_file(conn: Conn, file: IndexedFile) -> None:
    """Index a file that was read back and verified, replacing the church's earlier
    file of that month and table (whose object the caller deletes afterwards)."""
    await conn.execute(
        "INSERT INTO archive_file (church_id, month, table_name, object_key, schema_version, "
        "row_count, bytes, sha256) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
        "ON CONFLICT (church_id, month, table_name) DO UPDATE SET "
        "object_key = excluded.object_key, schema_version = excluded.schema_version, "
        "row_count = excluded.row_count, bytes = excluded.bytes, sha256 = excluded.sha256, "
        "verified_at = now()",
        (
            file.church_id,
            file.month,
            file.table,
            file.object_key,
            file.schema_version,
            file.rows,
            file.bytes,
            file.sha256,
        ),
    )


async def mark_dropped(conn: Conn, month: date) -> None:
    """In the transaction that drops the month's partitions: reads switch to the
    archive when it commits."""
    await conn.execute(
        "UPDATE archive_month SET state = 'dropped', dropped_at = now() WHERE month = %s",
        (month,),
    )


class Erasure(msgspec.Struct, frozen=True):
    conversation_id: uuid.UUID
    erased_at: datetime


async def pending_erasures(conn: Conn) -> dict[uuid.UUID, list[Erasure]]:
    """The erasure list, by church."""
    cur = await conn.execute(
        "SELECT church_id, conversation_id, erased_at FROM archive_erasure "
        "ORDER BY church_id, conversation_id"
    )
    found: dict[uuid.UUID, list[Erasure]] = {}
    for church_id, conversation_id, erased_at in await cur.fetchall():
        found.setdefault(church_id, []).append(Erasure(conversation_id, erased_at))
    return found


async def clear_erasures(conn: Conn, church_id: uuid.UUID, done: list[Erasure]) -> int:
    """Delete the erasure rows compaction applied: only those still as read (a member
    erased again since has a later ``erased_at`` and stays listed). Returns how many."""
    if not done:
        return 0
    cur = await conn.execute(
        "DELETE FROM archive_erasure e USING unnest(%s::uuid[], %s::timestamptz[]) "
        "AS d(conversation_id, erased_at) WHERE e.church_id = %s "
        "AND e.conversation_id = d.conversation_id AND e.erased_at = d.erased_at",
        ([e.conversation_id for e in done], [e.erased_at for e in done], church_id),
    )
    return cur.rowcount
