"""Replica lag during one large broadcast: how stale does a streaming replica get?

Runs the real stack with one embedded streaming replica (``KOINONIA_DEV_REPLICAS=1``;
embedded Postgres with fsync on unless ``--unsafe``, embedded Redis, the simulator at
zero latency, web, worker, scheduler), seeds N members into one group with COPY
(setup, not measured, and before the sampling starts), posts one broadcast and
follows it until every recipient is final, like bench/pipeline.py.

Lag is measured as time, the way the contract's limit is stated: a sampler thread
reads the primary's ``pg_current_wal_lsn()`` every 10 ms, keeping (time, LSN) pairs,
and the replica's ``pg_last_wal_replay_lsn()`` every 50 ms. A replica sample's lag is
how long ago the primary's WAL position was at the replica's replayed position
(interpolated between the two primary samples around it), 0 when the replica has
replayed everything the primary had written. PostgreSQL's own ``replay_lag``
(pg_stat_replication) is shown beside it as a cross-check; it is only updated when
the standby reports, so it is coarser.

    uv run python bench/replica_lag.py --recipients 5000      # a quick run
    uv run python bench/replica_lag.py                        # 50,000 recipients
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from fairness import signup  # noqa: E402
from pipeline import follow, percentile, seed_members  # noqa: E402

from deploy.stack import Stack, free_ports  # noqa: E402
from storage.domain.phones import PhoneVault  # noqa: E402
from storage.process.settings import Settings  # noqa: E402

PRIMARY_EVERY_S = 0.01


def say(text: str) -> None:
    print(f"[replica_lag] {text}", file=sys.stderr, flush=True)


def lsn_int(lsn: str) -> int:
    high, low = lsn.split("/")
    return (int(high, 16) << 32) + int(low, 16)


@dataclass
class LagSampler:
    """Samples the primary's WAL position and the replica's replay position in a thread
    of its own (blocking connections: the event loop's timing does not blur it)."""

    primary_url: str
    replica_url: str
    every_s: float = 0.05
    lags_ms: list[float] = field(default_factory=list)
    """One per replica sample, in sampling order."""
    lag_times: list[float] = field(default_factory=list)
    """When each of ``lags_ms`` was taken (``time.monotonic()``)."""
    pg_replay_lag_ms: list[float] = field(default_factory=list)
    """PostgreSQL's own replay_lag, when it reported one."""
    failures: int = 0
    _times: list[float] = field(default_factory=list)
    _lsns: list[int] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lag-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        with (
            psycopg.connect(self.primary_url, autocommit=True) as primary,
            psycopg.connect(self.replica_url, autocommit=True) as replica,
        ):
            next_replica = time.monotonic()
            while not self._stop.is_set():
                row = primary.execute(
                    "SELECT pg_current_wal_lsn()::text,"
                    " (SELECT extract(epoch FROM replay_lag) FROM pg_stat_replication LIMIT 1)"
                ).fetchone()
                now = time.monotonic()
                assert row is not None
                self._times.append(now)
                self._lsns.append(lsn_int(row[0]))
                if now >= next_replica:
                    next_replica += self.every_s
                    if row[1] is not None:
                        self.pg_replay_lag_ms.append(float(row[1]) * 1000)
                    try:
                        replayed = replica.execute("SELECT pg_last_wal_replay_lsn()::text")
                        found = replayed.fetchone()
                        assert found is not None
                        at = time.monotonic()
                        self.lags_ms.append(self.lag_ms(lsn_int(found[0]), at))
                        self.lag_times.append(at)
                    except psycopg.Error:
                        self.failures += 1
                self._stop.wait(PRIMARY_EVERY_S)

    def lag_ms(self, replayed: int, at: float) -> float:
        """How long before ``at`` the primary's WAL position was ``replayed``."""
        lsns, times = self._lsns, self._times
        if replayed >= lsns[-1]:
            return 0.0
        # The first primary sample past the replayed position: the primary got there
        # between the sample before it and this one.
        i = bisect.bisect_right(lsns, replayed)
        if i == 0:
            return (at - times[0]) * 1000  # before the sampling began: a lower bound
        before_lsn, after_lsn = lsns[i - 1], lsns[i]
        fraction = (replayed - before_lsn) / (after_lsn - before_lsn)
        reached = times[i - 1] + fraction * (times[i] - times[i - 1])
        return (at - reached) * 1000


def postgres_cpu(stack: Stack) -> dict[str, float]:
    """CPU seconds so far of the primary and of each replica, backends included."""
    import psutil

    roots = {"primary": stack.postgres.pid if stack.postgres else None}
    for replica in stack.replicas:
        roots[f"replica {replica.index}"] = replica.pid
    used: dict[str, float] = {}
    for name, pid in roots.items():
        if pid is None:
            continue
        total = 0.0
        try:
            root = psutil.Process(pid)
            for proc in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    times = proc.cpu_times()
                    total += times.user + times.system
        except psutil.Error:
            pass
        used[name] = total
    return used


async def run(args: argparse.Namespace) -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="koinonia-bench-"))
    web_port, sim_port = free_ports(2)
    env = dict(os.environ)
    env.update(
        {
            "KOINONIA_LOG_LEVEL": os.environ.get("KOINONIA_LOG_LEVEL", "WARNING"),
            "KOINONIA_DB_POOL_MAX": "20",
            "KOINONIA_RATE_STARTER": "1000000",
            "KOINONIA_RATE_API_KEY": "1000000",
            "KOINONIA_DEV_REPLICAS": "1",
        }
    )
    env.setdefault("KOINONIA_SEND_RATE_PER_ACCOUNT", "0")
    stack = Stack(data_dir, http_port=web_port, sim_port=sim_port, env=env, fast_unsafe=args.unsafe)
    sampler: LagSampler | None = None
    try:
        await asyncio.to_thread(stack.start_stores)
        stack.spawn("simulator", "simulator")
        stack.spawn("web", "web")
        stack.spawn("worker", "worker", "--name", "bench-0")
        stack.spawn("scheduler", "scheduler")
        await asyncio.to_thread(stack.wait_ready)
        settings = Settings.from_env(stack.env)
        vault = PhoneVault(settings.security.phone_key, settings.security.lookup_key)
        base = f"http://127.0.0.1:{web_port}"
        church_id, key = await signup(base, "Bench")
        async with httpx.AsyncClient(
            base_url=base, timeout=30, headers={"Authorization": f"Bearer {key}"}
        ) as api:
            group = (await api.post("/v1/groups", json={"name": "All"})).json()["data"]["id"]
            seed_members(
                stack.env["DATABASE_URL"], vault, church_id, uuid.UUID(group), args.recipients
            )
            sampler = LagSampler(stack.env["DATABASE_URL"], stack.replicas[0].url)
            sampler.start()
            # Let the replica replay the seed first: the lag measured is the broadcast's.
            await asyncio.sleep(1.0)
            sampler.lags_ms.clear()
            sampler.lag_times.clear()
            sampler.pg_replay_lag_ms.clear()
            cpu_before = postgres_cpu(stack)
            say("posting the broadcast")
            started = time.monotonic()
            answer = await api.post(
                "/v1/messages", json={"body": "Bench broadcast", "target": {"group_ids": [group]}}
            )
            assert answer.status_code == 202, answer.text
            samples = await follow(api, answer.json()["data"]["id"], args.recipients, args.timeout)
            run_s = time.monotonic() - started
            cpu_after = postgres_cpu(stack)
            sampler.stop()
        final = samples[-1][1]
        lags = sampler.lags_ms
        print()
        print(
            f"recipients            {args.recipients:,}  durable={'no' if args.unsafe else 'yes'}"
        )
        print(f"run                   {run_s:.1f} s to {final['delivered']:,} delivered")
        print(
            f"replica lag           p50 {percentile(lags, 0.5):.1f} ms   p99 {percentile(lags, 0.99):.1f} ms"
            f"   max {max(lags, default=float('nan')):.1f} ms   ({len(lags):,} samples every 50 ms,"
            f" {sampler.failures} failed)"
        )
        over = [lag for lag in lags if lag > args.target_ms]
        worst = sorted(zip(lags, sampler.lag_times, strict=True), reverse=True)[:5]
        print(
            f"over {args.target_ms:g} ms           {len(over):,} samples ({100 * len(over) / max(1, len(lags)):.2f} %);"
            " worst at "
            + ", ".join(f"+{at - started:.1f} s ({lag:.0f} ms)" for lag, at in worst)
            + " after posting"
        )
        pg_lags = sampler.pg_replay_lag_ms
        print(
            f"pg_stat_replication   replay_lag p50 {percentile(pg_lags, 0.5):.1f} ms"
            f"   p99 {percentile(pg_lags, 0.99):.1f} ms   max {max(pg_lags, default=float('nan')):.1f} ms"
        )
        print(
            "Postgres CPU          "
            + ", ".join(
                f"{name} {cpu_after[name] - cpu_before.get(name, 0.0):.1f} s"
                for name in sorted(cpu_after)
            )
        )
    finally:
        if sampler is not None:
            sampler.stop()
        stack.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipients", type=int, default=50_000)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument(
        "--target-ms", type=float, default=100.0, help="lag target to count samples above"
    )
    parser.add_argument(
        "--unsafe", action="store_true", help="Postgres without fsync (faster, not durable)"
    )
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
