"""How fresh a read must be, declared by the repository, and commit positions.

A repository read that may be served by a streaming replica carries ``@stale_ok``:
lists, analytics, exports, history, message and conversation reads. Everything
else (any read the marker is not on, any read made inside a write's transaction,
credentials and other auth decisions, where a revocation must be seen at once)
runs on the primary. Routing reads the marker, never the SQL
(storage/pg/replicas.py ``ReplicaSet.read``).

A *position* is a WAL location as an integer, the order PostgreSQL compares them
in: a church's position is where the primary's WAL stood right after the church's
last write was committed, and a replica that has replayed that far shows the write.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

_MARK = "__koinonia_stale_ok__"

POSITION_SQL = "(pg_current_wal_insert_lsn() - '0/0')::bigint"
"""The primary's position as a column expression. The insert position, not
``pg_current_wal_lsn()`` (the write position): with ``synchronous_commit = off`` a
transaction is visible before its commit record is written, and the insert
position is past every record made so far, so it is past every visible commit."""

_PAGE = 8192
_PAGE_HEADER_MAX = 40
"""A WAL page header is 24 bytes (40 on a segment's first page); no record fits in
one, so an insert position this close past a page boundary means the last record
ended on the boundary."""


def stale_ok(fn: F) -> F:
    """Mark a repository read that a replica may serve (a little behind, never
    behind the caller's church's own writes: storage/pg/replicas.py)."""
    setattr(fn, _MARK, True)
    return fn


def is_stale_ok(fn: object) -> bool:
    return getattr(fn, _MARK, False) is True


def position_of(insert_lsn: int) -> int:
    """A position a replica's replay can reach. Right after a record that ended on a
    page boundary the insert position points past the next page's header, where
    replay (which stops at the record's end) never gets while nothing more is
    written: such a position is moved back to the boundary."""
    offset = insert_lsn % _PAGE
    return insert_lsn - offset if 0 < offset <= _PAGE_HEADER_MAX else insert_lsn
