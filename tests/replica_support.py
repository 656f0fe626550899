"""A streaming replica of the session stack's embedded Postgres, for the tests.

Registered in tests/conftest.py (``pytest_plugins``). ``pg_replicas`` starts one
replica lazily, the first time a test asks for it, and keeps it for the session:
a base backup of the suite's database takes about a second. A web process spawned
with the stack's environment plus ``DATABASE_REPLICA_URLS=<replicas.url>`` reads
the same data as every other process of the stack.

Tests that pause replay or kill the replica must leave it as they found it
(``resume_replay()``, ``start()``): the replica is shared by the session.

The statistics (``stats()``, ``primary_stats()``) are PostgreSQL's cumulative
counters: a busy backend publishes its counts at most once a second and an idle
one up to 10 s later, so compare readings taken while traffic runs (a few seconds
apart), not one taken the instant traffic stops. A killed replica restarts with
its counters at zero.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from deploy.embedded_postgres import EmbeddedPostgres
from deploy.embedded_replica import EmbeddedReplica
from deploy.stack import Stack

#: A WAL page header (long form at a segment's start): an insert position just past
#: one is where replay stops when the last record ended exactly on the page boundary.
_PAGE = 8192
_PAGE_HEADER_MAX = 40

_STATS = (
    "SELECT coalesce(sum(coalesce(seq_scan, 0) + coalesce(idx_scan, 0)), 0)::bigint,"
    " (SELECT xact_commit FROM pg_stat_database WHERE datname = current_database())"
    " FROM pg_stat_user_tables"
)
_TABLE_SCANS = (
    "SELECT relname, (coalesce(seq_scan, 0) + coalesce(idx_scan, 0))::bigint"
    " FROM pg_stat_user_tables"
)


def lsn_int(lsn: str) -> int:
    """``'16/B374D848'`` as the integer PostgreSQL compares."""
    high, low = lsn.split("/")
    return (int(high, 16) << 32) + int(low, 16)


class Replicas:
    """One streaming replica of the stack's primary, driven by the tests."""

    def __init__(self, primary: EmbeddedPostgres, replica: EmbeddedReplica) -> None:
        self.primary = primary
        self.replica = replica
        self.primary_url = primary.url
        self.url = replica.url

    def kill(self) -> None:
        """SIGKILL the replica's postmaster (and its children), as a crash would."""
        self.replica.kill()

    def start(self) -> None:
        """Start the replica again; returns once it accepts connections and streams."""
        self.replica.start()
        self.wait_streaming()

    def wait_streaming(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        status = None
        while time.monotonic() < deadline:
            try:
                with psycopg.connect(self.url, autocommit=True, connect_timeout=2) as conn:
                    row = conn.execute("SELECT status FROM pg_stat_wal_receiver").fetchone()
                status = row[0] if row else None
                if status == "streaming":
                    return
            except psycopg.OperationalError:
                pass
            time.sleep(0.05)
        raise AssertionError(
            f"the replica on {self.url} is not streaming after {timeout_s} s (status {status})"
        )

    def pause_replay(self) -> None:
        """Stop applying WAL (it is still received); returns once replay has paused."""
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute("SELECT pg_wal_replay_pause()")
            deadline = time.monotonic() + 10
            while _one(conn, "SELECT pg_get_wal_replay_pause_state()") != "paused":
                if time.monotonic() > deadline:
                    raise AssertionError("the replica did not pause replay within 10 s")
                time.sleep(0.01)

    def resume_replay(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute("SELECT pg_wal_replay_resume()")

    def primary_lsn(self) -> int:
        """Where the primary's WAL ends now, committed or not yet written out.

        The insert position, not ``pg_current_wal_lsn()``: the suite's primary
        commits asynchronously (fast_unsafe), so a transaction committed a moment
        ago may not be written yet.
        """
        with psycopg.connect(self.primary_url, autocommit=True) as conn:
            lsn = lsn_int(_one(conn, "SELECT pg_current_wal_insert_lsn()::text"))
        if lsn % _PAGE <= _PAGE_HEADER_MAX:
            lsn -= lsn % _PAGE
        return lsn

    def replayed_lsn(self) -> int:
        """The replica's last replayed WAL position."""
        with psycopg.connect(self.url, autocommit=True) as conn:
            return lsn_int(_one(conn, "SELECT pg_last_wal_replay_lsn()::text"))

    def wait_caught_up(self, timeout_s: float = 10.0) -> None:
        """Wait until the replica has replayed everything the primary had logged now."""
        target = self.primary_lsn()
        deadline = time.monotonic() + timeout_s
        replayed = self.replayed_lsn()
        while replayed < target:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"the replica replayed up to {replayed:X}, not {target:X}, "
                    f"within {timeout_s} s (replay paused?)"
                )
            time.sleep(0.02)
            replayed = self.replayed_lsn()

    def stats(self) -> dict[str, int]:
        """The replica's read counters (see the module's docstring)."""
        return _stats(self.url)

    def primary_stats(self) -> dict[str, int]:
        return _stats(self.primary_url)


def _one(conn: psycopg.Connection[Any], query: str) -> str:
    row = conn.execute(query).fetchone()
    assert row is not None
    return str(row[0])


def _stats(url: str) -> dict[str, int]:
    """``scans`` (seq + index scans over the database's tables), ``xact_commit``, and
    ``scans:<table>`` per table (to leave out the tables background jobs read)."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(_STATS).fetchone()
        assert row is not None
        found = {"scans": int(row[0]), "xact_commit": int(row[1] or 0)}
        for table, scans in conn.execute(_TABLE_SCANS).fetchall():
            found[f"scans:{table}"] = int(scans)
    return found


@pytest.fixture(scope="session")
def pg_replicas(stack: Stack) -> Iterator[Replicas]:
    """One streaming replica of ``stack.postgres``, removed at the session's end."""
    if stack.postgres is None:
        raise AssertionError(
            "pg_replicas needs the stack's embedded Postgres (DATABASE_URL is set: "
            "an external primary cannot be given an embedded replica)"
        )
    replica = EmbeddedReplica(stack.postgres, 1, fast_unsafe=True)
    try:
        replica.start()
        replicas = Replicas(stack.postgres, replica)
        replicas.wait_streaming()
        yield replicas
    finally:
        # Before the stack's own teardown (session fixtures end in reverse), so
        # the slot is dropped while the primary runs.
        replica.remove()
