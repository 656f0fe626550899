"""Embedded streaming replicas (deploy/embedded_replica.py) through the suite's fixture
(tests/replica_support.py), on the session stack's primary."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from deploy.stack import Stack
from tests.replica_support import Replicas


def _write(url: str, table: str, value: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE IF NOT EXISTS {table} (v text)")
        conn.execute(f"INSERT INTO {table} VALUES (%s)", (value,))


def _read(url: str, table: str) -> list[str]:
    with psycopg.connect(url, autocommit=True) as conn:
        return [row[0] for row in conn.execute(f"SELECT v FROM {table} ORDER BY v")]


@pytest.fixture
def table(pg_replicas: Replicas) -> Iterator[str]:
    """A scratch table of this test, dropped afterwards."""
    name = f"replica_test_{uuid.uuid4().hex[:8]}"
    yield name
    with psycopg.connect(pg_replicas.primary_url, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {name}")


def test_a_row_written_on_the_primary_reaches_the_replica(
    pg_replicas: Replicas, table: str
) -> None:
    _write(pg_replicas.primary_url, table, "a")
    pg_replicas.wait_caught_up()
    assert _read(pg_replicas.url, table) == ["a"]
    with (
        psycopg.connect(pg_replicas.url, autocommit=True) as conn,
        pytest.raises(psycopg.errors.ReadOnlySqlTransaction),
    ):
        conn.execute(f"INSERT INTO {table} VALUES ('no')")
    for stats in (pg_replicas.stats(), pg_replicas.primary_stats()):
        assert {"scans", "xact_commit", f"scans:{table}"} <= set(stats)


def test_paused_replay_holds_rows_back_until_resumed(pg_replicas: Replicas, table: str) -> None:
    _write(pg_replicas.primary_url, table, "a")
    pg_replicas.wait_caught_up()
    pg_replicas.pause_replay()
    try:
        held = pg_replicas.replayed_lsn()
        _write(pg_replicas.primary_url, table, "b")
        with pytest.raises(AssertionError, match="replay paused"):
            pg_replicas.wait_caught_up(timeout_s=0.5)
        assert _read(pg_replicas.url, table) == ["a"]
        assert pg_replicas.replayed_lsn() == held
    finally:
        pg_replicas.resume_replay()
    pg_replicas.wait_caught_up()
    assert _read(pg_replicas.url, table) == ["a", "b"]


def test_a_killed_replica_catches_up_when_started_again(pg_replicas: Replicas, table: str) -> None:
    _write(pg_replicas.primary_url, table, "a")
    pg_replicas.kill()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(pg_replicas.url, connect_timeout=2).close()
    # Written while the replica is down: the slot keeps the WAL for it.
    _write(pg_replicas.primary_url, table, "b")
    pg_replicas.start()
    pg_replicas.wait_caught_up()
    assert _read(pg_replicas.url, table) == ["a", "b"]


def test_koinonia_dev_replicas_start_streaming_replicas(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    stack = Stack(tmp_path, env={**env, "KOINONIA_DEV_REPLICAS": "1"}, fast_unsafe=True, quiet=True)
    try:
        stack.start_stores()
        (replica,) = stack.replicas
        assert stack.env["DATABASE_REPLICA_URLS"] == replica.url
        assert [r.url for r in stack.describe().replicas] == [replica.url]
        # The base backup was taken after the migrations: the schema is there.
        with psycopg.connect(replica.url, autocommit=True) as conn:
            assert conn.execute("SELECT count(*) FROM schema_migration").fetchone() != (0,)
            assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
    finally:
        stack.stop()
    assert stack.replicas == []


def test_koinonia_dev_replicas_needs_the_embedded_primary(stack: Stack, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "DATABASE_URL": stack.env["DATABASE_URL"],
        "REDIS_URL": stack.env["REDIS_URL"],
        "KOINONIA_DEV_REPLICAS": "1",
    }
    other = Stack(tmp_path, env=env, quiet=True)
    with pytest.raises(RuntimeError, match="DATABASE_REPLICA_URLS"):
        other.start_stores()
