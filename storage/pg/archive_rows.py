"""The partitions the archiver empties (storage/archive/archiver.py): which months
have them, their rows per church, one church's rows in a file's order, and dropping
a month's partitions once its files are verified.

Every statement names one month's partitions directly, not the parent: the archiver
reads months no one writes, and a statement on a partition leaves the parent, and so
every live query, alone.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from datetime import date
from typing import Any, Final

from psycopg import sql

from storage.archive.schema import COLUMNS, SORT_KEYS, TABLES, Table
from storage.domain.statuses import MessageStatus
from storage.pg.database import Conn
from storage.pg.partitions import partition_name

ARCHIVE_LOCK: Final = 7_311_020_103
"""Session advisory lock of an archive run (beside PARTITIONS_LOCK and the
migrations'). A session's, not a transaction's: a run spans many transactions, and
Postgres releases it when a killed run's connection goes."""

_PARTITION = re.compile(r"^(message|message_recipient|conversation_message)_y(\d{4})m(\d{2})$")
_FINISHED = (MessageStatus.COMPLETED.value, MessageStatus.CANCELED.value)


async def take_archive_lock(conn: Conn, *, wait: bool) -> bool:
    """The run's lock: False when another session holds it and ``wait`` is False."""
    cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", (ARCHIVE_LOCK,))
    row = await cur.fetchone()
    if row and row[0]:
        return True
    if not wait:
        return False
    await conn.execute("SELECT pg_advisory_lock(%s)", (ARCHIVE_LOCK,))
    return True


async def partitioned_months(conn: Conn, before: date) -> list[date]:
    """Months before ``before`` that have a partition of any archived table, oldest
    first."""
    cur = await conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = ANY(%s)",
        (list(TABLES),),
    )
    months: set[date] = set()
    for (name,) in await cur.fetchall():
        found = _PARTITION.match(name)
        if found:
            month = date(int(found[2]), int(found[3]), 1)
            if month < before:
                months.add(month)
    return sorted(months)


async def partition_exists(conn: Conn, table: Table, month: date) -> bool:
    cur = await conn.execute("SELECT to_regclass(%s) IS NOT NULL", (partition_name(table, month),))
    row = await cur.fetchone()
    return bool(row and row[0])


async def rows_per_church(conn: Conn, table: Table, month: date) -> dict[uuid.UUID, int]:
    cur = await conn.execute(
        sql.SQL("SELECT church_id, count(*) FROM {} GROUP BY church_id").format(
            sql.Identifier(partition_name(table, month))
        )
    )
    return {r[0]: int(r[1]) for r in await cur.fetchall()}


async def unfinished_messages(conn: Conn, month: date) -> int:
    """Messages of the month not yet completed or canceled: a month holding one is not
    archived (a broadcast scheduled a year ahead, one still sending), or it would
    never be sent or finished."""
    cur = await conn.execute(
        sql.SQL("SELECT count(*) FROM {} WHERE status <> ALL(%s)").format(
            sql.Identifier(partition_name("message", month))
        ),
        (list(_FINISHED),),
    )
    row = await cur.fetchone()
    return int(row[0]) if row else 0


def _select(table: Table, month: date) -> sql.Composed:
    """One church's rows of the month's partition in the file's key order. A
    conversation text carries the thread's view of its status (its recipient row's,
    as storage/pg/conversations.py reads it), so the archived thread reads as the live
    one did without a second file."""
    part = sql.Identifier(partition_name(table, month))
    order = sql.SQL(", ").join(sql.Identifier("t", k) for k in SORT_KEYS[table])
    if table != "conversation_message":
        cols = sql.SQL(", ").join(sql.Identifier("t", c.name) for c in COLUMNS[table])
        return sql.SQL("SELECT {} FROM {} t WHERE t.church_id = %s ORDER BY {}").format(
            cols, part, order
        )
    picked: list[sql.Composable] = []
    for c in COLUMNS[table]:
        if c.name in ("status", "provider_message_id"):
            picked.append(
                sql.SQL("coalesce({}, {})").format(
                    sql.Identifier("r", c.name), sql.Identifier("t", c.name)
                )
            )
        else:
            picked.append(sql.Identifier("t", c.name))
    return sql.SQL(
        "SELECT {} FROM {} t LEFT JOIN {} r ON t.direction = 'outbound' "
        "AND r.church_id = t.church_id AND r.message_id = t.id AND r.created_at = t.created_at "
        "WHERE t.church_id = %s ORDER BY {}"
    ).format(
        sql.SQL(", ").join(picked),
        part,
        sql.Identifier(partition_name("message_recipient", month)),
        order,
    )


async def church_rows(
    conn: Conn, table: Table, month: date, church_id: uuid.UUID, fetch: int
) -> AsyncIterator[list[dict[str, Any]]]:
    """The church's rows of the month, in batches of ``fetch``, as column → value
    (schema.COLUMNS' names), through a server-side cursor: a big church's month is
    100,000 rows and more. Call it inside a transaction."""
    names = [c.name for c in COLUMNS[table]]
    cursor = conn.cursor(name=f"archive_{table}")
    try:
        await cursor.execute(_select(table, month), (church_id,))
        while batch := await cursor.fetchmany(fetch):
            yield [dict(zip(names, r, strict=True)) for r in batch]
    finally:
        await cursor.close()


async def lock_month(conn: Conn, tables: list[Table], month: date, timeout_ms: int) -> None:
    """In the dropping transaction: the month's partitions locked against writes (reads
    go on) for the count check, waiting at most ``timeout_ms``
    (psycopg.errors.LockNotAvailable beyond). The parents are not locked here: the
    drop takes theirs for a moment at its end."""
    await conn.execute(
        sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(f"{timeout_ms}ms"))
    )
    if tables:
        await conn.execute(
            sql.SQL("LOCK TABLE {} IN SHARE MODE").format(
                sql.SQL(", ").join(sql.Identifier(partition_name(t, month)) for t in tables)
            )
        )


async def drop_partitions(conn: Conn, tables: list[Table], month: date) -> None:
    """In the dropping transaction, after lock_month and the count check."""
    for table in tables:
        await conn.execute(
            sql.SQL("DROP TABLE {}").format(sql.Identifier(partition_name(table, month)))
        )
