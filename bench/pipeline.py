"""End-to-end broadcast pipeline benchmark: accept → materialize → send → delivered.

Runs the real stack (embedded Postgres and Redis unless DATABASE_URL /
REDIS_URL are set, the simulator at zero latency, web, worker(s), scheduler),
seeds N members into one group with COPY (setup, not measured), posts one
broadcast through the REST API and follows it to the end. Prints numbers; it
asserts nothing.

    uv run python bench/pipeline.py                 # 20,000 recipients
    uv run python bench/pipeline.py --recipients 50000 --workers 2 --web-workers 2
    uv run python bench/pipeline.py --redis standalone,cluster --recipients 10000
    uv run python bench/pipeline.py --recipients 5000 --profile /tmp/prof   # py-spy, as root

``--redis standalone,cluster`` runs the same broadcast on a standalone Redis and
then on an embedded Redis Cluster (3 masters, 3 replicas, as
``KOINONIA_DEV_REDIS_CLUSTER=1`` starts it), each on a fresh stack, and prints
the two side by side; ``--rounds 2`` alternates the order (standalone first,
then cluster first) so that background load on a shared machine falls on both.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deploy.stack import Stack, free_ports  # noqa: E402
from storage.domain.ids import uuid7  # noqa: E402
from storage.domain.phones import PhoneVault  # noqa: E402
from storage.process.settings import Settings  # noqa: E402


def say(text: str) -> None:
    print(f"[pipeline] {text}", file=sys.stderr, flush=True)


def seed_members(
    url: str,
    vault: PhoneVault,
    church_id: uuid.UUID,
    group_id: uuid.UUID,
    n: int,
    *,
    first: int = 2000000,
    last_name: str = "Bench",
) -> None:
    """``n`` members in one group through COPY; phones ``+1201`` + ``first`` ..
    ``first + n`` (give churches of one run distinct ranges, so no two text the same
    number)."""
    started = time.perf_counter()
    with psycopg.connect(url) as conn:
        with conn.cursor().copy(
            "COPY member (church_id, id, first_name, last_name, phone_cipher, phone_hash) FROM STDIN"
        ) as copy:
            ids = []
            for i in range(n):
                phone = f"+1201{first + i:07d}"
                member_id = uuid7()
                ids.append(member_id)
                copy.write_row(
                    (
                        church_id,
                        member_id,
                        f"Member{i}",
                        last_name,
                        vault.encrypt(church_id, phone),
                        vault.lookup_hash(phone),
                    )
                )
                if i and i % 10000 == 0:
                    say(f"seeded {i:,} members")
        with conn.cursor().copy(
            "COPY group_membership (church_id, group_id, member_id) FROM STDIN"
        ) as copy:
            for member_id in ids:
                copy.write_row((church_id, group_id, member_id))
        conn.commit()
        # What the CSV importer does after a bulk load: fresh statistics.
        conn.execute("ANALYZE member")
        conn.execute("ANALYZE group_membership")
    say(f"seeded {n:,} members in {time.perf_counter() - started:.1f} s")


def _process_table() -> dict[int, tuple[int, float, str]]:
    """pid -> (parent pid, CPU seconds used so far, command line) for every process."""
    table: dict[int, tuple[int, float, str]] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        table[int(entry.name)] = (
            int(fields[1]),
            (int(fields[11]) + int(fields[12])) / tick,
            cmdline,
        )
    return table


def stack_cpu(stack: Stack) -> dict[str, float]:
    """CPU seconds used so far by each part of the stack, child processes included
    (uvicorn workers, Postgres backends); Postgres and Redis found by their data folder.
    On a cluster, "redis" is the sum over its six nodes (replicas apply every write
    too: what a cluster costs, not only its masters)."""
    table = _process_table()
    roots = {name: process.pid for name, process in stack.processes.items()}
    cluster_pids = (
        [node.pid for node in stack.redis_cluster.nodes if node.pid is not None]
        if stack.redis_cluster is not None
        else []
    )
    redis_address = stack.env.get("REDIS_URL", "").split("//")[-1].split("/")[0]
    for pid, (_, _, cmdline) in table.items():
        if str(stack.data_dir) in cmdline and "postgres" in cmdline and "-D" in cmdline:
            roots["postgres"] = pid
        elif "-server" in cmdline and redis_address and redis_address in cmdline:
            roots["redis"] = pid
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    used: dict[str, float] = {}
    if cluster_pids:
        used["redis"] = sum(table[pid][1] for pid in cluster_pids if pid in table)
    for name, root in roots.items():
        total, todo = 0.0, [root]
        while todo:
            pid = todo.pop()
            if pid in table:
                total += table[pid][1]
                todo += children.get(pid, [])
        used[name] = total
    return used


def start_profiles(stack: Stack, folder: str | None, label: str) -> list[subprocess.Popen[bytes]]:
    """``py-spy record`` (collapsed stacks, child processes included) on every Python
    process of the stack, for the measured part of the run (``--profile``)."""
    if not folder:
        return []
    spy = shutil.which("py-spy")
    if spy is None:
        raise SystemExit("--profile needs py-spy on PATH (and the rights to attach: root)")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    return [
        subprocess.Popen(
            [
                spy,
                "record",
                "--pid",
                str(process.pid),
                "--subprocesses",
                "--nonblocking",
                "--rate",
                "200",
                "--format",
                "raw",
                "-o",
                str(out / f"{label}-{name}.txt"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name, process in stack.processes.items()
    ]


def stop_profiles(profilers: list[subprocess.Popen[bytes]]) -> None:
    for profiler in profilers:
        profiler.send_signal(signal.SIGINT)
    for profiler in profilers:
        try:
            profiler.wait(timeout=30)
        except subprocess.TimeoutExpired:
            profiler.kill()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def follow(
    api: httpx.AsyncClient, message_id: str, n: int, timeout_s: float
) -> list[tuple[float, dict[str, int]]]:
    samples: list[tuple[float, dict[str, int]]] = []
    deadline = time.monotonic() + timeout_s
    last_print = 0.0
    while time.monotonic() < deadline:
        counts = (await api.get(f"/v1/messages/{message_id}")).json()["data"]["counts"]
        now = time.monotonic()
        samples.append((now, counts))
        final = counts["delivered"] + counts["failed"] + counts["undelivered"] + counts["skipped"]
        if now - last_print > 2:
            say(
                f"sent+ {counts['sent'] + counts['delivered']:,}  delivered {counts['delivered']:,} / {n:,}"
            )
            last_print = now
        if final >= n:
            break
        await asyncio.sleep(0.25)
    return samples


def rate_between(samples: list[tuple[float, dict[str, int]]], key: str, n: int) -> float:
    """Recipients/s for ``key`` between 10 % and 90 % of n (the sustained part)."""

    def reached(fraction: float) -> float | None:
        for t, counts in samples:
            value = (
                counts["delivered"]
                if key == "delivered"
                else counts["sent"] + counts["delivered"] + counts["undelivered"]
            )
            if value >= fraction * n:
                return t
        return None

    t10, t90 = reached(0.1), reached(0.9)
    if t10 is None or t90 is None or t90 <= t10:
        return float("nan")
    return 0.8 * n / (t90 - t10)


@dataclass
class Figures:
    """One run's results, printed alone or side by side with another run's."""

    redis: str
    accepted_ms: float
    materialize_s: float
    sent_rate: float
    delivered_rate: float
    delivered: int
    elapsed_s: float
    latencies: list[float]
    cpu_ms: dict[str, float]
    """CPU milliseconds per delivered recipient, by process."""

    @property
    def cpu_total_ms(self) -> float:
        return sum(self.cpu_ms.values())


async def run(args: argparse.Namespace, redis_mode: str) -> Figures:
    data_dir = Path(tempfile.mkdtemp(prefix="koinonia-bench-"))
    web_port, sim_port = free_ports(2)
    env = dict(os.environ)
    env.update(
        {
            "KOINONIA_LOG_LEVEL": os.environ.get("KOINONIA_LOG_LEVEL", "WARNING"),
            "KOINONIA_DB_POOL_MAX": "20",
        }
    )
    if redis_mode == "cluster":
        # The stack starts its embedded cluster as ``koinonia dev`` does.
        for name in ("REDIS_URL", "REDIS_CLUSTER_NODES"):
            env.pop(name, None)
        env["KOINONIA_DEV_REDIS_CLUSTER"] = "1"
    else:
        env.pop("KOINONIA_DEV_REDIS_CLUSTER", None)
    # The load generator polls the API from one address: plan and key limits out of the way.
    env.update({"KOINONIA_RATE_STARTER": "1000000", "KOINONIA_RATE_API_KEY": "1000000"})
    # The pipeline's own capacity is measured: no account limit of ours (the
    # default, 1,000 texts/s, would be the ceiling); per-number limits are off.
    env.setdefault("KOINONIA_SEND_RATE_PER_ACCOUNT", "0")
    stack = Stack(
        data_dir,
        http_port=web_port,
        sim_port=sim_port,
        env=env,
        fast_unsafe=args.unsafe,
        quiet=False,
    )
    try:
        await asyncio.to_thread(stack.start_stores)
        stack.spawn("simulator", "simulator")
        web_args = ["web"] + (["--workers", str(args.web_workers)] if args.web_workers > 1 else [])
        stack.spawn("web", *web_args)
        for i in range(args.workers):
            stack.spawn(f"worker{i}", "worker", "--name", f"bench-{i}")
        stack.spawn("scheduler", "scheduler")
        await asyncio.to_thread(stack.wait_ready)
        settings = Settings.from_env(stack.env)
        vault = PhoneVault(settings.security.phone_key, settings.security.lookup_key)
        base = f"http://127.0.0.1:{web_port}"
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            signup = await client.post(
                "/v1/auth/signup",
                json={
                    "church_name": "Bench",
                    "email": f"bench-{uuid.uuid4().hex[:8]}@example.org",
                    "password": "benchmark-password",
                },
            )
            church_id = uuid.UUID(signup.json()["data"]["church"]["id"])
            csrf = client.cookies["koinonia_csrf"]
            key = (
                await client.post(
                    "/v1/api-keys", json={"name": "bench"}, headers={"X-CSRF-Token": csrf}
                )
            ).json()["data"]["key"]
        async with httpx.AsyncClient(
            base_url=base, timeout=30, headers={"Authorization": f"Bearer {key}"}
        ) as api:
            group = (await api.post("/v1/groups", json={"name": "All"})).json()["data"]["id"]
            seed_members(
                stack.env["DATABASE_URL"], vault, church_id, uuid.UUID(group), args.recipients
            )
            # Warm the path once so the measured 202 is not a cold start.
            await api.get("/v1/messages?limit=1")
            say(f"posting the broadcast ({redis_mode} Redis)")
            profilers = start_profiles(stack, args.profile, redis_mode)
            cpu_before = stack_cpu(stack)
            t0 = time.perf_counter()
            answer = await api.post(
                "/v1/messages", json={"body": "Bench broadcast", "target": {"group_ids": [group]}}
            )
            accepted_ms = (time.perf_counter() - t0) * 1000
            assert answer.status_code == 202, answer.text
            message_id = answer.json()["data"]["id"]
            samples = await follow(api, message_id, args.recipients, args.timeout)
            cpu_after = stack_cpu(stack)
            stop_profiles(profilers)
        with psycopg.connect(stack.env["DATABASE_URL"]) as conn:
            row = conn.execute(
                "SELECT extract(epoch FROM materialized_at - created_at), created_at FROM message WHERE id = %s",
                (uuid.UUID(message_id),),
            ).fetchone()
            assert row is not None
            materialize_s = float(row[0]) if row[0] is not None else float("nan")
            latencies = [
                float(r[0])
                for r in conn.execute(
                    "SELECT extract(epoch FROM r.updated_at - m.created_at) FROM message_recipient r "
                    "JOIN message m ON m.church_id = r.church_id AND m.id = r.message_id AND m.created_at = r.created_at "
                    "WHERE r.message_id = %s AND r.status = 'delivered'",
                    (uuid.UUID(message_id),),
                ).fetchall()
            ]
        final = samples[-1][1]
        # CPU per delivered recipient, by process: what the two cores were spent on
        # (independent of whatever else runs on the machine).
        spent = {name: cpu_after.get(name, 0.0) - cpu_before.get(name, 0.0) for name in cpu_after}
        return Figures(
            redis=redis_mode,
            accepted_ms=accepted_ms,
            materialize_s=materialize_s,
            sent_rate=rate_between(samples, "sent", args.recipients),
            delivered_rate=rate_between(samples, "delivered", args.recipients),
            delivered=final["delivered"],
            elapsed_s=samples[-1][0] - samples[0][0],
            latencies=latencies,
            cpu_ms={name: 1000 * used / max(1, final["delivered"]) for name, used in spent.items()},
        )
    finally:
        stack.stop()


def print_one(figures: Figures, args: argparse.Namespace) -> None:
    n = args.recipients
    latencies = figures.latencies
    print()
    print(f"recipients               {n:,}   Redis {figures.redis}")
    print(
        f"web processes            {args.web_workers}   workers {args.workers}   durable={'no' if args.unsafe else 'yes'}"
    )
    print(f"accepted (202) in        {figures.accepted_ms:.1f} ms")
    print(
        f"materialized             {figures.materialize_s * 1000:.0f} ms after acceptance "
        f"({n / figures.materialize_s:,.0f} rows/s incl. queue hop)"
    )
    print(f"sent rate (10-90 %)      {figures.sent_rate:,.0f} recipients/s")
    print(f"delivered rate (10-90 %) {figures.delivered_rate:,.0f} recipients/s")
    print(f"delivered                {figures.delivered:,} of {n:,} in {figures.elapsed_s:.1f} s")
    print(
        f"accept→delivered p50     {percentile(latencies, 0.5):.2f} s   p99 {percentile(latencies, 0.99):.2f} s"
        f"   mean {statistics.fmean(latencies) if latencies else float('nan'):.2f} s"
    )
    total_ms = figures.cpu_total_ms
    # What else the shared machine was doing: rates move with it, CPU per recipient less.
    print("load average (1/5/15)    " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    print(
        "CPU per recipient        "
        + ", ".join(
            f"{name} {ms:.2f}" for name, ms in sorted(figures.cpu_ms.items(), key=lambda kv: -kv[1])
        )
        + f"  = {total_ms:.2f} ms ({os.cpu_count()} cores: at most ~{1000 * (os.cpu_count() or 1) / total_ms:,.0f} recipients/s)"
    )


def print_side_by_side(results: list[Figures], args: argparse.Namespace) -> None:
    """One column per run (in the order they ran), then the medians per Redis."""

    def row(label: str, values: list[str]) -> None:
        print(f"| {label} | " + " | ".join(values) + " |")

    print()
    print(
        f"{args.recipients:,} recipients, {args.web_workers} web process(es), {args.workers} worker(s), "
        f"durable={'no' if args.unsafe else 'yes'}, {os.cpu_count()} cores shared by everything"
    )
    print()
    row("", [f"{f.redis} (run {i + 1})" for i, f in enumerate(results)])
    row("---", ["---"] * len(results))
    row("202 ms", [f"{f.accepted_ms:.0f}" for f in results])
    row("materialized ms", [f"{1000 * f.materialize_s:.0f}" for f in results])
    row("sent/s (10-90 %)", [f"{f.sent_rate:,.0f}" for f in results])
    row("delivered/s (10-90 %)", [f"{f.delivered_rate:,.0f}" for f in results])
    row("delivered", [f"{f.delivered:,} in {f.elapsed_s:.1f} s" for f in results])
    row(
        "accept→delivered p50 / p99 s",
        [
            f"{percentile(f.latencies, 0.5):.1f} / {percentile(f.latencies, 0.99):.1f}"
            for f in results
        ],
    )
    names = sorted(
        {name for f in results for name in f.cpu_ms}, key=lambda n: -results[0].cpu_ms.get(n, 0)
    )
    for name in names:
        row(f"CPU ms/recipient: {name}", [f"{f.cpu_ms.get(name, 0.0):.3f}" for f in results])
    row("**CPU ms/recipient, total**", [f"**{f.cpu_total_ms:.2f}**" for f in results])
    modes = list(dict.fromkeys(f.redis for f in results))
    if len(modes) != 2:
        return
    medians = {
        mode: (
            statistics.median(f.delivered_rate for f in results if f.redis == mode),
            statistics.median(f.cpu_total_ms for f in results if f.redis == mode),
            statistics.median(f.cpu_ms.get("redis", 0.0) for f in results if f.redis == mode),
        )
        for mode in modes
    }
    a, b = ("standalone", "cluster") if set(modes) == {"standalone", "cluster"} else modes
    print()
    print(
        f"median over runs, {b} ÷ {a}: delivered/s {medians[b][0] / medians[a][0]:.2f}x, "
        f"CPU per recipient {medians[b][1] / medians[a][1]:.2f}x "
        f"(Redis alone {medians[b][2] / max(1e-9, medians[a][2]):.2f}x)"
    )


async def run_all(args: argparse.Namespace) -> None:
    results: list[Figures] = []
    for round_ in range(args.rounds):
        # Alternate the order: whatever else the machine does falls on both.
        order = args.redis if round_ % 2 == 0 else list(reversed(args.redis))
        for mode in order:
            results.append(await run(args, mode))
            print_one(results[-1], args)
    if len(results) > 1:
        print_side_by_side(results, args)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipients", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--web-workers", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument(
        "--unsafe", action="store_true", help="Postgres without fsync (faster, not durable)"
    )
    parser.add_argument(
        "--redis",
        type=lambda s: [m.strip() for m in s.split(",") if m.strip()],
        default=["standalone"],
        help="standalone, cluster, or both (standalone,cluster): one fresh stack each",
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="repeat the runs, alternating their order"
    )
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="py-spy record (collapsed stacks) every Python process of the stack while the "
        "broadcast is sent: DIR/<redis>-<process>.txt",
    )
    args = parser.parse_args()
    for mode in args.redis:
        if mode not in ("standalone", "cluster"):
            parser.error(f"--redis takes standalone and/or cluster, not {mode!r}")
    # ``timeout`` and job control stop a bench with SIGTERM: as an interrupt, the
    # finally blocks still stop every server the bench started.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    asyncio.run(run_all(args))


if __name__ == "__main__":
    main()
