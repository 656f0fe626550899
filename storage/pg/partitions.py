"""Monthly RANGE partitions for the high-volume tables.

Partitions are named ``<table>_yYYYYmMM`` and cover ``[first of month, first of
next month)`` in UTC. ``koinonia migrate`` and a scheduler job keep the current
month and the next three in place, so inserts never meet a missing partition.
"""

from __future__ import annotations

from datetime import UTC, date, datetime

from psycopg import AsyncConnection, sql
from psycopg.rows import TupleRow

Conn = AsyncConnection[TupleRow]

PARTITIONED_TABLES: tuple[str, ...] = ("message", "message_recipient", "conversation_message")
MONTHS_AHEAD = 3
# Recipient rows change status three or four times each: free room in every page
# keeps those updates HOT (no index touched, no new page).
FILLFACTOR = {"message_recipient": 70}


def month_start(day: date) -> date:
    return date(day.year, day.month, 1)


def next_month(day: date) -> date:
    return date(day.year + day.month // 12, day.month % 12 + 1, 1)


def partition_name(table: str, month: date) -> str:
    return f"{table}_y{month.year:04d}m{month.month:02d}"


def months_to_cover(today: date, ahead: int = MONTHS_AHEAD) -> list[date]:
    """The current month and the ``ahead`` months after it."""
    months = [month_start(today)]
    for _ in range(ahead):
        months.append(next_month(months[-1]))
    return months


PARTITIONS_LOCK = 7_311_020_102
"""Advisory lock of partition creation (transaction-scoped)."""


async def ensure_partitions(
    conn: Conn, today: date | None = None, ahead: int = MONTHS_AHEAD
) -> list[str]:
    """Create missing partitions; returns the names created. Call it inside a
    transaction: it waits for the one partition lock every caller takes (``migrate``
    and the scheduler's job), so two never create the same partition at once."""
    await conn.execute("SELECT pg_advisory_xact_lock(%s)", (PARTITIONS_LOCK,))
    today = today or datetime.now(UTC).date()
    created: list[str] = []
    for table in PARTITIONED_TABLES:
        for month in months_to_cover(today, ahead):
            name = partition_name(table, month)
            cur = await conn.execute("SELECT to_regclass(%s) IS NOT NULL", (name,))
            row = await cur.fetchone()
            if row is not None and row[0]:
                continue
            await conn.execute(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {} PARTITION OF {} FOR VALUES FROM ({}) TO ({}) "
                    "WITH (fillfactor = {})"
                ).format(
                    sql.Identifier(name),
                    sql.Identifier(table),
                    sql.Literal(f"{month.isoformat()} 00:00:00+00"),
                    sql.Literal(f"{next_month(month).isoformat()} 00:00:00+00"),
                    sql.Literal(FILLFACTOR.get(table, 100)),
                )
            )
            created.append(name)
    return created
