"""The archive on a church with years of history: how fast months move out of
Postgres, how small they get, what it saves, and how fast they read back.

Starts the whole stack (embedded Postgres and Redis, fsync on unless ``--unsafe``),
builds history with ``koinonia demo --members 2000 --months 36`` (the issue's size),
then runs ``koinonia archive --before`` the current month minus ``--keep-months`` (24)
as an operator would, and reads the archived months back through the API. Prints:

- archive: wall time, rows and rows/s (the command's whole run: writing, reading back
  and verifying each file, dropping the partitions);
- bytes per row in the archive (the files) against in Postgres (the archived months'
  partitions with their indexes and TOAST, from ``pg_total_relation_size``);
- database size before and after (``pg_database_size``);
- read latency through the API, p50 and p99: the **first** read of each archived
  month (``GET /v1/messages/{id}/recipients`` of one of its broadcasts: the file is
  fetched, checked and decoded) and **warm** reads (message details, recipient pages
  and conversation threads of months already in the web process's cache).

Prints numbers; asserts nothing.

    uv run python bench/archive.py
    uv run python bench/archive.py --members 300 --months 30 --warm 400
    uv run python bench/archive.py --keep-months 12      # two thirds of the history out
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deploy.stack import Stack, free_ports  # noqa: E402
from storage.domain.ids import created_at_of  # noqa: E402
from storage.pg.pagination import encode_cursor  # noqa: E402

TABLES = ("message", "message_recipient", "conversation_message")


def koinonia(stack: Stack, *args: str, timeout: float = 3600) -> tuple[dict[str, Any], float]:
    uv = shutil.which("uv")
    command = [uv, "run", "--no-sync", "koinonia"] if uv else [sys.executable, "-m", "deploy.cli"]
    started = time.monotonic()
    # stderr passes through: the commands' progress is the bench's progress.
    done = subprocess.run(
        [*command, *args],
        cwd=ROOT,
        env=stack.env,
        stdout=subprocess.PIPE,
        text=True,
        timeout=timeout,
    )
    wall = time.monotonic() - started
    if done.returncode != 0:
        sys.exit(f"koinonia {' '.join(args)} failed (exit {done.returncode})")
    result: dict[str, Any] = json.loads(done.stdout)
    return result, wall


def partition_sizes(url: str) -> dict[str, tuple[int, int]]:
    """Every partition of the three tables: (bytes with indexes and TOAST, rows)."""
    out: dict[str, tuple[int, int]] = {}
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT c.relname, pg_total_relation_size(c.oid) FROM pg_inherits i "
            "JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent "
            "WHERE p.relname = ANY(%s)",
            (list(TABLES),),
        ).fetchall()
        for name, size in rows:
            count = conn.execute(f'SELECT count(*) FROM "{name}"').fetchone()
            out[name] = (int(size), int(count[0]) if count else 0)
    return out


def database_size(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CHECKPOINT")
        row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
        return int(row[0]) if row else 0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def timed_get(client: httpx.Client, path: str, **params: Any) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    answer = client.get(path, params=params)
    elapsed = time.perf_counter() - started
    if answer.status_code != 200:
        sys.exit(f"GET {path}: {answer.status_code} {answer.text[:300]}")
    body: dict[str, Any] = answer.json()
    return elapsed, body


def archived_broadcasts(client: httpx.Client) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(10_000):
        params: dict[str, Any] = {"limit": 100, "include_archived": "true"}
        if cursor:
            params["cursor"] = cursor
        _, body = timed_get(client, "/v1/messages", **params)
        rows += [m for m in body["data"] if m.get("archived")]
        cursor = body.get("next_cursor") or body.get("meta", {}).get("next_cursor")
        if not cursor:
            break
    return rows


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def run(args: argparse.Namespace) -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="koinonia-archive-bench-"))
    web_port, sim_port = free_ports(2)
    stack = Stack(
        data_dir,
        http_port=web_port,
        sim_port=sim_port,
        env={
            **os.environ,
            "KOINONIA_LOG_LEVEL": "WARNING",
            # The reads below are one client's hundreds of requests a minute.
            "KOINONIA_RATE_STARTER": "1000000",
            "KOINONIA_RATE_API_KEY": "1000000",
        },
        fast_unsafe=args.unsafe,
        quiet=True,
    )
    try:
        stack.start_stores()
        stack.start_processes()
        stack.wait_ready()
        url = stack.env["DATABASE_URL"]
        print(f"demo: {args.members} members x {args.months} months", file=sys.stderr)
        demo, demo_wall = koinonia(
            stack, "demo", "--members", str(args.members), "--months", str(args.months)
        )
        before_parts = partition_sizes(url)
        size_before = database_size(url)

        before = datetime.now(UTC).date().replace(day=1)
        for _ in range(args.keep_months):
            before = (before - timedelta(days=1)).replace(day=1)
        report, archive_wall = koinonia(stack, "archive", "--before", f"{before:%Y-%m}")
        after_parts = partition_sizes(url)
        size_after = database_size(url)
        dropped = {name: v for name, v in before_parts.items() if name not in after_parts}
        pg_bytes = sum(v[0] for v in dropped.values())
        pg_rows = sum(v[1] for v in dropped.values())

        print()
        print(f"demo history built in {demo_wall:.1f} s")
        print(
            f"archive: {len(report['months'])} months, {report['files']} files, "
            f"{report['rows']:,} rows in {archive_wall:.1f} s = "
            f"{report['rows'] / archive_wall:,.0f} rows/s (whole command: write, read back, "
            "verify, drop)"
        )
        if report["rows"] != pg_rows:
            print(f"  NOTE: the dropped partitions held {pg_rows:,} rows (all churches)")
        print(
            f"bytes per row: archive {report['bytes'] / max(report['rows'], 1):.1f}, "
            f"Postgres {pg_bytes / max(pg_rows, 1):.1f} (partitions with indexes and TOAST; "
            f"{mib(report['bytes'])} against {mib(pg_bytes)})"
        )
        all_bytes = sum(v[0] for v in before_parts.values())
        print(
            f"database: {mib(size_before)} before, {mib(size_after)} after "
            f"({(size_after - size_before) / size_before:+.0%}); the archived months were "
            f"{pg_bytes / all_bytes:.0%} of the three tables' {mib(all_bytes)} "
            f"({len(report['months'])} of the {args.months + 4} months with partitions)"
        )

        client = httpx.Client(
            base_url=f"http://127.0.0.1:{web_port}",
            headers={"Authorization": f"Bearer {demo['api_key']}"},
            timeout=60,
        )
        broadcasts = archived_broadcasts(client)
        by_month: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for m in broadcasts:
            by_month[created_at_of(uuid.UUID(m["id"])).strftime("%Y-%m")].append(m)
        if not by_month:
            sys.exit("no archived broadcast found through the API")
        # The listing above read every month's message file; the recipients files are
        # still cold, so each month's first recipients page is a first read.
        first: list[float] = []
        for month in sorted(by_month):
            elapsed, _ = timed_get(client, f"/v1/messages/{by_month[month][0]['id']}/recipients")
            first.append(elapsed)
        _, body = timed_get(client, "/v1/conversations", limit=100)
        conversations = [c["id"] for c in body["data"]]
        rng = random.Random(1)
        warm: dict[str, list[float]] = defaultdict(list)
        for _ in range(args.warm):
            kind = rng.choice(("detail", "recipients", "thread"))
            if kind == "thread" and conversations:
                # Scrolled back into an archived month: the page after a cursor at
                # that month's end.
                month_end = created_at_of(uuid.UUID(rng.choice(broadcasts)["id"]))
                cursor = encode_cursor(month_end, uuid.UUID(int=(1 << 128) - 1))
                path = f"/v1/conversations/{rng.choice(conversations)}/messages"
                elapsed, _ = timed_get(client, path, cursor=cursor)
                warm[kind].append(elapsed)
                continue
            else:
                message = rng.choice(by_month[rng.choice(sorted(by_month))])
                suffix = "/recipients" if kind == "recipients" else ""
                path = f"/v1/messages/{message['id']}{suffix}"
            elapsed, _ = timed_get(client, path)
            warm[kind].append(elapsed)
        everything = [v for values in warm.values() for v in values]
        print(
            f"first read of a month (recipients of one broadcast), {len(first)} months: "
            f"p50 {percentile(first, 0.5) * 1000:.0f} ms, p99 {percentile(first, 0.99) * 1000:.0f} "
            f"ms, max {max(first) * 1000:.0f} ms"
        )
        for kind, values in sorted(warm.items()):
            print(
                f"warm read, {kind:<10} ({len(values)}): p50 {percentile(values, 0.5) * 1000:.1f} "
                f"ms, p99 {percentile(values, 0.99) * 1000:.1f} ms"
            )
        print(
            f"warm read, all ({len(everything)}): p50 "
            f"{statistics.median(everything) * 1000:.1f} ms, p99 "
            f"{percentile(everything, 0.99) * 1000:.1f} ms"
        )
    finally:
        stack.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=2000)
    parser.add_argument("--months", type=int, default=36)
    parser.add_argument(
        "--keep-months",
        type=int,
        default=24,
        help="months kept in the database: --before is the current month minus this (24)",
    )
    parser.add_argument("--warm", type=int, default=600, help="warm reads to time (600)")
    parser.add_argument("--unsafe", action="store_true", help="Postgres with fsync off")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
