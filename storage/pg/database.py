"""The Postgres connection pool and schema migrations.

Migrations are the numbered ``.sql`` files beside this module, applied in order
inside one transaction each, recorded in ``schema_migration``. Each of those
transactions first takes a transaction-scoped advisory lock and looks again at
what is applied, which makes concurrent ``migrate`` runs (several processes
starting at once) safe, and works through PgBouncer in transaction mode too,
where a session lock would be held by whichever server connection took it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from importlib import resources
from typing import Any, Self

import msgspec
import psycopg
from psycopg import AsyncConnection, AsyncCursor, sql
from psycopg.types.json import set_json_loads
from psycopg_pool import AsyncConnectionPool

from storage.pg.partitions import Conn, ensure_partitions
from storage.process.settings import DatabaseSettings

log = logging.getLogger("koinonia.storage")

_MIGRATION_LOCK = 7_311_020_101

Pool = AsyncConnectionPool[Conn]
__all__ = [
    "Conn",
    "Pool",
    "connection_kwargs",
    "ensure_database",
    "migrate",
    "open_pool",
    "ping",
]


async def _configure(conn: Conn) -> None:
    # json/jsonb columns decoded by msgspec, several times faster than json.loads
    # (8 % of a web process serving message pages went to json.loads).
    set_json_loads(msgspec.json.decode, conn)


def counting_cursor(count: Callable[[], None]) -> type[AsyncCursor[Any]]:
    """A cursor class that calls ``count`` once per statement sent (``execute``,
    ``executemany``; ``conn.execute`` goes through a cursor too): the process's
    ``koinonia_db_queries_total``, at the cost of one call per statement."""

    class CountingCursor(AsyncCursor[Any]):
        __slots__ = ()

        async def execute(self, *args: Any, **kwargs: Any) -> Self:
            count()
            return await super().execute(*args, **kwargs)

        async def executemany(self, *args: Any, **kwargs: Any) -> None:
            count()
            await super().executemany(*args, **kwargs)

    return CountingCursor


def connection_kwargs(settings: DatabaseSettings) -> dict[str, Any]:
    """What every pooled connection is opened with."""
    return {
        "autocommit": True,
        # 0: every statement is prepared on first use and reused on that connection;
        # None: never prepared (PgBouncer in transaction mode hands each transaction
        # whichever server connection is free, which may not know the statement).
        "prepare_threshold": 0 if settings.prepared_statements else None,
        "connect_timeout": max(1, round(settings.timeout_s)),
    }


async def open_pool(
    settings: DatabaseSettings,
    *,
    name: str = "koinonia",
    on_query: Callable[[], None] | None = None,
) -> Pool:
    """The process's pool; ``on_query``: called for every statement (metrics)."""
    configure = _configure
    if on_query is not None:
        cursor_class = counting_cursor(on_query)

        async def configure(conn: Conn) -> None:
            await _configure(conn)
            conn.cursor_factory = cursor_class

    pool: Pool = AsyncConnectionPool(
        settings.url,
        min_size=settings.pool_min,
        max_size=settings.pool_max,
        open=False,
        name=name,
        kwargs=connection_kwargs(settings),
        configure=configure,
        # A request waits this long for a connection, then fails (503) rather than
        # queueing behind a database that is down.
        timeout=settings.timeout_s,
    )
    await pool.open(wait=True, timeout=30)
    return pool


async def ping(conn: Conn) -> None:
    """One round trip to the server (the health checks); raises when it does not answer."""
    await conn.execute("SELECT 1")


def ensure_database(admin_url: str, name: str) -> None:
    """Create database ``name`` unless it exists (the embedded Postgres's first start).
    Blocking: it runs before any event loop. psycopg.OperationalError when refused."""
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=10) as conn:
        found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
        if found.fetchone() is None:
            # Another start() on the same cluster may win the race.
            with contextlib.suppress(psycopg.errors.DuplicateDatabase):
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def migration_files() -> list[tuple[str, str]]:
    root = resources.files("storage.pg") / "migrations"
    files = sorted((p for p in root.iterdir() if p.name.endswith(".sql")), key=lambda p: p.name)
    return [(p.name.removesuffix(".sql"), p.read_text()) for p in files]


async def migrate(url: str) -> list[str]:
    """Apply pending migrations and create partitions; returns what was applied.

    ``url``: DATABASE_SESSION_URL when set, else DATABASE_URL (PgBouncer included):
    nothing here needs more than one transaction at a time.
    """
    applied: list[str] = []
    # Never prepared: behind PgBouncer consecutive statements may meet different
    # server connections, and a one-off run gains nothing from preparing.
    async with await AsyncConnection.connect(url, autocommit=True, prepare_threshold=None) as conn:
        async with conn.transaction():
            await _lock(conn)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migration "
                "(name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
        cur = await conn.execute("SELECT name FROM schema_migration")
        done = {row[0] for row in await cur.fetchall()}
        for name, text in migration_files():
            if name in done:
                continue
            async with conn.transaction():
                await _lock(conn)
                # Another run may have applied it while we waited for the lock; read
                # committed gives this statement a snapshot taken after the wait.
                cur = await conn.execute("SELECT 1 FROM schema_migration WHERE name = %s", (name,))
                if await cur.fetchone() is not None:
                    continue
                await conn.execute(text.encode())
                await conn.execute("INSERT INTO schema_migration (name) VALUES (%s)", (name,))
            log.info("migration applied", extra={"migration": name})
            applied.append(name)
        async with conn.transaction():
            await _lock(conn)
            created = await ensure_partitions(conn)
        if created:
            log.info("partitions created", extra={"partitions": created})
    return applied


async def _lock(conn: Conn) -> None:
    """Wait for the migration lock, held until the transaction ends (through PgBouncer
    a session lock would stay with a server connection other clients then get)."""
    await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
