"""Read routing (storage/pg/replicas.py) on a real streaming replica, in process.

A ``ReplicaSet`` is built here on its own pools, against the session's primary and
the ``pg_replicas`` replica (tests/replica_support.py), with a fast health poll.
What it routes is told apart by the read itself: ``pg_is_in_recovery()`` is true
only on the replica. Tests that pause replay or kill the replica put it back as
they found it (it is shared by the session).

Also here: the freshness marker is where the API needs it and never on a write,
the church's position moves only forward and comes back with the rate limit, and
the event relay records it in the round trip that publishes.
"""

from __future__ import annotations

import ast
import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from deploy.stack import Stack
from storage.archive.reader import ArchiveReader
from storage.domain.events import MemberChanged, MemberCreatedEvent
from storage.pg import event_log
from storage.pg.database import Conn, open_pool
from storage.pg.freshness import is_stale_ok, position_of, stale_ok
from storage.pg.replicas import ReplicaSet
from storage.process.settings import Settings
from storage.redis import key_names
from storage.redis.connection import open_redis
from storage.redis.publisher import EventPublisher
from storage.redis.rate_limits import RateLimiter
from storage.redis.read_positions import ReadPositions
from storage.redis.scripts import ScriptRunner
from tests.replica_support import Replicas

ROOT = Path(__file__).resolve().parents[3]

POLL_S = 0.05


@stale_ok
async def on_standby(conn: Conn) -> bool:
    """Where a stale-tolerant read ran: True on the replica."""
    cur = await conn.execute("SELECT pg_is_in_recovery()")
    row = await cur.fetchone()
    assert row is not None
    return bool(row[0])


async def _in_recovery(conn: Conn) -> bool:
    """The same read, unmarked: it must run on the primary."""
    cur = await conn.execute("SELECT pg_is_in_recovery()")
    row = await cur.fetchone()
    assert row is not None
    return bool(row[0])


class Harness:
    def __init__(self, replicas: ReplicaSet, primary: Conn, positions: ReadPositions) -> None:
        self.replicas = replicas
        self.primary = primary
        self.positions = positions

    async def commit_something(self) -> None:
        """A transaction with an xid: a commit record the replica must replay."""
        await self.primary.execute("SELECT pg_current_xact_id()")

    async def until(self, usable: bool, seconds: float) -> float:
        """Wait until the replica's usability is ``usable``; returns the time it took."""
        began = time.monotonic()
        while self.replicas.states()[0].usable is not usable:
            if time.monotonic() - began > seconds:
                raise AssertionError(
                    f"replica usable={usable} not reached in {seconds} s: "
                    f"{self.replicas.states()[0]}"
                )
            await asyncio.sleep(0.01)
        return time.monotonic() - began


@asynccontextmanager
async def harness(
    stack: Stack, replica: Replicas, *, max_lag_ms: int = 1000
) -> AsyncIterator[Harness]:
    settings = Settings.from_env(
        {
            **stack.env,
            "DATABASE_REPLICA_URLS": replica.url,
            "KOINONIA_REPLICA_POLL_S": str(POLL_S),
            "KOINONIA_REPLICA_MAX_LAG_MS": str(max_lag_ms),
            "KOINONIA_DB_POOL_MIN": "1",
        }
    )
    pool = await open_pool(settings.database)
    redis = open_redis(settings.redis, max_connections=4)
    positions = EventPublisher(redis).positions
    replicas = ReplicaSet(pool, settings.database, positions)
    replicas.start()
    try:
        async with pool.connection() as primary:
            yield Harness(replicas, primary, positions)
    finally:
        await replicas.stop()
        await pool.close()
        await redis.aclose()


@pytest.fixture
def replica(pg_replicas: Replicas) -> Iterator[Replicas]:
    """The session's replica, put back running and replaying after each test."""
    yield pg_replicas
    try:
        pg_replicas.resume_replay()
    except Exception:
        pg_replicas.start()
    pg_replicas.wait_caught_up()


@pytest.mark.anyio
async def test_marked_reads_go_to_a_caught_up_replica_the_rest_to_the_primary(
    stack: Stack, replica: Replicas
) -> None:
    async with harness(stack, replica) as h:
        await h.until(True, 5)
        assert h.replicas.states()[0].lag_s < 1.0
        assert await h.replicas.read(0, on_standby) is True
        # Unmarked, position unknown, or a position the replica has not reached.
        assert await h.replicas.read(0, _in_recovery) is False
        assert await h.replicas.read(None, on_standby) is False
        assert await h.replicas.read(h.replicas.states()[0].replayed + 1, on_standby) is False


@pytest.mark.anyio
async def test_a_church_reads_its_writes_while_others_keep_the_replica(
    stack: Stack, replica: Replicas
) -> None:
    church, other = uuid.uuid4(), uuid.uuid4()
    limiter = RateLimiter(ScriptRunner(open_redis(Settings.from_env(stack.env).redis)))
    async with harness(stack, replica) as h:
        await h.until(True, 5)
        replica.pause_replay()
        await h.commit_something()
        await h.replicas.remember_write(church)

        async def position(of: uuid.UUID) -> int | None:
            verdict = await limiter.charge(
                [(key_names.church_rate(of), 1000)], position_key=key_names.read_position(of)
            )
            return verdict.position

        mine, theirs = await position(church), await position(other)
        assert mine is not None
        assert mine > h.replicas.states()[0].replayed
        assert theirs == 0
        await asyncio.sleep(3 * POLL_S)
        assert await h.replicas.read(mine, on_standby) is False
        assert await h.replicas.read(theirs, on_standby) is True
        replica.resume_replay()
        replica.wait_caught_up()
        await asyncio.sleep(3 * POLL_S)
        assert await h.replicas.read(mine, on_standby) is True


@pytest.mark.anyio
async def test_a_replica_lagging_beyond_the_limit_is_skipped_then_used_again(
    stack: Stack, replica: Replicas
) -> None:
    async with harness(stack, replica, max_lag_ms=150) as h:
        await h.until(True, 5)
        replica.pause_replay()
        began = time.monotonic()
        while h.replicas.states()[0].usable:
            await h.commit_something()
            await asyncio.sleep(0.02)
            assert time.monotonic() - began < 3, h.replicas.states()
        assert h.replicas.states()[0].lag_s > 0.15
        # Position 0: nothing of this church's is missing; the lag alone sends it away.
        assert await h.replicas.read(0, on_standby) is False
        replica.resume_replay()
        await h.until(True, 5)
        assert await h.replicas.read(0, on_standby) is True


@pytest.mark.anyio
async def test_a_killed_replica_is_skipped_without_errors_and_used_again_after_restart(
    stack: Stack, replica: Replicas
) -> None:
    async with harness(stack, replica) as h:
        await h.until(True, 5)
        assert await h.replicas.read(0, on_standby) is True
        replica.kill()
        # The pool still holds connections to the dead server: the read that meets
        # one runs again on the primary, and the replica is skipped from then on.
        for _ in range(5):
            assert await h.replicas.read(0, on_standby) is False
        assert h.replicas.states()[0].usable is False
        replica.start()
        took = await h.until(True, 10)
        assert took < 10
        assert await h.replicas.read(0, on_standby) is True


# -- positions in Redis ---------------------------------------------------------------


@pytest.mark.anyio
async def test_a_position_only_moves_forward_and_comes_back_with_the_rate_limit(
    stack: Stack,
) -> None:
    redis = open_redis(Settings.from_env(stack.env).redis, max_connections=2)
    try:
        runner = ScriptRunner(redis)
        positions, limiter = ReadPositions(runner), RateLimiter(runner)
        church = uuid.uuid4()
        limits = [(key_names.church_rate(church), 100)]
        key = key_names.read_position(church)
        assert (await limiter.charge(limits)).position is None
        assert (await limiter.charge(limits, position_key=key)).position == 0
        await positions.record(church, 2**40 + 5)
        await positions.record(church, 2**40)
        verdict = await limiter.charge(limits, position_key=key)
        assert verdict.position == 2**40 + 5
        assert verdict.remaining == 97
        assert 0 < await redis.pttl(key) <= 3_600_000
    finally:
        await redis.aclose()


@pytest.mark.anyio
async def test_the_relay_records_the_position_of_the_churches_it_publishes(
    stack: Stack,
) -> None:
    settings = Settings.from_env(stack.env)
    pool = await open_pool(settings.database)
    redis = open_redis(settings.redis, max_connections=2)
    church = uuid.uuid4()
    try:
        event = MemberCreatedEvent.new(MemberChanged(member_id=uuid.uuid4()))
        async with pool.connection() as conn:
            async with conn.transaction():
                await event_log.append(conn, [(church, ["inbox"], event)])
            cur = await conn.execute("SELECT (pg_current_wal_insert_lsn() - '0/0')::bigint")
            row = await cur.fetchone()
            assert row is not None
            committed = position_of(int(row[0]))
        # Whichever process's relay takes the row records the position.
        deadline = time.monotonic() + 5
        while True:
            raw = await redis.get(key_names.read_position(church))
            if raw is not None and int(raw) > 0:
                break
            assert time.monotonic() < deadline, "no read position recorded within 5 s"
            await asyncio.sleep(0.02)
        # The relay read it after this commit: at least where the WAL was then,
        # give or take what was inserted between the commit and our look.
        assert int(raw) >= committed - 10_000_000
    finally:
        await pool.close()
        await redis.aclose()


def test_position_of_steps_back_over_a_page_header() -> None:
    assert position_of(8192 * 7 + 24) == 8192 * 7
    assert position_of(8192 * 7 + 40) == 8192 * 7
    assert position_of(8192 * 7 + 64) == 8192 * 7 + 64
    assert position_of(8192 * 7) == 8192 * 7


# -- the marker -------------------------------------------------------------------------

STALE_OK = {
    "analytics": {"church_summary", "message_analytics"},
    "messages": {"get_message", "message_counts", "list_messages"},
    "recipients": {"list_recipients"},
    "conversations": {"list_conversations", "get_conversation", "list_conversation_messages"},
    "members": {"list_members", "export_member"},
    "member_messages": {"list_member_messages"},
    "media": {"get_media"},
    "groups": {"list_groups"},
    "audit": {"list_entries"},
    "branches": {"list_branches"},
    "recurring_schedules": {"list_recurring", "list_occurrences"},
    "templates": {"list_templates"},
    "canned_replies": {"list_canned_replies"},
    "group_keywords": {"list_keywords"},
    "conversation_search": {"search_conversations"},
    "webhook_endpoints": {"list_endpoints", "list_attempts"},
    "archive_index": {"archived_file", "archived_files", "archived_months", "erased_conversations"},
}
"""The reads the API serves from replicas: lists, analytics, exports, history,
message and conversation reads."""

ARCHIVE_READS = {
    "get_message",
    "message_counts",
    "list_recipients",
    "list_messages",
    "list_conversation_messages",
}
"""``ArchiveReader`` methods (storage/archive/reader.py) the API routes through
``read``: archived history, served where the live reads they continue are."""

FRESH_LISTS = {"list_api_keys", "list_staff", "list_invitations"}
"""Lists the API reads through ``read`` that stay on the primary: who holds a key or
a role is an access question, and these pages are rare."""

_WRITES = re.compile(
    r"\b(INSERT\s+INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM|nextval|setval|pg_advisory|"
    r"pg_try_advisory|TRUNCATE|CREATE|ALTER|DROP)\b",
    re.IGNORECASE,
)
_LOCKS = re.compile(r"\bFOR\s+(NO\s+KEY\s+)?(UPDATE|SHARE)\b", re.IGNORECASE)


def _functions(path: Path) -> dict[str, ast.AsyncFunctionDef | ast.FunctionDef]:
    tree = ast.parse(path.read_text())
    return {
        node.name: node
        for node in tree.body
        if isinstance(node, ast.AsyncFunctionDef | ast.FunctionDef)
    }


def _marked(node: ast.AsyncFunctionDef | ast.FunctionDef) -> bool:
    return any(isinstance(d, ast.Name) and d.id == "stale_ok" for d in node.decorator_list)


def test_the_api_reads_that_replicas_serve_are_marked() -> None:
    import importlib

    for module, names in STALE_OK.items():
        loaded = importlib.import_module(f"storage.pg.{module}")
        for name in names:
            assert is_stale_ok(getattr(loaded, name)), f"storage.pg.{module}.{name}"
    for name in ARCHIVE_READS:
        assert is_stale_ok(getattr(ArchiveReader, name)), f"ArchiveReader.{name}"


def test_every_read_the_api_routes_is_decided() -> None:
    """A repository function the API hands to ``read``, ``paged`` or
    ``church_listing`` is either marked or named fresh here on purpose."""
    marked = {name for names in STALE_OK.values() for name in names}
    routed: set[str] = set()
    archive_routed: set[str] = set()
    for path in sorted((ROOT / "api").glob("*.py")):
        if path.name == "listing.py":  # the helpers themselves
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
                continue
            args = node.args
            if node.func.id in ("read", "paged") and len(args) >= 2:
                target = args[1]
            elif node.func.id == "church_listing" and args:
                target = args[0]
            else:
                continue
            if isinstance(target, ast.Attribute) and target.attr in ARCHIVE_READS:
                archive_routed.add(target.attr)  # ``services.archive.<read>``
                continue
            assert isinstance(target, ast.Name), f"{path.name}:{node.lineno}: pass the function"
            routed.add(target.id)
    assert routed, "no routed reads found in api/"
    assert archive_routed == ARCHIVE_READS, ARCHIVE_READS ^ archive_routed
    assert routed <= marked | FRESH_LISTS, routed - marked - FRESH_LISTS
    assert not FRESH_LISTS & marked


def _locks_asked(call: ast.Call) -> bool:
    """The call passes ``lock=`` something other than a literal False."""
    return any(
        k.arg == "lock" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
        for k in call.keywords
    )


def test_no_function_that_writes_is_marked() -> None:
    """A marked function, and every function of its module it calls, sends no
    statement that writes, and locks rows only in a helper it calls without
    ``lock=`` (a read-only transaction, one snapshot over several statements, runs
    on a standby as well)."""
    found = 0
    for path in sorted((ROOT / "storage" / "pg").glob("*.py")):
        functions = _functions(path)
        for name, node in functions.items():
            if not _marked(node):
                continue
            found += 1
            seen: set[str] = set()
            todo = [(name, False)]
            while todo:
                current_name, may_lock = todo.pop()
                if current_name in seen:
                    continue
                seen.add(current_name)
                current = functions[current_name]
                for inner in ast.walk(current):
                    if isinstance(inner, ast.Constant) and isinstance(inner.value, str):
                        text = inner.value
                        assert not _WRITES.search(text), (
                            f"{path.name}:{name} (via {current_name}) writes: {text[:80]!r}"
                        )
                        assert may_lock or not _LOCKS.search(text), (
                            f"{path.name}:{name} (via {current_name}) locks: {text[:80]!r}"
                        )
                    if (
                        isinstance(inner, ast.Call)
                        and isinstance(inner.func, ast.Name)
                        and inner.func.id in functions
                    ):
                        assert not _locks_asked(inner), f"{path.name}:{name} asks for a lock"
                        # A helper with a ``lock`` switch, called without it, locks nothing.
                        callee = functions[inner.func.id]
                        switch = any(a.arg == "lock" for a in callee.args.kwonlyargs)
                        todo.append((inner.func.id, switch))
    assert found >= sum(len(n) for n in STALE_OK.values())
