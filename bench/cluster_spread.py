"""How the queue's work spreads over a Redis Cluster's masters during many broadcasts.

Runs the real stack on an embedded Redis Cluster (3 masters, 3 replicas, as
``KOINONIA_DEV_REDIS_CLUSTER=1`` starts it; embedded Postgres, the simulator at
zero latency, web, worker(s), scheduler), signs up C churches with M members
each (COPY into Postgres: setup, not measured), then has every church post a
broadcast to all its members at the same moment and follows them to the end.
Every second it reads each master's ``INFO stats`` (total_commands_processed),
``INFO cpu`` and, at both ends, ``INFO commandstats``. Prints per master:
commands/s (mean over the busy seconds, and the busiest second), its share of
all commands and of Redis CPU, how many churches' slots it holds, its busiest
commands, and which master holds each key that is one per deployment. The
window is bounded (``--timeout``): on a slow or shared machine the broadcasts
need not finish within it, and the spread is that of the work done meanwhile.
Numbers only; nothing is asserted.

    uv run python bench/cluster_spread.py                        # 20 churches x 2,500
    uv run python bench/cluster_spread.py --churches 6 --members 500 --timeout 60
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
from redis.crc import key_slot

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from fairness import signup  # noqa: E402
from pipeline import seed_members  # noqa: E402

from deploy.embedded_redis_cluster import ClusterNode, EmbeddedRedisCluster  # noqa: E402
from deploy.stack import Stack, free_ports  # noqa: E402
from storage.domain.phones import PhoneVault  # noqa: E402
from storage.process.settings import Settings  # noqa: E402
from storage.redis import key_names  # noqa: E402


def say(text: str) -> None:
    print(f"[spread] {text}", file=sys.stderr, flush=True)


@dataclass
class Master:
    node: ClusterNode
    churches: int = 0
    commands: list[tuple[float, int]] = field(default_factory=list)
    """(monotonic time, total_commands_processed) samples."""
    cpu: list[tuple[float, float]] = field(default_factory=list)
    """(monotonic time, used_cpu_user + used_cpu_sys) samples."""
    stats_before: dict[str, int] = field(default_factory=dict)
    stats_after: dict[str, int] = field(default_factory=dict)


def commandstats(node: ClusterNode) -> dict[str, int]:
    """calls per command (``cmdstat_evalsha`` → ``evalsha``)."""
    info: dict[str, Any] = node.client().info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in info.items()}


def sample(master: Master) -> None:
    client = master.node.client()
    now = time.monotonic()
    stats = client.info("stats")
    cpu = client.info("cpu")
    master.commands.append((now, int(stats["total_commands_processed"])))
    master.cpu.append((now, float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])))


def sample_all(masters: list[Master]) -> None:
    for master in masters:
        sample(master)


async def sampler(masters: list[Master], stop: asyncio.Event, every_s: float) -> None:
    while not stop.is_set():
        await asyncio.to_thread(sample_all, masters)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)
    await asyncio.to_thread(sample_all, masters)


def master_of_key(cluster: EmbeddedRedisCluster, masters: list[Master], key: str) -> int:
    node = cluster.master_of_slot(key_slot(key.encode()))
    return next(i for i, m in enumerate(masters) if m.node.node_id == node.node_id)


async def run(args: argparse.Namespace) -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="koinonia-spread-"))
    web_port, sim_port = free_ports(2)
    env = dict(os.environ)
    for name in ("REDIS_URL", "REDIS_CLUSTER_NODES"):
        env.pop(name, None)
    env.update(
        {
            "KOINONIA_DEV_REDIS_CLUSTER": "1",
            "KOINONIA_LOG_LEVEL": os.environ.get("KOINONIA_LOG_LEVEL", "WARNING"),
            "KOINONIA_DB_POOL_MAX": "20",
            "KOINONIA_RATE_STARTER": "1000000",
            "KOINONIA_RATE_API_KEY": "1000000",
            "KOINONIA_RATE_LOGIN_IP": "100000",
        }
    )
    # The queue's spread is measured, not our account limit (1,000 texts/s by default
    # would pace the run); per-number limits are off unless set.
    env.setdefault("KOINONIA_SEND_RATE_PER_ACCOUNT", "0")
    stack = Stack(
        data_dir,
        http_port=web_port,
        sim_port=sim_port,
        env=env,
        fast_unsafe=not args.durable,
        quiet=False,
    )
    try:
        await asyncio.to_thread(stack.start_stores)
        cluster = stack.redis_cluster
        assert cluster is not None, "the bench measures its own embedded cluster"
        stack.spawn("simulator", "simulator")
        stack.spawn("web", "web")
        for i in range(args.workers):
            stack.spawn(f"worker{i}", "worker", "--name", f"spread-{i}")
        stack.spawn("scheduler", "scheduler")
        await asyncio.to_thread(stack.wait_ready)
        settings = Settings.from_env(stack.env)
        vault = PhoneVault(settings.security.phone_key, settings.security.lookup_key)
        base = f"http://127.0.0.1:{web_port}"
        masters = [
            Master(n)
            for n in cluster.live_nodes()
            if any(v.node_id == n.node_id and v.is_master and v.slots for v in cluster.view())
        ]
        say(f"masters: {', '.join(m.node.address for m in masters)}")

        churches: list[tuple[uuid.UUID, str, str]] = []
        started = time.perf_counter()
        for c in range(args.churches):
            church_id, key = await signup(base, f"Spread {c}")
            async with httpx.AsyncClient(
                base_url=base, timeout=30, headers={"Authorization": f"Bearer {key}"}
            ) as api:
                group = (await api.post("/v1/groups", json={"name": "All"})).json()["data"]["id"]
            await asyncio.to_thread(
                functools.partial(
                    seed_members,
                    stack.env["DATABASE_URL"],
                    vault,
                    church_id,
                    uuid.UUID(group),
                    args.members,
                    first=2_000_000 + c * args.members,
                    last_name="Spread",
                )
            )
            churches.append((church_id, key, group))
            masters[master_of_key(cluster, masters, key_names.church_tag(church_id))].churches += 1
        with psycopg.connect(stack.env["DATABASE_URL"]) as conn:
            conn.execute("ANALYZE member")
            conn.execute("ANALYZE group_membership")
        say(
            f"{args.churches} churches x {args.members:,} members seeded in "
            f"{time.perf_counter() - started:.1f} s"
        )

        apis = [
            httpx.AsyncClient(base_url=base, timeout=60, headers={"Authorization": f"Bearer {key}"})
            for _, key, _ in churches
        ]
        try:
            # Warm each church's path (API key cache, plan) so the posts go out together.
            await asyncio.gather(*(api.get("/v1/messages?limit=1") for api in apis))
            for m in masters:
                m.stats_before = commandstats(m.node)
            stop = asyncio.Event()
            sampling = asyncio.create_task(sampler(masters, stop, args.sample_every))
            await asyncio.sleep(args.sample_every * 2)  # the idle rate, for reference
            say(f"posting {args.churches} broadcasts at once")
            t0 = time.monotonic()
            answers = await asyncio.gather(
                *(
                    api.post(
                        "/v1/messages",
                        json={"body": "Spread bench", "target": {"group_ids": [group]}},
                    )
                    for api, (_, _, group) in zip(apis, churches, strict=True)
                )
            )
            for answer in answers:
                assert answer.status_code == 202, answer.text
            ids = [a.json()["data"]["id"] for a in answers]
            total = args.churches * args.members
            deadline = t0 + args.timeout
            final = delivered = 0
            last_print = 0.0
            while time.monotonic() < deadline:
                try:
                    counts = [
                        (await api.get(f"/v1/messages/{mid}")).json()["data"]["counts"]
                        for api, mid in zip(apis, ids, strict=True)
                    ]
                except httpx.HTTPError as error:
                    # A kept-alive connection closed by the busy server as it was
                    # reused: the next poll opens a new one.
                    say(f"poll failed ({error!r}); polling again")
                    await asyncio.sleep(1.0)
                    continue
                delivered = sum(c["delivered"] for c in counts)
                final = sum(
                    c["delivered"] + c["failed"] + c["undelivered"] + c["skipped"] for c in counts
                )
                if time.monotonic() - last_print > 5:
                    say(f"delivered {delivered:,} / {total:,}")
                    last_print = time.monotonic()
                if final >= total:
                    break
                await asyncio.sleep(1.0)
            elapsed = time.monotonic() - t0
            stop.set()
            await sampling
            for m in masters:
                m.stats_after = commandstats(m.node)
        finally:
            for api in apis:
                await api.aclose()
        report(args, cluster, masters, delivered, final, elapsed, t0)
    finally:
        stack.stop()


def busy(master: Master, t0: float) -> list[float]:
    """Commands/s of the intervals that ended after the broadcasts were posted."""
    return [
        (c1 - c0) / (t1 - tp)
        for (tp, c0), (t1, c1) in zip(master.commands, master.commands[1:], strict=False)
        if t1 > t0 and t1 > tp
    ]


def report(
    args: argparse.Namespace,
    cluster: EmbeddedRedisCluster,
    masters: list[Master],
    delivered: int,
    final: int,
    elapsed: float,
    t0: float,
) -> None:
    def row(values: Iterable[str]) -> None:
        print("| " + " | ".join(values) + " |")

    total_commands = sum(m.commands[-1][1] - m.commands[0][1] for m in masters)
    total_cpu = sum(m.cpu[-1][1] - m.cpu[0][1] for m in masters)
    n = args.churches * args.members
    print()
    print(
        f"{args.churches} churches x {args.members:,} recipients, all posted at once: "
        f"{final:,} of {n:,} final ({delivered:,} delivered) in {elapsed:.1f} s = "
        f"{delivered / elapsed:,.0f} delivered/s; {args.workers} worker(s); "
        f"{os.cpu_count()} cores shared by everything"
    )
    print(
        f"{total_commands:,} commands on the masters in all = "
        f"{total_commands / max(1, delivered):.2f} per delivered recipient"
    )
    print()
    row(
        [
            "master",
            "churches' slots",
            "commands/s mean",
            "commands/s max (1 s)",
            "share of commands",
            "share of Redis CPU",
            "busiest commands (calls)",
        ]
    )
    row(["---"] * 7)
    for i, m in enumerate(masters):
        rates = busy(m, t0)
        done = m.commands[-1][1] - m.commands[0][1]
        cpu = m.cpu[-1][1] - m.cpu[0][1]
        calls = {k: m.stats_after.get(k, 0) - m.stats_before.get(k, 0) for k in m.stats_after}
        top = sorted(calls.items(), key=lambda kv: -kv[1])[:4]
        row(
            [
                f"{i} ({m.node.address})",
                str(m.churches),
                f"{statistics.fmean(rates):,.0f}" if rates else "—",
                f"{max(rates):,.0f}" if rates else "—",
                f"{100 * done / max(1, total_commands):.0f} %",
                f"{100 * cpu / max(1e-9, total_cpu):.0f} %",
                ", ".join(f"{k} {v:,}" for k, v in top),
            ]
        )
    settings_shards = int(os.environ.get("KOINONIA_QUEUE_SHARDS", "8"))
    shared = {
        f"ready sets/wake lists ({settings_shards} shards)": [
            key_names.ready_set(s, settings_shards) for s in range(settings_shards)
        ],
        "materialize stream": [key_names.MATERIALIZE_STREAM],
        "dead-letter stream": [key_names.DEAD_LETTER_STREAM],
    }
    print()
    for label, keys in shared.items():
        where = [master_of_key(cluster, masters, k) for k in keys]
        spread = ", ".join(f"master {i}: {where.count(i)}" for i in range(len(masters)))
        print(f"{label}: {spread}")
    print()
    print(
        "commands/s per master, each second after the posts: "
        + "; ".join(
            f"master {i}: " + " ".join(f"{r:,.0f}" for r in busy(m, t0))
            for i, m in enumerate(masters)
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--churches", type=int, default=20)
    parser.add_argument("--members", type=int, default=2_500)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--sample-every", type=float, default=1.0, help="seconds")
    parser.add_argument(
        "--timeout",
        type=float,
        default=120,
        help="seconds to follow the broadcasts: the measurement window, which ends "
        "earlier only if every recipient is final",
    )
    parser.add_argument(
        "--durable",
        action="store_true",
        help="Postgres with fsync and the cluster's AOF on (default off: the spread over "
        "the masters is measured, not the disk)",
    )
    # ``timeout`` and job control stop a bench with SIGTERM: as an interrupt, the
    # finally blocks still stop every server the bench started.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
