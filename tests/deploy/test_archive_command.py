"""``koinonia archive`` beside a running stack: old months moved to the object store,
resumable after kill -9, safe when two run at once, erasures compacted.

Partitions hold every church's rows, so these tests archive only months no other test
writes: history from ``koinonia demo --months 15``, archived with ``--before`` the
current month minus 9 (tests/deploy/test_demo.py writes the last 4 months only).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, date, datetime
from typing import Any

import httpx
import psycopg
import pytest

from deploy.cli import main
from deploy.stack import Stack
from storage.archive.archiver import add_months
from storage.archive.format import read_month, verify, zstd
from storage.archive.schema import TABLES, ArchivedConversationMessage
from storage.objects import ObjectStore, open_object_store
from storage.pg.archive_rows import ARCHIVE_LOCK
from storage.pg.partitions import month_start, partition_name
from storage.process.settings import Settings
from tests.deploy.test_demo import ROOT, STORES, run_demo

NOW = datetime.now(UTC).date()
BEFORE = add_months(month_start(NOW), -9)
"""Months -15 to -10 are archived; only these tests' demo churches write there."""

# The key of each table's rows in a file: what "every row exactly once" counts.
_ROW_KEY = {
    "message": ("id",),
    "message_recipient": ("message_id", "id"),
    "conversation_message": ("id",),
}


def koinonia(stack: Stack) -> tuple[list[str], dict[str, str]]:
    """The command and environment of an operator command beside ``koinonia dev``: the
    interpreter itself (not through ``uv run``), so a signal reaches the command; the
    object store the stack's processes use, so the API reads what it archives."""
    env = {k: v for k, v in stack.env.items() if k not in STORES}
    env["KOINONIA_OBJECT_STORE_URL"] = stack_store(stack).url
    return [sys.executable, "-m", "deploy.cli"], {**env, "KOINONIA_DATA_DIR": str(stack.data_dir)}


def run_archive(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    command, env = koinonia(stack)
    return subprocess.run(
        [*command, "archive", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def start_archive(stack: Stack, *args: str) -> subprocess.Popen[str]:
    command, env = koinonia(stack)
    return subprocess.Popen(
        [*command, "archive", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def stack_store(stack: Stack) -> ObjectStore:
    """The store the stack's processes use (their environment's; a relative data
    folder resolves against the working directory they share with the tests)."""
    return open_object_store(Settings.from_env(stack.env))


def db(stack: Stack) -> psycopg.Connection[Any]:
    return psycopg.connect(stack.env["DATABASE_URL"], autocommit=True)


def make_history(stack: Stack, members: int = 12, seed: int = 3) -> dict[str, str]:
    done = run_demo(stack, "--members", str(members), "--months", "15", "--seed", str(seed))
    assert done.returncode == 0, done.stderr
    created: dict[str, str] = json.loads(done.stdout)
    return created


def live_rows(stack: Stack, church_id: str) -> dict[tuple[date, str], list[tuple[Any, ...]]]:
    """The church's rows before BEFORE, by month and table: their keys, and for
    conversation texts the thread's status as the API reads it."""
    found: dict[tuple[date, str], list[tuple[Any, ...]]] = {}
    queries = {
        "message": "SELECT created_at, id FROM message WHERE church_id = %s AND created_at < %s",
        "message_recipient": "SELECT created_at, message_id, id FROM message_recipient "
        "WHERE church_id = %s AND created_at < %s",
        "conversation_message": "SELECT cm.created_at, cm.id, coalesce(r.status, cm.status) "
        "FROM conversation_message cm LEFT JOIN message_recipient r ON cm.direction = 'outbound' "
        "AND r.church_id = cm.church_id AND r.message_id = cm.id "
        "AND r.created_at = cm.created_at WHERE cm.church_id = %s AND cm.created_at < %s",
    }
    with db(stack) as conn:
        for table, query in queries.items():
            for created_at, *key in conn.execute(query, (church_id, BEFORE)).fetchall():
                month = month_start(created_at.astimezone(UTC).date())
                found.setdefault((month, table), []).append(tuple(key))
    return found


async def archived_rows(
    stack: Stack, store: ObjectStore, church_id: str
) -> dict[tuple[date, str], list[tuple[Any, ...]]]:
    """The church's rows in its indexed files (each verified), in the same shape."""
    found: dict[tuple[date, str], list[tuple[Any, ...]]] = {}
    with db(stack) as conn:
        files = conn.execute(
            "SELECT month, table_name, object_key, sha256, row_count FROM archive_file "
            "WHERE church_id = %s",
            (church_id,),
        ).fetchall()
    for month, table, key, sha256, rows in files:
        data = await store.get(key)
        verify(data, sha256, rows)
        for row in read_month(data, table):
            values = tuple(getattr(row, k) for k in _ROW_KEY[table])
            if table == "conversation_message":
                values += (row.status,)
            found.setdefault((month, table), []).append(values)
    return found


def as_sets(rows: dict[tuple[date, str], list[tuple[Any, ...]]]) -> dict[Any, Counter[Any]]:
    return {k: Counter(v) for k, v in rows.items()}


async def objects_match_index(stack: Stack, store: ObjectStore, church_id: str) -> None:
    """Every object under the church's archive prefix is an indexed file, and back."""
    with db(stack) as conn:
        indexed = {
            r[0]
            for r in conn.execute(
                "SELECT object_key FROM archive_file WHERE church_id = %s", (church_id,)
            ).fetchall()
        }
    stored = set(await store.list(f"archive/{church_id}/"))
    assert stored == indexed


def partitions_left(stack: Stack, months: list[date]) -> list[str]:
    with db(stack) as conn:
        return [
            partition_name(t, m)
            for m in months
            for t in TABLES
            if conn.execute("SELECT to_regclass(%s)", (partition_name(t, m),)).fetchone() != (None,)
        ]


def report_of(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1, done.stdout
    report: dict[str, Any] = json.loads(done.stdout)
    assert sorted(report) == ["before", "bytes", "compacted", "files", "months", "rows"]
    return report


@pytest.fixture(scope="module")
def archived(stack: Stack) -> dict[str, Any]:
    """A demo church whose months before BEFORE were archived by one run."""
    demo = make_history(stack, members=60)
    before = live_rows(stack, demo["church_id"])
    assert len({m for m, _ in before}) >= 4, sorted(before)
    done = run_archive(stack, "--before", f"{BEFORE:%Y-%m}")
    return {"demo": demo, "before": before, "run": done, "report": report_of(done)}


@pytest.mark.anyio
async def test_archive_moves_the_old_months(stack: Stack, archived: dict[str, Any]) -> None:
    church_id = archived["demo"]["church_id"]
    before: dict[tuple[date, str], list[tuple[Any, ...]]] = archived["before"]
    report = archived["report"]
    months = sorted({m for m, _ in before})
    assert report["before"] == f"{BEFORE:%Y-%m}"
    assert {f"{m:%Y-%m}" for m in months} <= set(report["months"])
    assert report["files"] >= len(before)
    assert report["rows"] >= sum(len(v) for v in before.values())
    assert report["bytes"] > 0
    store = stack_store(stack)
    # Every row once, in the file of its month and table; conversation texts with the
    # status the thread showed live.
    assert as_sets(await archived_rows(stack, store, church_id)) == as_sets(before)
    await objects_match_index(stack, store, church_id)
    assert partitions_left(stack, months) == []
    with db(stack) as conn:
        states = dict(
            conn.execute(
                "SELECT month, state FROM archive_month WHERE month = ANY(%s)", (months,)
            ).fetchall()
        )
        # Nothing of those months is left live; the recent months are untouched.
        assert conn.execute(
            "SELECT count(*) FROM message WHERE church_id = %s AND created_at < %s",
            (church_id, BEFORE),
        ).fetchone() == (0,)
        assert conn.execute(
            "SELECT count(*) FROM message WHERE church_id = %s", (church_id,)
        ).fetchone() != (0,)
    assert states == dict.fromkeys(months, "dropped")
    stderr = archived["run"].stderr
    assert f"using the stack of `koinonia dev` in {stack.data_dir}" in stderr
    assert "archive: writing " in stderr, stderr
    assert "rows/s" in stderr, stderr
    for m in months:
        assert f"archive: {m:%Y-%m} archived" in stderr, stderr

    # Run again: nothing left to do, nothing written twice.
    again = report_of(run_archive(stack, "--before", f"{BEFORE:%Y-%m}"))
    assert (again["files"], again["rows"]) == (0, 0)
    assert as_sets(await archived_rows(stack, store, church_id)) == as_sets(before)


@pytest.mark.anyio
async def test_killed_mid_archive_then_two_runs_at_once(stack: Stack) -> None:
    demo = make_history(stack, members=30, seed=4)
    church_id = demo["church_id"]
    before = live_rows(stack, church_id)
    months = sorted({m for m, _ in before})
    run = start_archive(stack, "--before", f"{BEFORE:%Y-%m}")
    assert run.stderr is not None
    try:
        # The first file line comes as the first church's first file is indexed: the
        # month is half written and no partition dropped yet.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = run.stderr.readline()
            assert line, "the run ended before writing a file"
            if line.startswith("archive: writing "):
                break
        os.kill(run.pid, signal.SIGKILL)
    finally:
        run.kill()
        run.wait(timeout=30)
    assert run.returncode == -signal.SIGKILL
    # Killed with months still to do (its partitions are still there).
    assert partitions_left(stack, months), "the run finished before the kill"

    # Two runs at once resume it. This test holds the run's lock first, as a long
    # run would, so both meet it whatever their start-up times.
    with db(stack) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (ARCHIVE_LOCK,))
        runs = [start_archive(stack, "--before", f"{BEFORE:%Y-%m}") for _ in range(2)]
        try:
            for one in runs:
                assert one.stderr is not None
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    line = one.stderr.readline()
                    assert line, "the run ended without waiting"
                    if line.startswith("archive: waiting for another run"):
                        break
            holder.execute("SELECT pg_advisory_unlock(%s)", (ARCHIVE_LOCK,))
            outputs = [one.communicate(timeout=60) for one in runs]
        finally:
            for one in runs:
                one.kill()
                one.wait(timeout=30)
    assert [one.returncode for one in runs] == [0, 0], outputs
    reports = [json.loads(out) for out, _ in outputs]
    # One finished the work, the other found nothing left.
    assert sorted(r["files"] == 0 for r in reports) == [False, True], reports
    assert {f"{m:%Y-%m}" for m in months} <= {m for r in reports for m in r["months"]}
    store = stack_store(stack)
    assert as_sets(await archived_rows(stack, store, church_id)) == as_sets(before)
    await objects_match_index(stack, store, church_id)
    assert partitions_left(stack, months) == []


@pytest.mark.parametrize(
    ("before", "message"),
    [
        (f"{month_start(NOW):%Y-%m}", f"koinonia: --before must be {add_months(NOW, -1):%Y-%m}"),
        (f"{add_months(NOW, 1):%Y-%m}", f"koinonia: --before must be {add_months(NOW, -1):%Y-%m}"),
        ("2024-13", "koinonia: --before must be a month as YYYY-MM"),
        ("last-year", "koinonia: --before must be a month as YYYY-MM"),
        ("2024-1", "koinonia: --before must be a month as YYYY-MM"),
    ],
)
def test_too_recent_or_bad_before_is_refused(
    stack: Stack, before: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with db(stack) as conn:
        count = "SELECT (SELECT count(*) FROM archive_month), (SELECT count(*) FROM archive_file)"
        was = conn.execute(count).fetchone()
        with pytest.raises(SystemExit) as ended:
            main(["archive", "--before", before])
        assert ended.value.code == 2
        out, err = capsys.readouterr()
        assert out == ""
        assert err.startswith(message), err
        assert conn.execute(count).fetchone() == was


def test_the_previous_month_is_the_latest_before() -> None:
    """``--before`` = the previous month archives the month before it: allowed."""
    from deploy.cli import _archive_before

    assert _archive_before(f"{add_months(NOW, -1):%Y-%m}", NOW, 24) == add_months(
        month_start(NOW), -1
    )
    assert _archive_before(None, NOW, 24) == add_months(month_start(NOW), -24)


@pytest.mark.anyio
async def test_an_erased_members_archived_text_is_rewritten_away(
    stack: Stack, archived: dict[str, Any]
) -> None:
    church_id = archived["demo"]["church_id"]
    store = stack_store(stack)
    with db(stack) as conn:
        files = conn.execute(
            "SELECT month, object_key FROM archive_file WHERE church_id = %s "
            "AND table_name = 'conversation_message' ORDER BY month",
            (church_id,),
        ).fetchall()
    assert files
    # A conversation with text in an archived month.
    _, key = files[0]
    texts = read_month(await store.get(key), "conversation_message")
    target = next(t for t in texts if isinstance(t, ArchivedConversationMessage) and t.body)
    assert isinstance(target, ArchivedConversationMessage)
    conversation_id = target.conversation_id
    with db(stack) as conn:
        row = conn.execute(
            "SELECT member_id FROM conversation WHERE church_id = %s AND id = %s",
            (church_id, conversation_id),
        ).fetchone()
    assert row is not None
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{stack.http_port}",
        headers={"Authorization": f"Bearer {archived['demo']['api_key']}"},
        timeout=10,
    ) as api:
        erased = await api.delete(f"/v1/members/{row[0]}")
        assert erased.status_code in (200, 204), erased.text
    with db(stack) as conn:
        listed = (
            "SELECT count(*) FROM archive_erasure WHERE church_id = %s AND conversation_id = %s"
        )
        assert conn.execute(listed, (church_id, conversation_id)).fetchone() == (1,)

    report = report_of(run_archive(stack, "--before", f"{BEFORE:%Y-%m}"))
    assert report["compacted"] >= 1

    needle = str(conversation_id).encode()
    seen = 0
    with db(stack) as conn:
        assert conn.execute(listed, (church_id, conversation_id)).fetchone() == (0,)
        now_indexed = conn.execute(
            "SELECT table_name, object_key FROM archive_file WHERE church_id = %s "
            "AND table_name <> 'message_recipient'",
            (church_id,),
        ).fetchall()
    assert key not in {k for _, k in now_indexed}
    assert not await store.exists(key)
    for table, object_key in now_indexed:
        # The raw text, as anyone with the object store could read it.
        raw = zstd.decompress(await store.get(object_key))
        for line in raw.split(b"\n"):
            if needle not in line:
                continue
            value = json.loads(line)
            if value.get("conversation_id") != str(conversation_id):
                continue  # the header, whose frame index names the conversation
            seen += 1
            assert value["body"] == "", value
            if table == "conversation_message":
                assert value["media"] == [], value
    assert seen >= 1
    await objects_match_index(stack, store, church_id)
