"""Cross-node fan-out: Koinonia against python-socketio, side by side, in one run.

Clients sit on node B; events are produced elsewhere (this process plays node A
or a worker) and reach node B through Redis pub/sub. C channels (one church's
``inbox`` each) have P clients each, like a church's staff (default 50 x 10 =
500 WebSockets), held by separate client processes (``bench/fanout_client.py``,
the same lean raw-WebSocket client for both servers).

- Koinonia: embedded Postgres and Redis (``deploy.stack.Stack``), one
  ``koinonia web`` process as node B; events published through
  ``storage.events.EventPublisher`` (history XADD + PUBLISH, as a worker does).
- Peer: python-socketio's ASGI server under uvicorn (``bench/fanout_peer.py``)
  with ``AsyncRedisManager`` on the same Redis; rooms = channels; events emitted
  through a ``write_only`` ``AsyncRedisManager`` (cross-node, as documented).

Both servers run at once, each with its own clients, and every phase runs on one
then the other, back to back, so both meet the same background load: a burst
(N events as fast as the producer goes), a paced run (500 events/s for 10 s) and
a knee search (paced steps, stopping at the first with p99 ≥ 10 ms, any loss or
a closed connection; a failing step is tried again before it counts). Every
event carries its send time; latency is publish→receive at the client. CPU is
node B's utime+stime from /proc per delivery, and "other" is what the rest of
the machine used meanwhile. Numbers are printed, never asserted.

    uv sync --group bench            # python-socketio is a bench-only dependency
    uv run --group bench python bench/fanout.py
    uv run --group bench python bench/fanout.py --channels 20 --burst 10000 --servers koinonia
    uv run --group bench python bench/fanout.py --cluster --channels 30 --burst 6000 --paced-seconds 6

``--cluster`` compares one node with three instead: Koinonia on an embedded
Redis Cluster (sharded pub/sub: a node receives only the churches it has
clients for) and python-socketio's Redis adapter on one standalone Redis (every
node receives every event), each first as one node holding every client, then
as three nodes holding a third of the channels each, events for every channel;
CPU per delivery of each node against the one-node figure (``cluster_main``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import signal
import statistics
import sys
import tempfile
import time
import uuid
from array import array
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import fanout_client  # noqa: E402
from fairness import signup  # noqa: E402
from fanout_client import Spec  # noqa: E402

from deploy.embedded_redis import EmbeddedRedis  # noqa: E402
from deploy.stack import Stack, free_ports  # noqa: E402
from storage.domain.events import encode  # noqa: E402
from storage.domain.ids import uuid7  # noqa: E402
from storage.process.settings import Settings  # noqa: E402
from storage.redis.connection import open_redis  # noqa: E402
from storage.redis.publisher import EventPublisher  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
P99_LIMIT_MS = 10.0
MESSAGE_ID = str(uuid7())
MEMBER_ID = str(uuid7())


def say(text: str) -> None:
    print(f"[fanout] {text}", file=sys.stderr, flush=True)


def cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    return sum(cpu_split(pid))


def machine_busy_s() -> float:
    """CPU seconds spent by every process on the machine (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal: everything but idle and iowait.
    return (sum(values[:8]) - values[3] - values[4]) / TICK


def event_dict(k: str) -> dict[str, Any]:
    """A realistic ``message.recipient.status`` event carrying the bench marker."""
    return {
        "id": str(uuid7()),
        "type": "message.recipient.status",
        "occurred_at": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "data": {
            "message_id": MESSAGE_ID,
            "recipient_id": str(uuid7()),
            "member_id": MEMBER_ID,
            "status": "delivered",
            "provider_message_id": "40318f2a-6c8e-4b7e-9a55-2f1c3b9c0d1e",
            "error_code": None,
            "k": k,
        },
    }


# -- the two servers ------------------------------------------------------------


Send = Callable[[str, Sequence[int]], Awaitable[None]]
"""Publish events ``seqs`` of a phase (event ``seq`` goes to channel ``seq % C``)."""


@dataclass
class Target:
    name: str
    pid: int
    specs: list[Spec]
    send: Send
    close: Callable[[], Awaitable[None]]
    chunk: int
    """Events per ``send`` in a burst (``inflight`` sends run at once)."""
    inflight: int


async def koinonia_target(
    stack: Stack,
    port: int,
    args: argparse.Namespace,
    *,
    name: str = "Koinonia",
    process: str = "web",
    env: dict[str, str] | None = None,
) -> Target:
    """Node B: ``koinonia web`` as child ``process`` on ``port`` (the stack's own
    port unless ``env`` names another), with ``env`` over the stack's environment."""
    child_env = {**stack.env, **(env or {})}
    stack.spawn(process, "web", env=child_env)
    base = f"http://127.0.0.1:{port}"
    await asyncio.to_thread(stack.wait_ready, f"{base}/health/ready")
    churches: list[tuple[uuid.UUID, str]] = []
    for i in range(args.channels):
        churches.append(await signup(base, f"Fan-out {i}"))
    specs = [
        Spec(
            "koinonia",
            "127.0.0.1",
            port,
            "/v1/realtime",
            {"Authorization": f"Bearer {key}"},
            "inbox",
        )
        for _, key in churches
        for _ in range(args.per_channel)
    ]
    settings = Settings.from_env(stack.env)
    redis = open_redis(settings.redis)
    publisher = EventPublisher(redis)
    ids = [church for church, _ in churches]
    count = len(ids)

    async def send(phase: str, seqs: Sequence[int]) -> None:
        calls = []
        for seq in seqs:
            # Encoded as is: the bench marker ``k`` is no field of the typed payload.
            raw = event_dict(f"{phase}:{seq}:{time.monotonic_ns()}")
            calls.append(
                publisher.publish_encoded_call(ids[seq % count], "inbox", raw["type"], encode(raw))
            )
        await publisher.scripts.run(calls)

    async def close() -> None:
        await redis.aclose()
        stack.stop_process(process)

    # A burst goes out as pipelines of 50 script calls, 4 in flight (a worker batches too).
    return Target(name, stack.processes[process].pid, specs, send, close, 50, 4)


def import_socketio() -> Any:
    try:
        import socketio
    except ImportError:
        sys.exit(
            "python-socketio is a bench-only dependency: uv run --group bench python bench/fanout.py"
        )
    return socketio


async def start_peer(
    redis_url: str, port: int, channel: str = "socketio"
) -> asyncio.subprocess.Process:
    """A python-socketio node (bench/fanout_peer.py) on ``port``, once it answers."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "bench" / "fanout_peer.py"),
        "--port",
        str(port),
        "--redis-url",
        redis_url,
        "--channel",
        channel,
        start_new_session=True,
    )
    deadline = time.monotonic() + 30
    async with httpx.AsyncClient() as http:
        while True:
            if process.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError("the python-socketio peer did not start")
            try:
                answer = await http.get(
                    f"http://127.0.0.1:{port}/socket.io/?EIO=4&transport=polling"
                )
                if answer.status_code == 200:
                    return process
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)


async def stop_peer(process: asyncio.subprocess.Process) -> None:
    if process.returncode is not None:
        return
    process.terminate()
    try:
        await asyncio.wait_for(process.wait(), 15)
    except TimeoutError:
        process.kill()
        await process.wait()


async def socketio_target(redis_url: str, port: int, args: argparse.Namespace) -> Target:
    socketio = import_socketio()
    process = await start_peer(redis_url, port)
    rooms = [f"church-{i}:inbox" for i in range(args.channels)]
    specs = [
        Spec("socketio", "127.0.0.1", port, "/socket.io/?EIO=4&transport=websocket", {}, room)
        for room in rooms
        for _ in range(args.per_channel)
    ]
    manager = socketio.AsyncRedisManager(redis_url, write_only=True)
    count = len(rooms)

    def emit(phase: str, seq: int) -> Awaitable[None]:
        event = event_dict(f"{phase}:{seq}:{time.monotonic_ns()}")
        return manager.emit(
            "event", {"channel": "inbox", "event": event}, room=rooms[seq % count], namespace="/"
        )

    async def send(phase: str, seqs: Sequence[int]) -> None:
        if len(seqs) == 1:
            await emit(phase, seqs[0])
            return
        for i in range(0, len(seqs), 64):
            await asyncio.gather(*(emit(phase, seq) for seq in seqs[i : i + 64]))

    async def close() -> None:
        await stop_peer(process)

    # Emits are one PUBLISH each: at most 64 at once (redis-py's pool refuses more
    # than 100 connections, and AsyncRedisManager then reconnects and retries).
    return Target("python-socketio", process.pid, specs, send, close, 16, 4)


# -- client processes -------------------------------------------------------------


async def ask(pipe: Connection, message: tuple[Any, ...], timeout_s: float = 60.0) -> Any:
    pipe.send(message)
    return await receive(pipe, timeout_s)


async def receive(pipe: Connection, timeout_s: float) -> Any:
    if not await asyncio.to_thread(pipe.poll, timeout_s):
        raise TimeoutError("a client process did not answer")
    return pipe.recv()


@dataclass
class Clients:
    processes: list[multiprocessing.process.BaseProcess]
    pipes: list[Connection]
    connected: int

    async def count(self, phase: str) -> tuple[int, int]:
        answers = [await ask(p, ("count", phase)) for p in self.pipes]
        return sum(a[0] for a in answers), sum(a[1] for a in answers)

    def cpu(self) -> float:
        return sum(cpu_s(p.pid) for p in self.processes if p.pid is not None)

    async def stop(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(TimeoutError, EOFError, OSError):
                await ask(pipe, ("stop",), 10)
        for process in self.processes:
            await asyncio.to_thread(process.join, 5)
            if process.is_alive():
                process.kill()


async def start_clients(specs: list[Spec], procs: int) -> Clients:
    context = multiprocessing.get_context("spawn")
    processes, pipes = [], []
    for i in range(procs):
        mine, theirs = context.Pipe()
        process = context.Process(
            target=fanout_client.run, args=(theirs, specs[i::procs]), daemon=True
        )
        process.start()
        processes.append(process)
        pipes.append(mine)
    connected = 0
    for pipe in pipes:
        _, n, errors = await receive(pipe, 120)
        connected += n
        for error in errors:
            say(f"client connection failed: {error}")
    return Clients(processes, pipes, connected)


# -- phases -----------------------------------------------------------------------


@dataclass
class Result:
    label: str
    events: int = 0
    rate: float = 0.0
    """Events/s the producer achieved."""
    expected: int = 0
    received: int = 0
    seconds: float = 0.0
    """First publish → last receive."""
    latencies_us: list[int] = field(default_factory=list)
    server_cpu_s: float = 0.0
    server_sys_s: float = 0.0
    """The kernel's share of ``server_cpu_s`` (loopback TCP sends are charged here)."""
    redis_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    producer_cpu_s: float = 0.0
    other_cpu_s: float = 0.0
    """Everything else on the machine meanwhile (other people's tests, Postgres...)."""
    closed: int = 0
    nominal: float = 0.0
    """The paced rate asked for (events/s); 0 for a burst."""

    @property
    def loss(self) -> int:
        return self.expected - self.received

    @property
    def per_s(self) -> float:
        return self.received / self.seconds if self.seconds else 0.0

    def pct_ms(self, q: float) -> float:
        values = self.latencies_us
        if not values:
            return float("nan")
        return values[min(len(values) - 1, int(q * len(values)))] / 1000

    @property
    def us_per_delivery(self) -> float:
        return 1e6 * self.server_cpu_s / self.received if self.received else float("nan")

    @property
    def passed(self) -> bool:
        return self.loss == 0 and self.closed == 0 and self.pct_ms(0.99) < P99_LIMIT_MS


async def burst(target: Target, phase: str, n: int) -> int:
    cursor, chunk = 0, target.chunk

    async def pump() -> None:
        nonlocal cursor
        while cursor < n:
            start = cursor
            cursor = min(n, cursor + chunk)
            await target.send(phase, range(start, cursor))

    await asyncio.gather(*(pump() for _ in range(target.inflight)))
    return n


async def paced(target: Target, phase: str, rate: float, seconds: float) -> int:
    loop = asyncio.get_running_loop()
    total = int(rate * seconds)
    sent = 0
    start = loop.time()
    deadline = start + 3 * seconds + 5
    while sent < total and loop.time() < deadline:
        due = min(total, int((loop.time() - start) * rate) + 1)
        if due > sent:
            await target.send(phase, range(sent, due))
            sent = due
        delay = start + sent / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
    return sent


async def run_phase(
    target: Target,
    clients: Clients,
    redis_pid: int,
    per_channel: int,
    label: str,
    produce: Callable[[str], Awaitable[int]],
) -> Result:
    phase = label.replace(" ", "-")
    _, closed_before = await clients.count(phase)
    (user0, sys0), redis0, client0 = cpu_split(target.pid), cpu_s(redis_pid), clients.cpu()
    producer0, busy0 = time.process_time(), machine_busy_s()
    t0 = time.monotonic_ns()
    events = await produce(phase)
    produced_s = (time.monotonic_ns() - t0) / 1e9
    expected = events * per_channel
    # Drain: until every delivery arrived, or nothing new for 3 s (bounded).
    last, still_since, deadline = -1, time.monotonic(), time.monotonic() + 120
    while time.monotonic() < deadline:
        received, _ = await clients.count(phase)
        if received >= expected:
            break
        if received != last:
            last, still_since = received, time.monotonic()
        elif time.monotonic() - still_since > 3:
            break
        await asyncio.sleep(0.05)
    result = Result(
        label=label,
        events=events,
        rate=events / produced_s if produced_s else 0.0,
        expected=expected,
        server_cpu_s=cpu_s(target.pid) - user0 - sys0,
        server_sys_s=cpu_split(target.pid)[1] - sys0,
        redis_cpu_s=cpu_s(redis_pid) - redis0,
        client_cpu_s=clients.cpu() - client0,
        producer_cpu_s=time.process_time() - producer0,
    )
    result.other_cpu_s = (machine_busy_s() - busy0) - (
        result.server_cpu_s + result.redis_cpu_s + result.client_cpu_s + result.producer_cpu_s
    )
    last_ns = t0
    closed = 0
    for pipe in clients.pipes:
        count, _, last_recv, raw, closes = await ask(pipe, ("report", phase))
        result.received += count
        last_ns = max(last_ns, last_recv)
        latencies = array("q")
        latencies.frombytes(raw)
        result.latencies_us.extend(latencies)
        closed += len(closes)
    result.closed = closed - closed_before
    result.latencies_us.sort()
    result.seconds = (last_ns - t0) / 1e9
    say(
        f"{target.name} {label}: {events:,} events at {result.rate:,.0f}/s, {result.received:,}/{expected:,} deliveries, "
        f"{result.per_s:,.0f}/s, p50 {result.pct_ms(0.5):.2f} ms p99 {result.pct_ms(0.99):.2f} ms, "
        f"{result.us_per_delivery:.1f} µs CPU/delivery on node B ({1e6 * result.server_sys_s / max(1, result.received):.1f} kernel), "
        f"other load {100 * result.other_cpu_s / max(1e-9, result.seconds):.0f} %, closed {result.closed}"
    )
    return result


@dataclass
class Run:
    name: str
    clients: int = 0
    idle_cpu_pct: float = 0.0
    burst: Result | None = None
    paced: Result | None = None
    knee: list[Result] = field(default_factory=list)

    @property
    def knee_rate(self) -> float:
        passing = [r.nominal for r in self.knee if r.passed]
        return max(passing) if passing else 0.0


async def measure(targets: list[Target], redis_pid: int, args: argparse.Namespace) -> list[Run]:
    """Every phase runs on each server in turn, back to back, so that both meet the
    same background load on a shared machine; a failing knee step is tried again
    (``--knee-tries``) before it counts, for the same reason."""
    runs = [Run(t.name) for t in targets]
    pools: list[Clients] = []
    try:
        for target, run in zip(targets, runs, strict=True):
            say(
                f"{target.name} (node B pid {target.pid}): opening {len(target.specs)} client"
                f" connections in {args.client_procs} process(es)"
            )
            pools.append(await start_clients(target.specs, args.client_procs))
            run.clients = pools[-1].connected
            if run.clients != len(target.specs):
                say(f"{target.name}: only {run.clients} of {len(target.specs)} clients connected")
        await asyncio.sleep(1)
        before = [cpu_s(t.pid) for t in targets]
        await asyncio.sleep(3)
        for run, target, cpu0 in zip(runs, targets, before, strict=True):
            run.idle_cpu_pct = 100 * (cpu_s(target.pid) - cpu0) / 3
        per = args.per_channel

        async def phase(
            i: int, label: str, produce: Callable[[Target, str], Awaitable[int]]
        ) -> Result:
            await asyncio.sleep(1)
            target = targets[i]
            return await run_phase(
                target, pools[i], redis_pid, per, label, lambda p: produce(target, p)
            )

        for i in range(len(targets)):
            await phase(i, "warm-up", lambda t, p: paced(t, p, 500, 2))
        for i, run in enumerate(runs):
            run.burst = await phase(i, "burst", lambda t, p: burst(t, p, args.burst))
        for i, run in enumerate(runs):
            run.paced = await phase(
                i,
                f"paced {args.paced_rate}",
                lambda t, p: paced(t, p, args.paced_rate, args.paced_seconds),
            )
        climbing = set(range(len(targets)))
        for rate in args.knee_rates:
            for i in sorted(climbing):
                for attempt in range(max(1, args.knee_tries)):
                    step = await phase(
                        i,
                        f"knee {rate} try {attempt + 1}",
                        lambda t, p, r=rate: paced(t, p, r, args.knee_seconds),
                    )
                    step.nominal = rate
                    if step.passed:
                        break
                runs[i].knee.append(step)
                if not step.passed:
                    climbing.discard(i)
            if not climbing:
                break
    finally:
        for pool in pools:
            await pool.stop()
    return runs


async def metrics_ab(targets: list[Target], redis_pid: int, args: argparse.Namespace) -> None:
    """Metrics off against metrics on, interleaved: each repetition runs one burst on
    each node B, the order alternating, so that both meet the same background load;
    prints node B's CPU per delivery for every run, the medians and their spread."""
    pools = [await start_clients(t.specs, args.client_procs) for t in targets]
    per = args.per_channel
    cost: dict[str, list[float]] = {t.name: [] for t in targets}
    try:
        for i, target in enumerate(targets):
            await run_phase(
                target, pools[i], redis_pid, per, "warm-up", lambda p, t=target: paced(t, p, 500, 2)
            )
        for rep in range(args.metrics_ab):
            order = list(range(len(targets)))
            if rep % 2:
                order.reverse()
            for i in order:
                await asyncio.sleep(1)
                target = targets[i]
                result = await run_phase(
                    target,
                    pools[i],
                    redis_pid,
                    per,
                    f"ab {rep + 1}",
                    lambda p, t=target: burst(t, p, args.burst),
                )
                us = 1e6 * result.server_cpu_s / max(1, result.received)
                cost[target.name].append(us)
                say(
                    f"rep {rep + 1} {target.name}: {us:.2f} us CPU per delivery "
                    f"({result.received:,} of {result.expected:,} delivered, other work "
                    f"{result.other_cpu_s:.1f} s)"
                )
    finally:
        for pool in pools:
            await pool.stop()
    print()
    print("| node B | runs | median us CPU/delivery | spread (min-max) |")
    print("|---|---|---|---|")
    for name, values in cost.items():
        print(
            f"| {name} | {len(values)} | {statistics.median(values):.2f} | "
            f"{min(values):.2f}-{max(values):.2f} |"
        )
    off, on = (statistics.median(v) for v in cost.values())
    print(f"\nmetrics on / off: {on / off:.3f} (median CPU per delivery)")


# -- report -----------------------------------------------------------------------


def report(runs: list[Run], args: argparse.Namespace) -> None:
    def row(label: str, values: list[str]) -> None:
        print(f"| {label} | " + " | ".join(values) + " |")

    def fmt(value: float, spec: str) -> str:
        return format(value, spec) if value == value else "—"

    print()
    print(
        f"{args.channels} channels x {args.per_channel} clients = {args.channels * args.per_channel} WebSockets on node B; "
        f"{args.client_procs} client process(es); {os.cpu_count()} CPUs shared by everything"
    )
    print()
    row("", [r.name for r in runs])
    row("---", ["---"] * len(runs))
    row("clients connected", [str(r.clients) for r in runs])
    row("node B idle CPU", [f"{r.idle_cpu_pct:.1f} %" for r in runs])
    for key, title in (
        ("burst", f"burst {args.burst:,} events"),
        ("paced", f"paced {args.paced_rate}/s x {args.paced_seconds:g} s"),
    ):
        results = [getattr(r, key) for r in runs]
        if any(x is None for x in results):
            continue
        row(f"**{title}**", [""] * len(runs))
        row("producer events/s", [f"{x.rate:,.0f}" for x in results])
        row(
            "deliveries / loss",
            [
                f"{x.received:,} / {x.loss:,}" + (f" ({x.closed} closed)" if x.closed else "")
                for x in results
            ],
        )
        row("deliveries/s", [f"{x.per_s:,.0f}" for x in results])
        row(
            "p50 / p99 / max ms",
            [
                f"{fmt(x.pct_ms(0.5), '.2f')} / {fmt(x.pct_ms(0.99), '.2f')} / {fmt(x.pct_ms(1.0), '.1f')}"
                for x in results
            ],
        )
        row(
            "node B CPU µs/delivery (of it kernel)",
            [
                f"{x.us_per_delivery:.1f} ({1e6 * x.server_sys_s / x.received:.1f})"
                if x.received
                else "—"
                for x in results
            ],
        )
        row(
            "node B CPU %",
            [f"{100 * x.server_cpu_s / x.seconds:.0f} %" if x.seconds else "—" for x in results],
        )
        row(
            "Redis CPU µs/event",
            [f"{1e6 * x.redis_cpu_s / x.events:.1f}" if x.events else "—" for x in results],
        )
        row(
            "producer CPU µs/event",
            [f"{1e6 * x.producer_cpu_s / x.events:.1f}" if x.events else "—" for x in results],
        )
        row(
            "other processes' CPU",
            [f"{100 * x.other_cpu_s / x.seconds:.0f} %" if x.seconds else "—" for x in results],
        )
        row(
            "client CPU µs/delivery",
            [f"{1e6 * x.client_cpu_s / x.received:.1f}" if x.received else "—" for x in results],
        )
    row(
        "**knee** (p99 < 10 ms, 0 loss)",
        [
            f"{r.knee_rate:,.0f} events/s = {r.knee_rate * args.per_channel:,.0f} deliveries/s"
            for r in runs
        ],
    )
    print()
    for r in runs:
        steps = ", ".join(
            f"{x.nominal:,.0f}/s (sent {x.rate:,.0f}/s) p99 {fmt(x.pct_ms(0.99), '.1f')} ms loss {x.loss} {x.us_per_delivery:.1f} µs"
            + f" other {100 * x.other_cpu_s / x.seconds:.0f} %"
            + ("" if x.passed else " ✗")
            for x in r.knee
        )
        print(f"knee steps, {r.name}: {steps}")
    if len(runs) != 2:
        return
    ours, peer = runs
    if ours.burst and peer.burst and ours.paced and peer.paced:
        print()
        print(
            f"CPU per delivery, peer ÷ Koinonia: burst {peer.burst.us_per_delivery / ours.burst.us_per_delivery:.2f}x, "
            f"paced {peer.paced.us_per_delivery / ours.paced.us_per_delivery:.2f}x (goal ≥ 3x)"
        )
        knee = (
            f"{ours.knee_rate / peer.knee_rate:.2f}x" if peer.knee_rate else "peer passed no step"
        )
        print(
            f"knee, Koinonia ÷ peer: {knee} (goal ≥ 2x); burst deliveries/s ratio "
            f"{ours.burst.per_s / peer.burst.per_s:.2f}x"
        )


# -- --cluster: three web nodes, each with a third of the churches ------------------


@dataclass
class Node:
    name: str
    pid: int
    channels: list[int]
    """Indexes of the channels whose clients this node holds."""
    specs: list[Spec]


@dataclass
class Layout:
    """One server kind in one layout: its nodes and the producer of its events."""

    server: str
    label: str
    nodes: list[Node]
    producer: Target
    channels: list[int]
    """The channels events are published for: event ``seq`` goes to
    ``channels[seq % len(channels)]``."""
    share: float
    """Events published, as a share of the phase's count (and rate)."""

    @property
    def name(self) -> str:
        return f"{self.server}, {self.label}"


@dataclass
class NodeFigure:
    node: str
    received: int
    expected: int
    cpu_s: float
    sys_s: float

    @property
    def us_per_delivery(self) -> float:
        return 1e6 * self.cpu_s / self.received if self.received else float("nan")


Produce = Callable[[Target, str, float], Awaitable[int]]
"""Publish a phase's events through a producer, scaled by a layout's ``share``."""


async def layout_phase(
    layout: Layout, label: str, produce: Produce, args: argparse.Namespace
) -> list[NodeFigure]:
    """Connect the layout's clients (one pool per node), publish, drain, disconnect.
    Only this layout's clients are connected meanwhile, so the other layouts' nodes
    hold no subscription (Koinonia) or receive nothing (python-socketio: another
    adapter channel) and stay idle."""
    phase = label.replace(" ", "-")
    pools = [await start_clients(node.specs, args.client_procs) for node in layout.nodes]
    try:
        for node, pool in zip(layout.nodes, pools, strict=True):
            if pool.connected != len(node.specs):
                say(f"{layout.name} {node.name}: {pool.connected} of {len(node.specs)} connected")
        await asyncio.sleep(1)
        before = [cpu_split(node.pid) for node in layout.nodes]
        busy0 = machine_busy_s()
        t0 = time.monotonic()
        events = await produce(layout.producer, phase, layout.share)
        per_channel = [0] * args.channels
        for seq in range(events):
            per_channel[layout.channels[seq % len(layout.channels)]] += 1
        expected = events * args.per_channel
        last, still_since, deadline = -1, time.monotonic(), time.monotonic() + 120
        while time.monotonic() < deadline:
            received = sum([(await pool.count(phase))[0] for pool in pools])
            if received >= expected:
                break
            if received != last:
                last, still_since = received, time.monotonic()
            elif time.monotonic() - still_since > 3:
                break
            await asyncio.sleep(0.05)
        seconds = time.monotonic() - t0
        figures = []
        for node, pool, (user0, sys0) in zip(layout.nodes, pools, before, strict=True):
            user1, sys1 = cpu_split(node.pid)
            figures.append(
                NodeFigure(
                    node=node.name,
                    received=(await pool.count(phase))[0],
                    expected=sum(per_channel[c] for c in node.channels) * args.per_channel,
                    cpu_s=(user1 - user0) + (sys1 - sys0),
                    sys_s=sys1 - sys0,
                )
            )
        other = 100 * (machine_busy_s() - busy0 - sum(f.cpu_s for f in figures)) / seconds
        say(
            f"{layout.name} {label}: {events:,} events in {seconds:.1f} s; "
            + "; ".join(
                f"{f.node} {f.received:,}/{f.expected:,} deliveries {f.us_per_delivery:.1f} µs CPU each"
                for f in figures
            )
            + f"; rest of the machine {other:.0f} %"
        )
        return figures
    finally:
        for pool in pools:
            await pool.stop()


async def cluster_main(args: argparse.Namespace) -> None:
    """Koinonia on an embedded Redis Cluster (sharded pub/sub), python-socketio on one
    standalone Redis (its adapter's classic PUBLISH to every node). Three layouts of
    each: one node holding every client (events for every channel); one node holding
    a third of the channels with events for those only, at a third of the count and
    rate (the control: the same load per node as below, without other nodes'
    traffic); three nodes holding a third each, events for every channel. Every
    phase runs on the six layouts in turn, the order rotating between repetitions."""
    if args.channels % 3:
        sys.exit("--cluster needs --channels divisible by 3 (a third per node)")
    socketio = import_socketio()
    ports = free_ports(9)
    sim_port, k_ports, s_ports = ports[0], ports[1:5], ports[5:9]
    env = dict(os.environ)
    for name in ("REDIS_URL", "REDIS_CLUSTER_NODES"):
        env.pop(name, None)
    env.update(
        {
            "KOINONIA_DEV_REDIS_CLUSTER": "1",
            "KOINONIA_LOG_LEVEL": "WARNING",
            "KOINONIA_RATE_STARTER": "1000000",
            "KOINONIA_RATE_API_KEY": "1000000",
            "KOINONIA_RATE_LOGIN_IP": "100000",
        }
    )
    data_dir = Path(tempfile.mkdtemp(prefix="koinonia-fanout-cluster-"))
    stack = Stack(
        data_dir, http_port=k_ports[0], sim_port=sim_port, env=env, fast_unsafe=True, quiet=False
    )
    peer_redis = EmbeddedRedis(data_dir / "peer-redis", persist=False)
    peers: list[asyncio.subprocess.Process] = []
    redis_clients: list[Any] = []
    managers: list[Any] = []
    try:
        await asyncio.to_thread(stack.start_stores)
        peer_url = await asyncio.to_thread(peer_redis.start)
        k_names = ["k-one", "k-1", "k-2", "k-3"]
        for name, port in zip(k_names, k_ports, strict=True):
            stack.spawn(name, "web", env={**stack.env, "KOINONIA_HTTP_PORT": str(port)})
        for port in k_ports:
            await asyncio.to_thread(stack.wait_ready, f"http://127.0.0.1:{port}/health/ready")
        base = f"http://127.0.0.1:{k_ports[0]}"
        churches = [await signup(base, f"Fan-out {i}") for i in range(args.channels)]
        say(f"{len(churches)} churches signed up; Koinonia nodes on {k_ports}")
        # The one-node layouts' peer has an adapter channel of its own: the three
        # nodes' events never reach it, nor its events them.
        peers.append(await start_peer(peer_url, s_ports[0], "socketio-single"))
        for port in s_ports[1:]:
            peers.append(await start_peer(peer_url, port, "socketio"))
        rooms = [f"church-{i}:inbox" for i in range(args.channels)]
        keys = [key for _, key in churches]
        ids = [church for church, _ in churches]
        settings = Settings.from_env(stack.env)
        redis = open_redis(settings.redis)
        redis_clients.append(redis)
        publisher = EventPublisher(redis)

        def k_specs(port: int, channels: list[int]) -> list[Spec]:
            return [
                Spec(
                    "koinonia",
                    "127.0.0.1",
                    port,
                    "/v1/realtime",
                    {"Authorization": f"Bearer {keys[c]}"},
                    "inbox",
                )
                for c in channels
                for _ in range(args.per_channel)
            ]

        def s_specs(port: int, channels: list[int]) -> list[Spec]:
            return [
                Spec(
                    "socketio",
                    "127.0.0.1",
                    port,
                    "/socket.io/?EIO=4&transport=websocket",
                    {},
                    rooms[c],
                )
                for c in channels
                for _ in range(args.per_channel)
            ]

        def k_producer(channels: list[int]) -> Target:
            async def send(phase: str, seqs: Sequence[int]) -> None:
                calls = []
                for seq in seqs:
                    raw = event_dict(f"{phase}:{seq}:{time.monotonic_ns()}")
                    church = ids[channels[seq % len(channels)]]
                    calls.append(
                        publisher.publish_encoded_call(church, "inbox", raw["type"], encode(raw))
                    )
                await publisher.scripts.run(calls)

            return Target("Koinonia", 0, [], send, nothing, 50, 4)

        def s_producer(adapter_channel: str, channels: list[int]) -> Target:
            manager = socketio.AsyncRedisManager(peer_url, channel=adapter_channel, write_only=True)
            managers.append(manager)

            def emit(phase: str, seq: int) -> Awaitable[None]:
                event = event_dict(f"{phase}:{seq}:{time.monotonic_ns()}")
                result: Awaitable[None] = manager.emit(
                    "event",
                    {"channel": "inbox", "event": event},
                    room=rooms[channels[seq % len(channels)]],
                    namespace="/",
                )
                return result

            async def send(phase: str, seqs: Sequence[int]) -> None:
                for i in range(0, len(seqs), 64):
                    await asyncio.gather(*(emit(phase, seq) for seq in seqs[i : i + 64]))

            return Target("python-socketio", 0, [], send, nothing, 16, 4)

        async def nothing() -> None:
            return None

        every = list(range(args.channels))
        thirds = [every[n::3] for n in range(3)]
        k_pids = [stack.processes[name].pid for name in k_names]
        s_pids = [peer.pid for peer in peers]
        one_all, one_third, three = "1 node, all channels", "1 node, a third", "3 nodes"
        layouts = [
            Layout(
                "Koinonia",
                one_all,
                [Node("node", k_pids[0], every, k_specs(k_ports[0], every))],
                k_producer(every),
                every,
                1.0,
            ),
            Layout(
                "Koinonia",
                one_third,
                [Node("node", k_pids[0], thirds[0], k_specs(k_ports[0], thirds[0]))],
                k_producer(thirds[0]),
                thirds[0],
                1 / 3,
            ),
            Layout(
                "Koinonia",
                three,
                [
                    Node(
                        f"node {n + 1}",
                        k_pids[n + 1],
                        thirds[n],
                        k_specs(k_ports[n + 1], thirds[n]),
                    )
                    for n in range(3)
                ],
                k_producer(every),
                every,
                1.0,
            ),
            Layout(
                "python-socketio",
                one_all,
                [Node("node", s_pids[0], every, s_specs(s_ports[0], every))],
                s_producer("socketio-single", every),
                every,
                1.0,
            ),
            Layout(
                "python-socketio",
                one_third,
                [Node("node", s_pids[0], thirds[0], s_specs(s_ports[0], thirds[0]))],
                s_producer("socketio-single", thirds[0]),
                thirds[0],
                1 / 3,
            ),
            Layout(
                "python-socketio",
                three,
                [
                    Node(
                        f"node {n + 1}",
                        s_pids[n + 1],
                        thirds[n],
                        s_specs(s_ports[n + 1], thirds[n]),
                    )
                    for n in range(3)
                ],
                s_producer("socketio", every),
                every,
                1.0,
            ),
        ]
        phases: list[tuple[str, Produce]] = [
            (f"burst {args.burst}", lambda t, p, share: burst(t, p, round(args.burst * share))),
            (
                f"paced {args.paced_rate}",
                lambda t, p, share: paced(t, p, args.paced_rate * share, args.paced_seconds),
            ),
        ]
        results: dict[tuple[str, str], list[list[NodeFigure]]] = {}
        for layout in layouts:
            await layout_phase(
                layout, "warm-up", lambda t, p, share: paced(t, p, 200 * share, 1), args
            )
        for rep in range(args.cluster_reps):
            shift = rep % len(layouts)
            order = layouts[shift:] + layouts[:shift]
            if rep % 2:
                order.reverse()
            for label, produce in phases:
                for layout in order:
                    figures = await layout_phase(layout, f"{label} rep {rep + 1}", produce, args)
                    results.setdefault((label, layout.name), []).append(figures)
        cluster_report(results, layouts, [label for label, _ in phases], args)
    finally:
        for manager in managers:
            with contextlib.suppress(Exception):
                await manager.redis.aclose()
        for client in redis_clients:
            await client.aclose()
        for peer in peers:
            await stop_peer(peer)
        peer_redis.stop()
        stack.stop()


def cluster_report(
    results: dict[tuple[str, str], list[list[NodeFigure]]],
    layouts: list[Layout],
    labels: list[str],
    args: argparse.Namespace,
) -> None:
    print()
    print(
        f"{args.channels} channels x {args.per_channel} clients; {args.cluster_reps} repetition(s), "
        f"order rotating; {os.cpu_count()} CPUs shared by everything. Koinonia: embedded Redis "
        "Cluster (3 masters), SPUBLISH per church; python-socketio: one standalone Redis, "
        "AsyncRedisManager (every node receives every event). '1 node, a third': the node "
        "holds a third of the channels and only their events are published (a third of the "
        "count and rate): the per-node load of '3 nodes' without the other nodes' events."
    )
    for label in labels:
        print()
        print(f"**{label}** — node CPU µs per delivery (kernel), median over repetitions [min-max]")
        print()
        print(
            "| layout | node | deliveries (last rep) | µs CPU per delivery | "
            "÷ 1 node, all channels | ÷ 1 node, a third |"
        )
        print("|---|---|---|---|---|---|")
        for server in dict.fromkeys(layout.server for layout in layouts):

            def base(kind: str, server: str = server, label: str = label) -> float:
                values = [
                    f[0].us_per_delivery for f in results.get((label, f"{server}, {kind}"), [])
                ]
                return statistics.median(values) if values else float("nan")

            base_all, base_third = base("1 node, all channels"), base("1 node, a third")
            for layout in layouts:
                if layout.server != server:
                    continue
                reps = results.get((label, layout.name), [])
                if not reps:
                    continue
                for i, node in enumerate(layout.nodes):
                    values = [r[i].us_per_delivery for r in reps]
                    kernel = statistics.median(
                        1e6 * r[i].sys_s / max(1, r[i].received) for r in reps
                    )
                    last = reps[-1][i]
                    med = statistics.median(values)
                    print(
                        f"| {layout.name} | {node.name} | {last.received:,} of {last.expected:,} | "
                        f"{med:.1f} ({kernel:.1f}) [{min(values):.1f}-{max(values):.1f}] | "
                        f"{med / base_all:.2f}x | {med / base_third:.2f}x |"
                    )


# -- main ---------------------------------------------------------------------------


async def main_async(args: argparse.Namespace) -> None:
    if args.nice:
        # Inherited by every child: Redis, Postgres, node B, the client processes.
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)
    web_port, peer_port, sim_port = free_ports(3)
    env = dict(os.environ)
    env.update(
        {
            "KOINONIA_LOG_LEVEL": "WARNING",
            "KOINONIA_RATE_STARTER": "1000000",
            "KOINONIA_RATE_API_KEY": "1000000",
            "KOINONIA_RATE_LOGIN_IP": "100000",
        }
    )
    stack = Stack(
        Path(tempfile.mkdtemp(prefix="koinonia-fanout-")),
        http_port=web_port,
        sim_port=sim_port,
        env=env,
        fast_unsafe=True,
        quiet=False,
    )
    runs: list[Run] = []
    try:
        await asyncio.to_thread(stack.start_stores)
        assert stack.redis is not None, (
            "the bench measures its own embedded Redis (unset REDIS_URL)"
        )
        redis_pid = int(stack.redis.pid_path.read_text().split()[0])
        targets: list[Target] = []
        if args.metrics_ab:
            try:
                on_port = free_ports(1)[0]
                targets.append(
                    await koinonia_target(
                        stack, web_port, args, name="metrics off", process="web-off",
                        env={"KOINONIA_WEB_METRICS_PORT": "off"},
                    )
                )  # fmt: skip
                targets.append(
                    await koinonia_target(
                        stack, on_port, args, name="metrics on", process="web-on",
                        env={"KOINONIA_WEB_METRICS_PORT": "0", "KOINONIA_HTTP_PORT": str(on_port)},
                    )
                )  # fmt: skip
                await metrics_ab(targets, redis_pid, args)
            finally:
                for target in targets:
                    await target.close()
            return
        try:
            for server in args.servers:
                if server == "koinonia":
                    targets.append(await koinonia_target(stack, web_port, args))
                else:
                    targets.append(await socketio_target(stack.env["REDIS_URL"], peer_port, args))
            runs = await measure(targets, redis_pid, args)
        finally:
            for target in targets:
                await target.close()
        report(runs, args)
    finally:
        stack.stop()


async def stoppable(work: Awaitable[None]) -> None:
    """Run ``work``, cancelled by SIGTERM (``timeout``, job control), so that its
    finally blocks still stop every server the bench started (uvloop runs a Python
    signal handler only once something else wakes its loop)."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    await work


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--channels", type=int, default=50)
    parser.add_argument("--per-channel", type=int, default=10)
    parser.add_argument("--client-procs", type=int, default=1)
    parser.add_argument("--burst", type=int, default=20_000, help="events in the burst")
    parser.add_argument("--paced-rate", type=int, default=500)
    parser.add_argument("--paced-seconds", type=float, default=10.0)
    parser.add_argument(
        "--knee-rates",
        type=lambda s: [int(x) for x in s.split(",") if x],
        default=[100, 250, 500, 1000, 1500, 2000, 3000, 4000, 6000, 8000],
    )
    parser.add_argument("--knee-seconds", type=float, default=5.0)
    parser.add_argument(
        "--knee-tries", type=int, default=2, help="attempts at a knee step before it fails"
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="scheduling priority for the bench and all it starts (e.g. -5, as root) to "
        "shield latencies from other work on a shared machine",
    )
    parser.add_argument("--servers", type=lambda s: s.split(","), default=["koinonia", "socketio"])
    parser.add_argument(
        "--metrics-ab",
        type=int,
        default=0,
        metavar="REPS",
        help="instead of the comparison: node B with metrics off against metrics on, "
        "REPS interleaved bursts each (CPU per delivery, medians and spread)",
    )
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="instead of the comparison: one node against three nodes (a third of the "
        "channels each), Koinonia on an embedded Redis Cluster, python-socketio on one Redis",
    )
    parser.add_argument(
        "--cluster-reps", type=int, default=2, help="repetitions of every --cluster phase"
    )
    args = parser.parse_args()
    import uvloop

    uvloop.run(stoppable(cluster_main(args) if args.cluster else main_async(args)))


if __name__ == "__main__":
    main()
