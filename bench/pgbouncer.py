"""REST list pages direct vs through PgBouncer (transaction mode), and what Postgres holds.

Seeds a church (smaller than bench/rest.py's by default; reused from the data
folder afterwards), starts embedded Postgres and Redis and a PgBouncer rendered
from deploy/pgbouncer.ini in front of it, then for each path (``direct``: web's
DATABASE_URL is Postgres; ``direct-unprepared``: the same with
KOINONIA_DB_PREPARED_STATEMENTS=off, which separates what preparing saves from
what PgBouncer costs; ``pgbouncer``: DATABASE_URL is PgBouncer, prepared
statements off) runs ``koinonia web --workers 4`` and loads

    GET /v1/messages?limit=50      (the page of broadcasts)
    GET /v1/conversations          (the inbox, 50 per page)

with wrk at maximum throughput, then with bench/rest.py's paced client at a fixed
rate (the same for both paths, so their latencies compare), while a sampler
counts, every 0.2 s, the client backends Postgres runs for the application's
database (pg_stat_activity; its own connection excluded) and PgBouncer's clients
(SHOW POOLS). Prints req/s, p50/p99, the backend counts and where the CPU went.

    uv run python bench/pgbouncer.py
    uv run python bench/pgbouncer.py --duration 10 --connections 64 --rate 400
    uv run python bench/pgbouncer.py --paths pgbouncer,direct      # order, subset

Numbers only; it asserts nothing but the response shape checked before loading.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from rest import (  # noqa: E402  (after the path set-up above)
    ENDPOINTS,
    UNTHROTTLED,
    Load,
    Row,
    check_responses,
    cpu_text,
    require_wrk,
    store_pids,
)

DEFAULT_DATA_DIR = ROOT / ".koinonia" / "bench-pgbouncer"
_BACKENDS = (
    "SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
    "AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
)


def say(text: str) -> None:
    print(f"[pgbouncer] {text}", file=sys.stderr, flush=True)


class Sampler:
    """Postgres client backends of the database (and PgBouncer's clients) during a run."""

    def __init__(self, direct_url: str, database: str, admin_url: str | None) -> None:
        self.direct_url = direct_url
        self.database = database
        self.admin_url = admin_url
        self.backends: list[int] = []
        self.clients: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        import psycopg

        admin = None
        with psycopg.connect(self.direct_url, autocommit=True) as conn:
            if self.admin_url is not None:
                admin = psycopg.connect(
                    self.admin_url, autocommit=True, cursor_factory=psycopg.ClientCursor
                )
            try:
                while not self._stop.is_set():
                    row = conn.execute(_BACKENDS, (self.database,)).fetchone()
                    self.backends.append(int(row[0]) if row else 0)
                    if admin is not None:
                        cur = admin.execute("SHOW POOLS")
                        names = [c.name for c in cur.description or ()]
                        pools = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
                        self.clients.append(
                            sum(
                                int(p["cl_active"]) + int(p["cl_waiting"])
                                for p in pools
                                if p["database"] == self.database
                            )
                        )
                    self._stop.wait(0.2)
            finally:
                if admin is not None:
                    admin.close()

    def text(self) -> str:
        if not self.backends:
            return "no samples"
        out = f"{max(self.backends)} max, {statistics.mean(self.backends):.0f} mean"
        if self.clients:
            out += f" (PgBouncer clients {max(self.clients)} max)"
        return out


def run(args: argparse.Namespace) -> None:
    from rest_seed import SeedPlan, load_or_seed

    from deploy.embedded_pgbouncer import EmbeddedPgBouncer
    from deploy.embedded_postgres import PG_DATABASE
    from deploy.stack import Stack, free_ports
    from storage.domain.phones import PhoneVault
    from storage.process.settings import Settings

    wrk = require_wrk()

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # so that the finally below stops the stack

    signal.signal(signal.SIGTERM, on_term)
    data_dir = Path(args.data_dir).absolute()
    web_port, sim_port = free_ports(2)
    env = dict(os.environ)
    env.update({
        "KOINONIA_LOG_LEVEL": os.environ.get("KOINONIA_LOG_LEVEL", "WARNING"),
        "KOINONIA_DB_POOL_MAX": str(args.pool_max),
        "KOINONIA_RATE_STARTER": UNTHROTTLED,
        "KOINONIA_RATE_GROWTH": UNTHROTTLED,
        "KOINONIA_RATE_PRO": UNTHROTTLED,
        "KOINONIA_RATE_API_KEY": UNTHROTTLED,
    })  # fmt: skip
    for name in ("DATABASE_URL", "DATABASE_SESSION_URL", "REDIS_URL", "KOINONIA_DEV_PGBOUNCER"):
        env.pop(name, None)  # always the bench's own stores, started below
    stack = Stack(data_dir, http_port=web_port, sim_port=sim_port, env=env, quiet=False)
    bouncer: EmbeddedPgBouncer | None = None
    results: list[tuple[str, Row, str, float]] = []
    try:
        stack.start_stores()
        direct_url = stack.env["DATABASE_URL"]
        settings = Settings.from_env(stack.env)
        vault = PhoneVault(settings.security.phone_key, settings.security.lookup_key)
        plan = SeedPlan(members=args.members, broadcasts=args.broadcasts, months=args.months)
        seeded = load_or_seed(direct_url, vault, data_dir, plan, False)
        say(
            f"data: {seeded.recipients:,} recipient rows, {seeded.messages:,} broadcasts, "
            f"{seeded.conversations:,} conversations"
        )
        bouncer = EmbeddedPgBouncer(data_dir, direct_url)
        bouncer.start()
        unprepared = {"KOINONIA_DB_PREPARED_STATEMENTS": "off"}
        paths: dict[str, dict[str, str]] = {
            "direct": {},
            "direct-unprepared": unprepared,
            "pgbouncer": {"DATABASE_URL": bouncer.url, **unprepared},
        }
        base = f"http://127.0.0.1:{web_port}"
        for name in args.paths:
            extra = paths[name]
            say(f"{name}: starting koinonia web --workers {args.workers}")
            stack.spawn("web", "web", "--workers", str(args.workers), env={**stack.env, **extra})
            stack.wait_ready(timeout_s=90)
            check_responses(base, seeded.api_key)
            groups: dict[str, list[int]] = {"web": [stack.processes["web"].pid]}
            groups |= store_pids(stack)
            if name == "pgbouncer" and bouncer.pid is not None:
                groups["pgbouncer"] = [bouncer.pid]
            load = Load(
                wrk, base, seeded.api_key, groups, args.wrk_threads,
                quiet=args.quiet, quiet_wait=args.quiet_wait, retries=args.retries,
            )  # fmt: skip
            for endpoint in ENDPOINTS:
                load.wrk_run(endpoint, args.workers, args.connections, args.warmup, phase="warm-up")
            admin = bouncer.admin_url if name == "pgbouncer" else None
            for endpoint in ENDPOINTS:
                with Sampler(direct_url, PG_DATABASE, admin) as sampler:
                    row = load.wrk_run(endpoint, args.workers, args.connections, args.duration)
                results.append((name, row, sampler.text(), row.cpu.get("pgbouncer", 0.0)))
                say(
                    f"{name:9s} max   {endpoint:13s} {row.rps:7,.0f} req/s p99 {row.p99:6.1f} ms "
                    f"errors {row.errors} backends {sampler.text()} cpu {cpu_text(row.cpu)}"
                )
                with Sampler(direct_url, PG_DATABASE, admin) as sampler:
                    row = load.paced_run(
                        endpoint, args.workers, args.rate, args.paced_duration, args.connections
                    )
                results.append((name, row, sampler.text(), row.cpu.get("pgbouncer", 0.0)))
                say(
                    f"{name:9s} paced {endpoint:13s} {row.rps:7,.0f} req/s p99 {row.p99:6.1f} ms "
                    f"errors {row.errors} backends {sampler.text()} {row.note}"
                )
            stack.stop_process("web")
            time.sleep(1.0)  # the web's connections closed before the next path counts
    finally:
        if bouncer is not None:
            bouncer.stop()
        stack.stop()
    print_table(results, args)


def print_table(results: list[tuple[str, Row, str, float]], args: argparse.Namespace) -> None:
    print(
        f"\nmachine: {os.cpu_count()} cores; web --workers {args.workers}, pool max "
        f"{args.pool_max} per web process; wrk and paced client at {args.connections} connections"
    )
    print()
    print(
        "| path | run | endpoint | req/s | p50 ms | p99 ms | errors | Postgres client backends | CPU ms/request: web / Postgres / PgBouncer | CPU, % of one core |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r, backends, bouncer_cpu in results:
        run = "max" if r.target is None else f"paced {r.target:,.0f}/s"
        note = f" — {r.note}" if r.note else ""
        # % of one core / requests per second = CPU seconds per request; x 10 for ms
        per = [
            10 * v / max(1.0, r.rps) for v in (r.cpu.get("web", 0.0), r.cpu.get("postgres", 0.0))
        ]
        cost = f"{per[0]:.2f} / {per[1]:.2f} / {10 * bouncer_cpu / max(1.0, r.rps):.2f}"
        print(
            f"| {name} | {run} | {ENDPOINTS[r.endpoint]} | {r.rps:,.0f} | {r.p50:.1f} | "
            f"{r.p99:.1f} | {r.errors} | {backends} | {cost} | {cpu_text(r.cpu)}{note} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--paths",
        type=lambda raw: [p.strip() for p in raw.split(",") if p.strip()],
        default=["direct", "direct-unprepared", "pgbouncer"],
        help="which paths, in this order (direct, direct-unprepared, pgbouncer)",
    )
    parser.add_argument("--workers", type=int, default=4, help="koinonia web --workers")
    parser.add_argument("--connections", type=int, default=64, help="HTTP connections")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per wrk run")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds per endpoint")
    parser.add_argument(
        "--rate", type=float, default=150.0, help="req/s of the paced runs (both paths)"
    )
    parser.add_argument(
        "--quiet", type=float, default=30.0,
        help="before each run, wait until other processes use less than this %% of the machine",
    )  # fmt: skip
    parser.add_argument("--quiet-wait", type=float, default=45.0, help="longest such wait, s")
    parser.add_argument(
        "--retries", type=int, default=1, help="runs again when other work was notable"
    )
    parser.add_argument("--paced-duration", type=float, default=10.0)
    parser.add_argument("--wrk-threads", type=int, default=1)
    parser.add_argument("--pool-max", type=int, default=20, help="KOINONIA_DB_POOL_MAX")
    parser.add_argument("--members", type=int, default=5_000)
    parser.add_argument("--broadcasts", type=int, default=500)
    parser.add_argument("--months", type=int, default=3)
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    run(parser.parse_args())


if __name__ == "__main__":
    main()
