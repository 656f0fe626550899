"""Idle WebSocket connections held by one web node, and memory per connection.

Starts embedded Postgres and Redis, one web process (the production uvicorn
options of ``deploy/cli.py``, with ``--ws`` to compare the server's WebSocket
implementations: ``websockets``, ``websockets-sansio`` (uvicorn's default),
``wsproto``, or ``realtime.protocol:LeanWSProtocol``, what ``koinonia web``
runs), signs up a church, then opens connections from client
processes (each on its own source address 127.0.0.x, so ephemeral ports never
run short), every one authenticated with an API key and subscribed to
``dashboard``. At 0 and at each step it reads the web process's RSS and
prints KB per connection (RSS delta / N). At the end one event is published
and every connection must receive it.

    uv run python bench/connections.py                          # 5k, 10k, 19.5k, as deployed
    uv run python bench/connections.py --steps 2000 --stats     # + gc/task counts per step
    uv run python bench/connections.py --ws wsproto --steps 5000
    uv run python bench/connections.py --source-tree /tmp/old   # measure another checkout

The file-descriptor limit is raised to the hard limit first; the web process
needs one descriptor per connection plus its own (stores, listening socket),
so the largest step must stay below that limit. Numbers only; it asserts
nothing but that every connection is alive at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

OPEN_CONCURRENCY = 12
"""Handshakes in flight per client process. The web process's Redis pool has 64
connections and raises (HTTP 500 at the handshake) beyond that, so all client
processes together stay under it."""


def say(text: str) -> None:
    print(f"[connections] {text}", file=sys.stderr, flush=True)


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


# --------------------------------------------------------------------------
# serve: the web process, as `koinonia web` runs it, plus a stats dump.
# --------------------------------------------------------------------------


def _stats(path: str) -> None:
    import gc
    import tracemalloc
    from collections import Counter

    gc.collect()
    counts = Counter(type(o).__name__ for o in gc.get_objects())
    out: dict[str, Any] = {
        "tasks": len(asyncio.all_tasks()),
        "gc_objects": sum(counts.values()),
        "gc_top": counts.most_common(40),
    }
    if tracemalloc.is_tracing():
        snapshot = tracemalloc.take_snapshot()
        out["traced_kb"] = sum(s.size for s in snapshot.statistics("filename")) // 1024
        out["traced_top"] = [
            (str(s.traceback), s.size, s.count) for s in snapshot.statistics("lineno")[:60]
        ]
    Path(path).write_text(json.dumps(out))


def serve(args: argparse.Namespace) -> None:
    import uvicorn
    import uvloop

    from deploy.app import create_app
    from deploy.cli import _UVICORN_OPTIONS
    from storage.process.logs import configure_logging
    from storage.process.settings import Settings

    if args.tracemalloc:
        import tracemalloc

        tracemalloc.start(4)
    settings = Settings.from_env()
    configure_logging(settings.log_level, process="web")
    options = dict(_UVICORN_OPTIONS)
    if args.ws:
        options["ws"] = args.ws
    config = uvicorn.Config(
        create_app(settings), host="127.0.0.1", port=settings.http.port, **options
    )

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGUSR1, _stats, args.stats_file)
        await uvicorn.Server(config).serve()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


# --------------------------------------------------------------------------
# clients: one process holding many connections, driven over stdin/stdout.
# --------------------------------------------------------------------------


async def _clients(args: argparse.Namespace) -> None:
    from websockets.asyncio.client import ClientConnection, connect

    held: list[ClientConnection] = []
    headers = {"Authorization": f"Bearer {args.key}"}
    failures = 0

    async def open_one() -> None:
        nonlocal failures
        for _attempt in range(5):
            try:
                ws = await connect(
                    args.url,
                    additional_headers=headers,
                    ping_interval=None,  # the server pings; answering is automatic
                    compression=None,
                    max_queue=4,
                    open_timeout=60,
                    local_addr=(args.source, 0),
                )
                json.loads(await ws.recv())  # welcome
                await ws.send('{"type":"subscribe","channel":"dashboard"}')
                frame = json.loads(await ws.recv())
                if frame.get("type") != "subscribed":
                    raise RuntimeError(frame)
                held.append(ws)
                return
            except Exception as exc:
                failures += 1
                if failures < 5:
                    say(f"client {args.source}: {exc!r}")
                await asyncio.sleep(0.5)

    async def expect(ws: ClientConnection) -> bool:
        try:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 60))
        except Exception:
            return False
        return bool(frame.get("type") == "event")

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := (await reader.readline()).decode().split():
        if line[0] == "open":
            target = int(line[1])
            semaphore = asyncio.Semaphore(OPEN_CONCURRENCY)
            await asyncio.gather(
                *(_bounded(semaphore, open_one) for _ in range(target - len(held)))
            )
            print(f"open {len(held)} {failures}", flush=True)
        elif line[0] == "expect":
            got = await asyncio.gather(*(expect(ws) for ws in held))
            print(f"got {sum(got)}", flush=True)
        elif line[0] == "alive":
            print(f"alive {sum(1 for ws in held if ws.close_code is None)}", flush=True)
    for ws in held:
        ws.transport.abort()


async def _bounded(semaphore: asyncio.Semaphore, work: Any) -> None:
    async with semaphore:
        await work()


def clients(args: argparse.Namespace) -> None:
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_clients(args))


# --------------------------------------------------------------------------
# the driver
# --------------------------------------------------------------------------


def _raise_fd_limit() -> int:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class Client:
    def __init__(self, source: str, url: str, key: str, env: dict[str, str]) -> None:
        self.source = source
        self.process = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "clients",
                "--url",
                url,
                "--key",
                key,
                "--source",
                source,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )

    def ask(self, command: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()

    def answer(self) -> list[str]:
        assert self.process.stdout is not None
        return self.process.stdout.readline().split()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            assert self.process.stdin is not None
            self.process.stdin.close()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def _signup(base: str) -> tuple[str, str]:
    import httpx

    with httpx.Client(base_url=base, timeout=30) as http:
        answer = http.post(
            "/v1/auth/signup",
            json={
                "church_name": "Bench Chapel",
                "email": f"bench-{uuid.uuid4().hex[:8]}@example.org",
                "password": "correct horse battery",
            },
        )
        answer.raise_for_status()
        church_id = answer.json()["data"]["church"]["id"]
        csrf = http.cookies["koinonia_csrf"]
        key = http.post("/v1/api-keys", json={"name": "bench"}, headers={"X-CSRF-Token": csrf})
        key.raise_for_status()
        return church_id, key.json()["data"]["key"]


async def _publish(redis_url: str, church_id: str) -> None:
    from storage.domain.events import Counts as EventCounts
    from storage.domain.events import MessageProgress, MessageProgressEvent
    from storage.process.settings import RedisSettings
    from storage.redis.connection import open_redis
    from storage.redis.publisher import EventPublisher

    redis = open_redis(RedisSettings(url=redis_url))
    try:
        event = MessageProgressEvent.new(
            MessageProgress(message_id=uuid.uuid4(), counts=EventCounts(), recipient_count=0)
        )
        await EventPublisher(redis).publish(uuid.UUID(church_id), "dashboard", event)
    finally:
        await redis.aclose()


def drive(args: argparse.Namespace) -> None:
    from deploy.stack import Stack, free_ports

    limit = _raise_fd_limit()
    steps = [int(s) for s in args.steps.split(",")]
    say(f"file-descriptor limit {limit}; steps {steps}; ws={args.ws or 'default'}")
    if steps[-1] + 100 > limit:
        say(f"warning: {steps[-1]} connections need more than the limit of {limit} descriptors")
    data_dir = Path(tempfile.mkdtemp(prefix="bench-connections-"))
    stats_file = str(data_dir / "stats.json")
    (port,) = free_ports(1)
    env = dict(os.environ)
    env.update(
        {
            "KOINONIA_LOG_LEVEL": "WARNING",
            "KOINONIA_WS_MAX_CONNECTIONS": "1000000",
            "KOINONIA_WS_MAX_PER_CHURCH": "1000000",
            "KOINONIA_RATE_STARTER": "100000000",
            "KOINONIA_RATE_API_KEY": "100000000",
            "KOINONIA_RATE_LOGIN_IP": "100000",
        }
    )
    stack = Stack(data_dir, http_port=port, sim_port=free_ports(1)[0], env=env, fast_unsafe=True)
    server: subprocess.Popen[bytes] | None = None
    workers: list[Client] = []
    rows: list[tuple[int, int, str, str]] = []
    try:
        child_env = stack.start_stores()
        server_env = dict(child_env)
        if args.source_tree:
            server_env["PYTHONPATH"] = str(Path(args.source_tree).resolve())
        command = [sys.executable, str(Path(__file__).resolve()), "serve"]
        command += ["--stats-file", stats_file]
        if args.ws:
            command += ["--ws", args.ws]
        if args.tracemalloc:
            command.append("--tracemalloc")
        log = (data_dir / "web.log").open("wb")
        server = subprocess.Popen(
            command,
            env=server_env,
            cwd=args.source_tree or ROOT,
            start_new_session=True,
            stderr=log,
        )
        say(f"web log: {data_dir / 'web.log'}")
        stack.processes["web"] = server
        base = f"http://127.0.0.1:{port}"
        stack.wait_ready(f"{base}/health/ready")
        church_id, key = _signup(base)
        url = f"ws://127.0.0.1:{port}/v1/realtime"
        workers = [Client(f"127.0.0.{2 + i}", url, key, child_env) for i in range(args.clients)]

        def open_all(total: int) -> int:
            share, extra = divmod(total, len(workers))
            for i, w in enumerate(workers):
                w.ask(f"open {share + (1 if i < extra else 0)}")
            return sum(int(w.answer()[1]) for w in workers)

        def stats() -> dict[str, Any]:
            if not args.stats and not args.tracemalloc:
                return {}
            Path(stats_file).unlink(missing_ok=True)
            os.kill(server.pid, signal.SIGUSR1)  # type: ignore[union-attr]
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
                    loaded: dict[str, Any] = json.loads(Path(stats_file).read_text())
                    return loaded
                time.sleep(0.2)
            return {}

        # Warm up: the first connections import and allocate what every later one reuses.
        open_all(min(200, steps[0]))
        for w in workers:
            w.stop()
        workers = [Client(f"127.0.0.{2 + i}", url, key, child_env) for i in range(args.clients)]
        time.sleep(3)
        base_rss = rss_kb(server.pid)
        base_stats = stats()
        rows.append((0, base_rss, "", ""))
        say(f"0 connections: RSS {base_rss / 1024:.1f} MiB")
        previous = base_stats
        for target in steps:
            started = time.monotonic()
            held = open_all(target)
            took = time.monotonic() - started
            time.sleep(args.settle)
            rss = rss_kb(server.pid)
            per = (rss - base_rss) / held if held else 0.0
            rows.append((held, rss, f"{per:.1f}", f"{took:.0f} s"))
            say(
                f"{held} connections (opened in {took:.0f} s): RSS {rss / 1024:.1f} MiB, {per:.1f} KB each"
            )
            current = stats()
            if current:
                _print_stats(previous, current, held)
                previous = current
        asyncio.run(_publish(child_env["REDIS_URL"], church_id))
        for w in workers:
            w.ask("expect")
        received = sum(int(w.answer()[1]) for w in workers)
        say(f"one event published: {received} of {rows[-1][0]} connections received it")
        print()
        from deploy.cli import _UVICORN_OPTIONS

        print(f"ws implementation: {args.ws or _UVICORN_OPTIONS.get('ws', 'auto')}")
        print("| connections | web RSS | KB per connection | opened in |")
        print("|---|---|---|---|")
        for n, rss, per, took in rows:
            print(f"| {n:,} | {rss / 1024:.1f} MiB | {per or '—'} | {took or '—'} |")
        print(f"all alive at the end: {received} of {rows[-1][0]} received the event")
    finally:
        for w in workers:
            w.stop()
        stack.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def _print_stats(before: dict[str, Any], after: dict[str, Any], held: int) -> None:
    print(f"  tasks: {after['tasks']} ({after['tasks'] / max(held, 1):.2f} per connection)")
    print(
        f"  gc objects: {after['gc_objects']} ({after['gc_objects'] / max(held, 1):.1f} per connection)"
    )
    old = dict(before.get("gc_top", []))
    grown = sorted(((n - old.get(t, 0), t) for t, n in after["gc_top"]), reverse=True)[:20]
    print("  gc objects grown: " + ", ".join(f"{t} +{d}" for d, t in grown if d > 0))
    if "traced_top" in after:
        grown_kb = after["traced_kb"] - before.get("traced_kb", 0)
        print(
            f"  traced: {after['traced_kb']} KB, {grown_kb * 1024 / max(held, 1):.0f} B per connection"
        )
        for where, size, count in after["traced_top"][:30]:
            print(f"    {size / max(held, 1):8.0f} B/conn {count:8d}  {where}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    p_serve = sub.add_parser("serve")
    p_serve.add_argument("--ws", default="")
    p_serve.add_argument("--stats-file", default="/tmp/connections-stats.json")
    p_serve.add_argument("--tracemalloc", action="store_true")
    p_clients = sub.add_parser("clients")
    p_clients.add_argument("--url", required=True)
    p_clients.add_argument("--key", required=True)
    p_clients.add_argument("--source", default="127.0.0.1")
    parser.add_argument("--steps", default="5000,10000,19500")
    parser.add_argument("--clients", type=int, default=4, help="client processes")
    parser.add_argument(
        "--ws", default="", help="uvicorn --ws (websockets, websockets-sansio, wsproto)"
    )
    parser.add_argument("--settle", type=float, default=5.0, help="seconds before reading RSS")
    parser.add_argument("--stats", action="store_true", help="gc and task counts per step")
    parser.add_argument("--tracemalloc", action="store_true", help="allocations per step (slow)")
    parser.add_argument("--source-tree", default="", help="run the web process from this checkout")
    args = parser.parse_args()
    if args.command == "serve":
        serve(args)
    elif args.command == "clients":
        clients(args)
    else:
        drive(args)


if __name__ == "__main__":
    main()
