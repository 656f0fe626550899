"""Transaction-scoped advisory locks: one holder at a time for a periodic job."""

from __future__ import annotations

from storage.pg.database import Conn


async def try_xact_lock(conn: Conn, key: int) -> bool:
    """Take lock ``key`` until the transaction ends; False (without waiting) when
    another transaction holds it. Call it inside ``conn.transaction()``."""
    cur = await conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (key,))
    row = await cur.fetchone()
    return bool(row and row[0])
