"""Everything through PgBouncer 1.18 (Debian's package) in transaction pooling mode.

A PgBouncer rendered from deploy/pgbouncer.ini sits in front of the session
stack's Postgres, on a database of its own, and a second set of processes
(simulator, web, worker, scheduler, with a Redis of their own) reaches Postgres
only through it, with prepared statements off: their migrations, the minimum
flow, a broadcast to delivered, a member's reply, a staff reply and the
scheduler's jobs. The separate database and Redis keep the session's processes
from doing any of that work behind PgBouncer's back (a shared queue would let
the session's worker send our texts over its direct connection).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from deploy.embedded_pgbouncer import TEMPLATE, EmbeddedPgBouncer, render_config
from deploy.embedded_redis import EmbeddedRedis
from deploy.stack import Stack, free_ports
from storage.pg.database import connection_kwargs, ensure_database, open_pool
from storage.process.settings import DatabaseSettings, Settings
from tests.conftest import Church, texts_sent, unique_phone, wait_until

DATABASE = "koinonia_pgbouncer"


@dataclass
class Bounced:
    bouncer: EmbeddedPgBouncer
    stack: Stack

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.stack.http_port}"

    @property
    def sim_url(self) -> str:
        return f"http://127.0.0.1:{self.stack.sim_port}"

    def show(self, what: str) -> list[dict[str, Any]]:
        """A ``SHOW`` of the admin console, which speaks the simple query protocol only
        (a ClientCursor sends its statements that way)."""
        with psycopg.connect(
            self.bouncer.admin_url, autocommit=True, cursor_factory=psycopg.ClientCursor
        ) as conn:
            cur = conn.execute(f"SHOW {what}")
            names = [c.name for c in cur.description or ()]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def transactions(self) -> int:
        """Transactions PgBouncer has passed to the database so far."""
        rows = [r for r in self.show("STATS") if r["database"] == DATABASE]
        return int(Decimal(rows[0]["total_xact_count"])) if rows else 0


@pytest.fixture(scope="module")
def bounced(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bounced]:
    primary = stack.store("postgres")
    server = primary.url.rsplit("/", 1)[0]
    ensure_database(f"{server}/postgres", DATABASE)
    data_dir = tmp_path_factory.mktemp("pgbouncer")
    bouncer = EmbeddedPgBouncer(data_dir, f"{server}/{DATABASE}")
    redis = EmbeddedRedis(data_dir, persist=False)
    second: Stack | None = None
    try:
        env = dict(stack.base_env)
        env.pop("DATABASE_SESSION_URL", None)  # migrations go through PgBouncer as well
        env["DATABASE_URL"] = bouncer.start()
        env["KOINONIA_DB_PREPARED_STATEMENTS"] = "off"
        env["REDIS_URL"] = redis.start()
        web_port, sim_port = free_ports(2)
        second = Stack(
            data_dir,
            http_port=web_port,
            sim_port=sim_port,
            env=env,
            fast_unsafe=True,
            quiet=True,
            log_dir=data_dir / "logs",
        )
        second.start_stores()
        second.start_processes()
        second.wait_ready()
        yield Bounced(bouncer, second)
    finally:
        if second is not None:
            second.stop()
        redis.stop()
        bouncer.stop()


def _direct_count(stack: Stack, statement: str) -> int:
    with psycopg.connect(stack.store("postgres").url, autocommit=True) as conn:
        row = conn.execute(statement, (DATABASE,)).fetchone()
    return int(row[0]) if row else 0


def _through(bounced: Bounced, statement: str, params: tuple[Any, ...]) -> None:
    with psycopg.connect(bounced.bouncer.url, autocommit=True, prepare_threshold=None) as conn:
        conn.execute(statement, params)


def _thread_status(church: Church, conversation_id: str) -> str:
    thread = church.api.get(f"/v1/conversations/{conversation_id}/messages").json()["data"]
    return str(next(m["status"] for m in thread if m["direction"] == "outbound"))


@pytest.mark.slow
def test_the_whole_flow_runs_through_pgbouncer(stack: Stack, bounced: Bounced) -> None:
    pools = {r["database"]: r for r in bounced.show("POOLS")}
    assert pools[DATABASE]["pool_mode"] == "transaction"
    began = bounced.transactions()
    church = Church(bounced.base_url)
    try:
        # The minimum flow: sign-up (above), a group, members, a broadcast to delivered.
        group = church.group()
        phones = [unique_phone() for _ in range(3)]
        members = [church.member(p, [group]) for p in phones]
        message_id = church.broadcast(group, "Service at 10am")
        counts = church.counts_when(message_id, lambda c: c["delivered"] == 3, 30)
        assert counts["delivered"] == 3, counts
        page = church.api.get(f"/v1/messages/{message_id}/recipients").json()["data"]
        assert {r["member_id"] for r in page} == set(members)
        assert {r["status"] for r in page} == {"delivered"}
        assert texts_sent(bounced.sim_url, phones) == [1, 1, 1]  # by our worker

        # A member's reply: the simulator signs the inbound webhook to our web.
        inbound = httpx.post(
            f"{bounced.sim_url}/_sim/inbound",
            json={"from": phones[0], "to": church.phone_number, "text": "Amen"},
        )
        assert inbound.status_code == 202, inbound.text
        conversations = church.conversations_when(1)
        assert conversations, "the member's reply never reached the inbox"
        conversation_id = conversations[0]["id"]
        assert conversations[0]["member_id"] == members[0]

        # A staff reply, through the same send pipeline, to delivered.
        reply = church.api.post(
            f"/v1/conversations/{conversation_id}/messages", json={"body": "Bless you"}
        )
        assert reply.status_code == 202, reply.text
        wait_until(
            lambda: _thread_status(church, conversation_id) == "delivered", 20, "reply delivered"
        )
        assert texts_sent(bounced.sim_url, phones[:1]) == [2]

        # The scheduler's jobs: a scheduled message and a recurring one coming due.
        send_at = (datetime.now(UTC) + timedelta(seconds=1)).isoformat()
        scheduled = church.api.post(
            "/v1/messages",
            json={"body": "At one", "target": {"member_ids": [members[1]]}, "send_at": send_at},
        )
        assert scheduled.status_code == 202, scheduled.text
        recurring = church.api.post(
            "/v1/recurring-messages",
            json={
                "name": "daily",
                "body": "Good morning",
                "target": {"member_ids": [members[2]]},
                "rule": {"frequency": "daily", "time": "06:00"},
            },
        )
        assert recurring.status_code == 201, recurring.text
        recurring_id = recurring.json()["data"]["id"]
        _through(
            bounced,
            "UPDATE recurring_message SET next_run_at = now() WHERE church_id = %s AND id = %s",
            (uuid.UUID(church.id), uuid.UUID(recurring_id)),
        )
        counts = church.counts_when(
            scheduled.json()["data"]["id"], lambda c: c["delivered"] == 1, 20
        )
        assert counts["delivered"] == 1, counts
        wait_until(
            lambda: texts_sent(bounced.sim_url, phones[2:]) == [2], 20, "recurring text sent"
        )
        occurrences = church.api.get(f"/v1/recurring-messages/{recurring_id}/occurrences")
        assert [o["status"] for o in occurrences.json()["data"]] == ["sent"]
    finally:
        church.close()

    # PgBouncer really was in the path: every process is its client, it passed the
    # work on, and Postgres saw only its few server connections for this database.
    clients = [c for c in bounced.show("CLIENTS") if c["database"] == DATABASE]
    assert len(clients) >= 3, clients  # web, worker and scheduler pools (2 each at least)
    assert bounced.transactions() - began > 100
    backends = _direct_count(stack, "SELECT count(*) FROM pg_stat_activity WHERE datname = %s")
    servers = [s for s in bounced.show("SERVERS") if s["database"] == DATABASE]
    assert 0 < backends <= 25  # default_pool_size + reserve_pool_size of pgbouncer.ini
    assert backends >= len(servers)
    # Nothing failed on a statement PgBouncer's next server connection did not know.
    for name in ("web", "worker", "scheduler"):
        text = bounced.stack.log_path(name).read_text(errors="replace")
        assert "prepared statement" not in text, f"{name}: {text[-2000:]}"
        errors = [line for line in text.splitlines() if '"level": "error"' in line]
        assert errors == [], f"{name} logged errors: {errors[:3]}"


def test_prepared_statements_off_sets_prepare_threshold_none() -> None:
    on = Settings.from_env({}).database
    off = Settings.from_env({"KOINONIA_DB_PREPARED_STATEMENTS": "off"}).database
    assert on.prepared_statements is True
    assert off.prepared_statements is False
    assert connection_kwargs(on)["prepare_threshold"] == 0
    assert connection_kwargs(off)["prepare_threshold"] is None


@pytest.mark.anyio
async def test_a_pool_without_prepared_statements_never_prepares(stack: Stack) -> None:
    settings = DatabaseSettings(
        url=stack.env["DATABASE_URL"], pool_min=1, pool_max=1, prepared_statements=False
    )
    pool = await open_pool(settings, name="no-prepare")
    try:
        async with pool.connection() as conn:
            assert conn.prepare_threshold is None
            for _ in range(3):
                await conn.execute("SELECT %s::int", (1,))
            cur = await conn.execute("SELECT count(*) FROM pg_prepared_statements")
            row = await cur.fetchone()
            assert row == (0,)
    finally:
        await pool.close()


def test_the_config_is_the_shipped_one_with_local_lines() -> None:
    text = render_config(
        TEMPLATE.read_text(),
        {"koinonia": "host=127.0.0.1 port=5999 dbname=koinonia"},
        {"listen_port": "6999", "stats_users": "", "not_in_template": "1"},
    )
    assert "koinonia = host=127.0.0.1 port=5999 dbname=koinonia" in text
    assert "10.0.0.10" not in text  # the template's example entry is gone
    assert "pool_mode = transaction" in text
    assert "listen_port = 6999" in text
    assert text.count("listen_port =") == 1
    assert "\nstats_users = \n" in text
    assert "\nnot_in_template = 1\n" in text


@pytest.mark.slow
def test_dev_stack_puts_pgbouncer_in_front_of_its_primary(tmp_path: Path) -> None:
    """``koinonia dev`` with KOINONIA_DEV_PGBOUNCER=1: children through PgBouncer,
    migrations over the direct session URL."""
    env = {"PATH": os.environ.get("PATH", ""), "KOINONIA_DEV_PGBOUNCER": "1"}
    dev = Stack(tmp_path, env=env, fast_unsafe=True, quiet=True)
    try:
        child_env = dev.start_stores()
        assert dev.pgbouncer is not None
        assert dev.postgres is not None
        assert child_env["DATABASE_URL"] == dev.pgbouncer.url
        assert child_env["DATABASE_SESSION_URL"] == dev.postgres.url
        assert child_env["KOINONIA_DB_PREPARED_STATEMENTS"] == "off"
        settings = Settings.from_env(child_env).database
        assert connection_kwargs(settings)["prepare_threshold"] is None
        with psycopg.connect(settings.url, autocommit=True, prepare_threshold=None) as conn:
            row = conn.execute("SELECT count(*) FROM schema_migration").fetchone()
        assert row is not None
        assert row[0] > 0
    finally:
        dev.stop()
    assert dev.pgbouncer is None
