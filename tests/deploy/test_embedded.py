"""The embedded Postgres and Redis: real servers from the wheels, in a tmp dir.

Runs as root too (the usual case in CI containers): pytest's tmp dirs are
0700, which the implementation handles by adding o+x to the parents.
"""

from __future__ import annotations

import pathlib
import socket
import stat
import subprocess
import sys
import textwrap
import time

import psycopg
import pytest
import redis

from deploy.embedded import EmbeddedServerError, free_port
from deploy.embedded_postgres import EmbeddedPostgres
from deploy.embedded_redis import EmbeddedRedis

# Slow lane: starts and kills embedded servers of its own.
pytestmark = pytest.mark.slow


REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tmp_path_factory.mktemp("embedded")


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (PostgreSQL's checkpointer, walwriter, ...)."""
    found = []
    for stat_file in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat_file.parent.name))
    return found


def _assert_gone(pids: list[int], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if pathlib.Path(f"/proc/{pid}").exists()]
        time.sleep(0.02)
    assert alive == [], f"processes still running: {alive}"


def _postmaster_pid(data_dir: pathlib.Path) -> int:
    return int((data_dir / "postgres" / "postmaster.pid").read_text().split()[0])


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_url_before_start_is_an_error(tmp_path: pathlib.Path) -> None:
    with pytest.raises(EmbeddedServerError, match="before start"):
        _ = EmbeddedPostgres(tmp_path).url
    with pytest.raises(EmbeddedServerError, match="before start"):
        _ = EmbeddedRedis(tmp_path).url


def test_postgres_partitioned_query_stop_and_restart(
    data_dir: pathlib.Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    pg = EmbeddedPostgres(data_dir, fast_unsafe=True)
    url = pg.start()
    # pytest's private (0700) tmp dirs gained at most o+x, never read access.
    basetemp = tmp_path_factory.getbasetemp()
    for private in (basetemp, basetemp.parent):
        mode = stat.S_IMODE(private.stat().st_mode)
        if mode & stat.S_ISVTX:
            continue  # /tmp itself (tests/conftest.py's basetemp is right under it)
        assert mode & 0o077 in (0, stat.S_IXOTH)
    assert url == pg.url == f"postgresql://koinonia@127.0.0.1:{pg.port}/koinonia"
    assert pg.start() == url  # already running: same server
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE events (id bigint, at timestamptz NOT NULL, body text)"
            " PARTITION BY RANGE (at)"
        )
        conn.execute(
            "CREATE TABLE events_2025 PARTITION OF events"
            " FOR VALUES FROM ('2025-01-01') TO ('2026-01-01')"
        )
        conn.execute("INSERT INTO events VALUES (1, '2025-06-01', 'hello')")
        rows = conn.execute("SELECT tableoid::regclass::text, body FROM events").fetchall()
        assert rows == [("events_2025", "hello")]
        settings = conn.execute(
            "SELECT current_setting('fsync'), current_setting('max_connections'),"
            " current_setting('listen_addresses'), current_user"
        ).fetchone()
        assert settings == ("off", "200", "127.0.0.1", "koinonia")

    postmaster = _postmaster_pid(data_dir)
    helpers = _children(postmaster)
    assert helpers, "a running postmaster has background processes"
    pg.stop()
    pg.stop()  # idempotent
    _assert_gone([postmaster, *helpers])
    assert not (data_dir / "postgres" / "postmaster.pid").exists()

    # Same folder, another port: the data survives.
    with EmbeddedPostgres(data_dir, port=free_port(), fast_unsafe=True) as again:
        with psycopg.connect(again.url) as conn:
            assert conn.execute("SELECT body FROM events").fetchall() == [("hello",)]
        postmaster = _postmaster_pid(data_dir)
    _assert_gone([postmaster])


def test_redis_streams_stop_and_restart(data_dir: pathlib.Path) -> None:
    server = EmbeddedRedis(data_dir)
    url = server.start()
    assert url == f"redis://127.0.0.1:{server.port}/0"
    with redis.Redis.from_url(url) as client:
        entry_id = client.xadd("{c:1}:queue", {"body": "hi"})
        client.xgroup_create("{c:1}:queue", "workers", id="0")
        batch = client.xreadgroup("workers", "w1", {"{c:1}:queue": ">"}, count=10)
        assert batch == [[b"{c:1}:queue", [(entry_id, {b"body": b"hi"})]]]
        pid = int(client.info("server")["process_id"])
    server.stop()
    server.stop()
    _assert_gone([pid])

    # The append-only file keeps the stream and the group's pending entry.
    with EmbeddedRedis(data_dir) as again, redis.Redis.from_url(again.url) as client:
        assert client.xlen("{c:1}:queue") == 1
        assert client.xpending("{c:1}:queue", "workers")["pending"] == 1


def test_redis_without_persistence_starts_empty(tmp_path: pathlib.Path) -> None:
    server = EmbeddedRedis(tmp_path, persist=False)
    with server, redis.Redis.from_url(server.url) as client:
        client.set("k", "v")
        assert client.config_get("appendonly") == {"appendonly": "no"}
    with server, redis.Redis.from_url(server.url) as client:
        assert client.get("k") is None


def test_busy_port_error_shows_the_log(data_dir: pathlib.Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        with pytest.raises(EmbeddedServerError, match="Address already in use"):
            EmbeddedRedis(data_dir, port=port).start()
        with pytest.raises(EmbeddedServerError, match="Address already in use"):
            EmbeddedPostgres(data_dir, port=port, fast_unsafe=True).start()
    assert not (data_dir / "postgres" / "postmaster.pid").exists()


def test_servers_left_by_a_dead_process_are_replaced(data_dir: pathlib.Path) -> None:
    # A process that starts both servers and dies without stop() or atexit.
    script = textwrap.dedent(
        f"""
        import os, pathlib
        from deploy.embedded_postgres import EmbeddedPostgres
        from deploy.embedded_redis import EmbeddedRedis
        data_dir = pathlib.Path({str(data_dir)!r})
        EmbeddedPostgres(data_dir, fast_unsafe=True).start()
        EmbeddedRedis(data_dir).start()
        os._exit(0)
        """
    )
    subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, check=True, timeout=60)
    orphan_pg = _postmaster_pid(data_dir)
    orphan_redis = int((data_dir / "redis" / "valkey.pid").read_text())

    with EmbeddedPostgres(data_dir, fast_unsafe=True) as pg, EmbeddedRedis(data_dir) as server:
        _assert_gone([orphan_pg, orphan_redis])
        with psycopg.connect(pg.url) as conn:
            assert conn.execute("SELECT count(*) FROM events").fetchone() == (1,)
        with redis.Redis.from_url(server.url) as client:
            assert client.xlen("{c:1}:queue") == 1
