"""REST read throughput and latency: the two list endpoints under a real HTTP load.

Seeds (once; reused from the data folder afterwards) one church of 20,000
members with ~2,000 broadcasts over the six past months (≥ 1,000,000 recipient
rows in month partitions), four smaller neighbour churches, and a few thousand
conversations; then starts embedded Postgres and Redis and ``koinonia web
--workers N`` for each N, and loads

    GET /v1/messages?limit=50      (the page of broadcasts)
    GET /v1/conversations          (the inbox, 50 per page)

with an API key. The church's and the key's rate limits are raised through
the settings (KOINONIA_RATE_*) so nothing is refused, while every request
still authenticates and is charged to the limiter where the route is guarded
(the check before loading reports whether RateLimit-* headers came back).

Phases per web configuration: a correctness check, a warm-up, maximum
throughput with ``wrk`` (Debian package ``wrk``) at a few connection counts,
then a fixed-rate run at half the best throughput with a paced client in its
own process whose latencies are measured from each request's scheduled send
time (no coordinated omission). Prints req/s, latency percentiles, errors and
where the CPU went (web, Postgres, Redis, load generator, other).

    uv run python bench/rest.py                       # web --workers 1, 2, 3
    uv run python bench/rest.py --workers 2 --connections 64 --duration 5
    uv run python bench/rest.py --profile             # + py-spy of one web process
    uv run python bench/rest.py --reseed              # throw the seeded data away first
    uv run python bench/rest.py --metrics-ab 5        # CPU per request, metrics off vs on
    uv run python bench/rest.py --replicas 1          # primary alone vs + 1 streaming replica

``--metrics-ab REPS`` runs two web nodes side by side on the same stores, one with
``KOINONIA_WEB_METRICS_PORT=off`` (no server, no instrumentation) and one with
metrics on, and loads them in turn at the same fixed rate, the order alternating
each repetition so both meet the same background; it prints each run's web CPU
per request, the medians, their spread and the on/off ratio.

Unless ``--no-reference``, every max-throughput run is paired with the same run
against ``bench/rest_reference.py``: a bare Starlette + psycopg app running each
page's own SELECT (same church, same limit) and encoding the rows with msgspec, with
no auth, limits or middleware, under the same uvicorn options, worker count and pool
size, on the same Postgres. The two alternate (the order flips every run), and the
ratio Koinonia / reference is printed next to req/s and web CPU per request.

``--replicas N`` starts N embedded streaming replicas (deploy/embedded_replica.py) and
runs each web configuration twice: with the primary alone, then with
``DATABASE_REPLICA_URLS`` naming the replicas. Each Postgres is its own CPU group, and
a summary gives CPU per request of each and what a second machine for the replicas
would give (their CPU moved off this box).

Numbers only; it asserts nothing but the response shape checked before loading.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ENDPOINTS = {
    "messages": "/v1/messages?limit=50",
    "conversations": "/v1/conversations",
}
NOISY = 20.0  # % of a core used by processes not ours: the run is marked (and retried)
UNTHROTTLED = "100000000"  # requests per minute: far above anything two cores serve
DEFAULT_DATA_DIR = ROOT / ".koinonia" / "bench-rest"
REPLICA_GROUP = "postgres replica "
"""CPU groups of the embedded replicas (--replicas): this prefix and the replica's number."""
OUT_DIR = ROOT / "bench" / "out"


def say(text: str) -> None:
    print(f"[rest] {text}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# The paced client: its own process, requests on a fixed schedule.
# --------------------------------------------------------------------------


async def _paced(cfg: dict[str, Any]) -> dict[str, Any]:
    host, port, path = cfg["host"], cfg["port"], cfg["path"]
    rate, duration, conns = float(cfg["rate"]), float(cfg["duration"]), int(cfg["connections"])
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Authorization: Bearer {cfg['key']}\r\nAccept: application/json\r\n\r\n"
    ).encode()
    total = int(rate * duration)
    queue: asyncio.Queue[float | None] = asyncio.Queue()
    latencies: list[float] = []
    statuses: collections.Counter[int] = collections.Counter()
    errors = 0
    lag_max = 0.0

    async def connection() -> None:
        nonlocal errors
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        while True:
            scheduled = await queue.get()
            if scheduled is None:
                break
            for _attempt in range(2):
                try:
                    if writer is None or reader is None:
                        reader, writer = await asyncio.open_connection(host, port)
                    writer.write(request)
                    head = await reader.readuntil(b"\r\n\r\n")
                    status = int(head[9:12])
                    length = 0
                    close = False
                    for line in head.split(b"\r\n")[1:]:
                        name, _, value = line.partition(b":")
                        lname = name.strip().lower()
                        if lname == b"content-length":
                            length = int(value)
                        elif lname == b"connection" and value.strip().lower() == b"close":
                            close = True
                        elif lname == b"transfer-encoding":
                            raise RuntimeError("chunked responses are not expected here")
                    if length:
                        await reader.readexactly(length)
                    latencies.append(time.perf_counter() - scheduled)
                    statuses[status] += 1
                    if close:
                        writer.close()
                        reader = writer = None
                    break
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    errors += 1
                    if writer is not None:
                        writer.close()
                    reader = writer = None

    workers = [asyncio.create_task(connection()) for _ in range(conns)]
    await asyncio.sleep(0.2)
    start = time.perf_counter() + 0.05
    i = 0
    while i < total:
        now = time.perf_counter()
        while i < total and start + i / rate <= now:
            queue.put_nowait(start + i / rate)
            i += 1
        lag_max = max(lag_max, now - (start + (i - 1) / rate))
        if i < total:
            await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
    for _ in workers:
        queue.put_nowait(None)
    await asyncio.gather(*workers)
    elapsed = time.perf_counter() - start
    ordered = sorted(latencies)

    def pct(q: float) -> float:
        return (
            ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000
            if ordered
            else float("nan")
        )

    return {
        "requests": len(latencies),
        "elapsed_s": elapsed,
        "rps": len(latencies) / elapsed if elapsed else 0.0,
        "p50": pct(0.50),
        "p90": pct(0.90),
        "p99": pct(0.99),
        "max": ordered[-1] * 1000 if ordered else float("nan"),
        "non2xx": sum(n for s, n in statuses.items() if not 200 <= s < 300),
        "socket_errors": errors,
        "dispatch_lag_max_ms": lag_max * 1000,
    }


def paced_client_main(raw: str) -> None:
    cfg = json.loads(raw)
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        result = runner.run(_paced(cfg))
    print("PACEDJSON " + json.dumps(result), flush=True)


# --------------------------------------------------------------------------
# Where the CPU goes during a run.
# --------------------------------------------------------------------------


class CpuSplit:
    """CPU seconds by process group between start() and stop(), as % of one core."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        import psutil

        self._psutil = psutil
        self.roots = groups
        self._before: dict[str, dict[int, float]] = {}
        self._busy_before = 0.0
        self._t0 = 0.0

    def _tree(self, pid: int) -> list[Any]:
        try:
            root = self._psutil.Process(pid)
            return [root, *root.children(recursive=True)]
        except self._psutil.Error:
            return []

    def _snapshot(self) -> dict[str, dict[int, float]]:
        out: dict[str, dict[int, float]] = {}
        for group, pids in self.roots.items():
            seen: dict[int, float] = {}
            kernel: dict[int, float] = {}
            for pid in pids:
                for proc in self._tree(pid):
                    try:
                        t = proc.cpu_times()
                        seen[proc.pid] = t.user + t.system
                        kernel[proc.pid] = t.system
                    except self._psutil.Error:
                        pass
            out[group] = seen
            out[group + " sys"] = kernel
        return out

    def _machine(self) -> tuple[float, float]:
        """(busy CPU seconds of the whole machine, of which interrupts and softirqs)."""
        t = self._psutil.cpu_times()
        irq = getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
        return sum(t) - t.idle - getattr(t, "iowait", 0.0), irq

    def start(self) -> None:
        self._before = self._snapshot()
        self._busy_before, self._irq_before = self._machine()
        self._t0 = time.monotonic()

    def stop(self, exited: dict[int, float] | None = None) -> dict[str, float]:
        """``exited``: CPU seconds of children that ended within the window (their
        rusage from wait4), which psutil can no longer read."""
        wall = time.monotonic() - self._t0
        after = self._snapshot()
        for pid, seconds in (exited or {}).items():
            for group, pids in self.roots.items():
                if pid in pids:
                    after[group][pid] = seconds
        busy, irq = self._machine()
        busy -= self._busy_before
        irq -= self._irq_before
        split: dict[str, float] = {}
        for group, seen in after.items():
            before = self._before.get(group, {})
            split[group] = sum(v - before.get(pid, 0.0) for pid, v in seen.items()) / wall * 100
        split["irq"] = irq / wall * 100
        counted = sum(v for k, v in split.items() if not k.endswith(" sys"))
        split["other"] = max(0.0, busy / wall * 100 - counted)
        split["total"] = busy / wall * 100
        return split


def cpu_text(split: dict[str, float]) -> str:
    """``web 92 (sys 30) pg 41 redis 7 load 4 irq 2 other 9 = 155``: % of one core
    (with replicas, ``pg 41 replica1 20 redis ...``)."""
    replicas = "".join(
        f"replica{name.removeprefix(REPLICA_GROUP)} {value:.0f} "
        for name, value in split.items()
        if name.startswith(REPLICA_GROUP) and not name.endswith(" sys")
    )
    return (
        f"web {split.get('web', 0):.0f} (sys {split.get('web sys', 0):.0f}) "
        f"pg {split.get('postgres', 0):.0f} {replicas}redis {split.get('redis', 0):.0f} "
        f"load {split.get('load', 0):.0f} irq {split.get('irq', 0):.0f} "
        f"other {split.get('other', 0):.0f} = {split.get('total', 0):.0f}"
    )


# --------------------------------------------------------------------------
# Load runs.
# --------------------------------------------------------------------------

WRK_SCRIPT = """
wrk.method = "GET"
wrk.headers["Authorization"] = "Bearer %s"
wrk.headers["Accept"] = "application/json"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%%d,"duration_us":%%d,"connect":%%d,"read":%%d,"write":%%d,' ..
    '"status":%%d,"timeout":%%d,"p50":%%d,"p90":%%d,"p99":%%d,"max":%%d}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


@dataclass
class Row:
    phase: str
    endpoint: str
    workers: int
    connections: int
    rps: float
    p50: float
    p90: float
    p99: float
    max: float
    errors: int
    cpu: dict[str, float] = field(default_factory=dict)
    target: float | None = None
    note: str = ""
    reads: str = ""
    """With --replicas: ``primary`` (no replica given to web) or ``N replicas``."""
    reference: Row | None = None
    """The reference server's run paired with this one (same phase, endpoint, load)."""

    def web_ms(self) -> float:
        """Web CPU ms per request (% of one core / req/s x 10)."""
        return self.cpu.get("web", 0.0) * 10 / max(1.0, self.rps)

    def ratio_text(self) -> str:
        """``ref 2,883 req/s, ratio 0.42; web CPU 1.25 / 0.48 ms, ratio 0.38``."""
        ref = self.reference
        if ref is None:
            return ""
        web, ref_web = self.web_ms(), ref.web_ms()
        return (
            f"ref {ref.rps:,.0f} req/s, ratio {self.rps / max(1.0, ref.rps):.2f}; "
            f"web CPU {web:.2f} / {ref_web:.2f} ms, ratio {ref_web / max(1e-9, web):.2f}"
        )


def finish(process: subprocess.Popen[str]) -> tuple[str, str, float]:
    """Read a child's output to the end and reap it; also its CPU seconds."""
    assert process.stdout is not None
    assert process.stderr is not None
    out = process.stdout.read()
    err = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return out, err, usage.ru_utime + usage.ru_stime


def machine_busy(seconds: float = 1.0) -> float:
    """Busy % of the whole machine (0-100) over ``seconds``."""
    import psutil

    return float(psutil.cpu_percent(interval=seconds))


def wait_quiet(limit: float, max_wait: float, own: list[int]) -> float:
    """Wait until the machine is quiet (other people's test suites share it):
    busy < ``limit`` % outside our own processes, for up to ``max_wait`` s.
    Returns the last busy % seen."""
    import psutil

    deadline = time.monotonic() + max_wait
    told = False
    while True:
        split = CpuSplit({"own": own})
        split.start()
        time.sleep(2.0)
        cpu = split.stop()
        foreign = (cpu["total"] - cpu["own"]) / psutil.cpu_count()
        if foreign < limit or time.monotonic() > deadline:
            if foreign >= limit:
                say(f"machine still {foreign:.0f} % busy with other work; measuring anyway")
            return foreign
        if not told:
            say(f"machine {foreign:.0f} % busy with other work; waiting (up to {max_wait:.0f} s)")
            told = True


def require_wrk() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise SystemExit(
            "bench/rest.py needs wrk, the HTTP load generator, which is not installed.\n"
            "Install it from Debian's packages:  apt-get update && apt-get install -y wrk"
        )
    return path


class Load:
    def __init__(
        self,
        wrk: str,
        base: str,
        key: str,
        groups: dict[str, list[int]],
        threads: int,
        *,
        quiet: float = 100.0,
        quiet_wait: float = 0.0,
        retries: int = 0,
    ) -> None:
        self.wrk = wrk
        self.base = base
        self.key = key
        self.groups = groups
        self.threads = threads
        self.quiet = quiet
        self.quiet_wait = quiet_wait
        self.retries = retries
        self.script = Path(tempfile.mkdtemp(prefix="koinonia-rest-")) / "auth.lua"
        self.script.write_text(WRK_SCRIPT % key)
        self.script.chmod(0o600)

    def _settle(self) -> None:
        if self.quiet < 100:
            wait_quiet(
                self.quiet, self.quiet_wait, [p for pids in self.groups.values() for p in pids]
            )

    @staticmethod
    def _noise(cpu: dict[str, float]) -> str:
        """Other people's work on the machine during the run, when it was notable."""
        other = cpu.get("other", 0.0)
        return f"noisy: other work took {other:.0f} % of a core" if other > NOISY else ""

    def _least_noisy(self, attempt: Any) -> Row:
        """Run ``attempt()`` again (up to ``retries`` more times) while other people's
        work took a notable share of the machine; keep the quietest run."""
        rows: list[Row] = []
        for i in range(self.retries + 1):
            row = attempt()
            rows.append(row)
            if row.cpu.get("other", 0.0) <= NOISY:
                break
            if i < self.retries:
                say(f"noisy run (other work {row.cpu['other']:.0f} % of a core): again")
        return min(rows, key=lambda r: r.cpu.get("other", 0.0))

    def wrk_run(self, *a: Any, **kw: Any) -> Row:
        if kw.get("phase") == "warm-up":
            return self._wrk_once(*a, **kw)
        return self._least_noisy(lambda: self._wrk_once(*a, **kw))

    def paced_run(self, *a: Any, **kw: Any) -> Row:
        return self._least_noisy(lambda: self._paced_once(*a, **kw))

    def _wrk_once(
        self, endpoint: str, workers: int, connections: int, duration: float, *, phase: str = "max"
    ) -> Row:
        command = [
            self.wrk, f"-t{min(self.threads, connections)}", f"-c{connections}",
            f"-d{max(1, round(duration))}s", "--timeout", "5s", "-s", str(self.script),
            self.base + ENDPOINTS[endpoint],
        ]  # fmt: skip
        if phase != "warm-up":
            self._settle()
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        split = CpuSplit({**self.groups, "load": [process.pid]})
        time.sleep(0.3)  # connections open before the CPU window starts
        split.start()
        out, err, used = finish(process)
        cpu = split.stop({process.pid: used})
        line = next((x for x in out.splitlines() if x.startswith("WRKJSON ")), None)
        if process.returncode != 0 or line is None:
            raise RuntimeError(f"wrk failed ({process.returncode}): {err.strip() or out.strip()}")
        r = json.loads(line[len("WRKJSON ") :])
        kinds = {k: r[k] for k in ("connect", "read", "write", "status", "timeout") if r[k]}
        errors = sum(kinds.values())
        noise = self._noise(cpu)
        detail = ", ".join(f"{v} {'non-2xx' if k == 'status' else k}" for k, v in kinds.items())
        return Row(
            phase,
            endpoint,
            workers,
            connections,
            r["requests"] / (r["duration_us"] / 1e6),
            r["p50"] / 1000,
            r["p90"] / 1000,
            r["p99"] / 1000,
            r["max"] / 1000,
            errors,
            cpu,
            note="; ".join(x for x in (noise, f"errors: {detail}" if detail else "") if x),
        )

    def _paced_once(
        self, endpoint: str, workers: int, rate: float, duration: float, connections: int
    ) -> Row:
        host, _, port = self.base.removeprefix("http://").partition(":")
        cfg = {
            "host": host, "port": int(port), "path": ENDPOINTS[endpoint], "key": self.key,
            "rate": rate, "duration": duration, "connections": connections,
        }  # fmt: skip
        self._settle()
        process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--paced-client", json.dumps(cfg)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        split = CpuSplit({**self.groups, "load": [process.pid]})
        time.sleep(0.5)
        split.start()
        out, err, used = finish(process)
        cpu = split.stop({process.pid: used})
        line = next((x for x in out.splitlines() if x.startswith("PACEDJSON ")), None)
        if process.returncode != 0 or line is None:
            raise RuntimeError(f"paced client failed ({process.returncode}): {err.strip()}")
        r = json.loads(line[len("PACEDJSON ") :])
        notes = [self._noise(cpu)]
        if r["rps"] < 0.97 * rate:
            notes.append(f"achieved only {r['rps']:.0f} of {rate:.0f} req/s")
        if r["dispatch_lag_max_ms"] > 5:
            notes.append(f"client fell {r['dispatch_lag_max_ms']:.0f} ms behind schedule")
        note = "; ".join(n for n in notes if n)
        return Row(
            "paced",
            endpoint,
            workers,
            connections,
            r["rps"],
            r["p50"],
            r["p90"],
            r["p99"],
            r["max"],
            r["non2xx"] + r["socket_errors"],
            cpu,
            target=rate,
            note=note,
        )


# --------------------------------------------------------------------------
# Correctness before loading.
# --------------------------------------------------------------------------


def expect(condition: bool, problem: str) -> None:
    if not condition:
        raise SystemExit(f"response check failed: {problem}")


def check_responses(base: str, key: str) -> bool:
    """Status, envelope and page shape of both endpoints; returns whether the
    RateLimit-* headers came back (the request went through the limiter)."""
    import httpx

    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
        first = client.get(ENDPOINTS["messages"])
        expect(first.status_code == 200, f"{first.status_code} {first.text[:300]}")
        body = first.json()
        expect(body["success"] is True, "success is not true")
        expect(
            isinstance(body["meta"]["request_id"], str), f"meta without request_id: {body['meta']}"
        )
        items = body["data"]
        expect(len(items) == 50, f"{len(items)} items, not 50")
        for item in items:
            for name in ("id", "body", "target", "status", "recipient_count", "created_at"):
                expect(name in item, f"{name} missing in {item}")
        stamps = [i["created_at"] for i in items]
        expect(stamps == sorted(stamps, reverse=True), "messages not newest first")
        cursor = body["meta"]["next_cursor"]
        expect(isinstance(cursor, str) and bool(cursor), "no next_cursor on a full page")
        second = client.get(ENDPOINTS["messages"] + f"&cursor={cursor}").json()
        expect(len(second["data"]) == 50, f"second page has {len(second['data'])} items")
        expect(
            second["data"][0]["created_at"] <= stamps[-1], "second page not older than the first"
        )
        # The recipient rows are where the message id says (UUIDv7 ↔ created_at).
        big = next((i for i in items + second["data"] if i["recipient_count"] > 100), items[0])
        detail = client.get(f"/v1/messages/{big['id']}").json()["data"]
        counts = detail["counts"]
        expect(
            sum(counts.values()) == big["recipient_count"] and counts["delivered"] > 0,
            f"counts {counts} do not match recipient_count {big['recipient_count']}",
        )
        conversations = client.get(ENDPOINTS["conversations"])
        expect(conversations.status_code == 200, conversations.text[:300])
        cbody = conversations.json()
        expect(cbody["success"] is True, "conversations: success is not true")
        expect(len(cbody["data"]) == 50, f"conversations: {len(cbody['data'])} items, not 50")
        for item in cbody["data"]:
            for name in ("id", "member_id", "status", "unread_count", "last_message_at"):
                expect(name in item, f"{name} missing in {item}")
        limited = {
            name: "ratelimit-remaining" in r.headers for name, r in
            (("messages", first), ("conversations", conversations))
        }  # fmt: skip
    say(
        "responses check out: 200, 50 items, envelope, cursor, counts "
        f"({sum(counts.values()):,} recipients of one broadcast)"
    )
    for name, present in limited.items():
        if present:
            say(f"GET {ENDPOINTS[name]}: RateLimit-Remaining present (auth + limiter charged)")
        else:
            say(
                f"WARNING: GET {ENDPOINTS[name]} answered without RateLimit-* headers: "
                "the route is not behind the limiter (api/guard.py) yet"
            )
    return all(limited.values())


# --------------------------------------------------------------------------
# Profile: py-spy on one web process during a max-throughput run.
# --------------------------------------------------------------------------

# (function or "" for any, a part of the file path): a sample counts in a layer
# when any of its frames matches one of the layer's patterns.
# Exclusive attribution: every sample goes to the innermost Python frame's
# library (GC wherever it struck). With --native, the share of those samples
# whose leaf is a system call is shown beside it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("redis-py (auth GET, limiter EVALSHA)", ("/redis/",)),
    ("psycopg_pool (connection checkout/return)", ("/psycopg_pool/",)),
    ("psycopg (send query, fetch, load rows)", ("/psycopg/",)),
    ("json.loads of jsonb columns (psycopg loader)", ("/json/",)),
    ("starlette (routing, middleware, request, response)", ("/starlette/",)),
    ("uvicorn (HTTP protocol, ASGI cycle)", ("/uvicorn/",)),
    ("own code api/ storage/ (incl. msgspec calls)", ("/api/", "/storage/", "/deploy/")),
    ("asyncio (streams, tasks, futures)", ("/asyncio/",)),
    ("logging", ("/logging/",)),
]
SYSCALLS = {"write", "send", "sendto", "writev", "read", "recv", "recvfrom", "epoll_wait",
            "epoll_pwait", "epoll_ctl", "getpid", "syscall"}  # fmt: skip
# Inclusive: a sample counts when any frame is one of these functions.
FUNCTIONS: list[tuple[str, str, str]] = [
    ("auth: principal_for_api_key (Redis GET, msgpack decode)", "principal_for_api_key", ""),
    ("limiter: charge (church limit cache, GCRA EVALSHA)", "charge", "api/guard.py"),
    ("list query: list_messages / list_conversations", "list_", "storage/"),
    ("envelope: ok() (msgspec JSON encode, Response)", "ok", "storage/domain/envelope.py"),
]


def _frame_file(frame: str) -> str:
    return frame.rpartition(" (")[2]


def profile(pid: int, seconds: float, out: Path, *, native: bool, rate: int = 250) -> str:
    candidates = [
        shutil.which("py-spy"),
        Path(sys.executable).parent / "py-spy",
        Path.home() / ".local/bin/py-spy",
    ]
    pyspy = next((str(c) for c in candidates if c and Path(c).exists()), None)
    if pyspy is None:
        raise SystemExit(
            "--profile needs py-spy, which is not a project dependency: "
            "`uv tool install py-spy` (or `uv pip install py-spy`)"
        )
    raw = out.with_suffix(".txt")
    # --native shows the C underneath (libpq, uvloop, psycopg's C module) but
    # pauses the process at every sample; without it py-spy reads it unpaused.
    mode = ["--native"] if native else ["--nonblocking"]
    subprocess.run(
        [pyspy, "record", "--pid", str(pid), "-d", str(int(seconds)), "-r", str(rate),
         "-f", "raw", "-o", str(raw), *mode],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    subprocess.run(
        [pyspy, "record", "--pid", str(pid), "-d", "5", "-r", str(rate),
         "-o", str(out.with_suffix(".svg")), *mode],
        check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    return summarize_profile(raw, seconds * rate)


def _layer_of(python: list[str]) -> str:
    """The innermost library of a stack's Python frames; asyncio only when no other
    library is under it (a Redis write is redis-py's, though asyncio streams do it)."""
    if not python:
        return "event loop / interpreter (uvloop, C)"
    fallback = "other Python"
    for frame in reversed(python):
        where = "/" + _frame_file(frame)
        label = next((lb for lb, parts in LAYERS if any(p in where for p in parts)), None)
        if label is None:
            continue
        if label.startswith("asyncio"):
            fallback = label
            continue
        return label
    return fallback


def summarize_profile(raw: Path, expected: float) -> str:
    stacks: list[tuple[list[str], int]] = []
    for line in raw.read_text().splitlines():
        frames, _, count = line.rpartition(" ")
        if frames and count.isdigit():
            stacks.append((frames.split(";"), int(count)))
    total = sum(n for _, n in stacks) or 1
    layer: collections.Counter[str] = collections.Counter()
    in_syscall: collections.Counter[str] = collections.Counter()
    for frames, n in stacks:
        if any(f.startswith("gc_collect_main ") for f in frames):
            name = "garbage collector (gc_collect_main)"
        else:
            name = _layer_of([f for f in frames if ".py:" in f])
        layer[name] += n
        if frames[-1].split(" (")[0] in SYSCALLS:
            in_syscall[name] += n
    lines = [
        f"py-spy: {total} non-idle samples of ~{expected:.0f} "
        f"(the process ran or waited for a CPU ~{100 * total / expected:.0f}% of the time)",
        "innermost layer of each sample (exclusive; 'syscall' = leaf is a system call):",
    ]
    for name, n in layer.most_common():
        sc = in_syscall[name]
        extra = f"  (syscall {100 * sc / total:4.1f} %)" if sc else ""
        lines.append(f"  {100 * n / total:5.1f} %  {name}{extra}")
    lines.append("functions of interest (inclusive):")
    for label, func, part in FUNCTIONS:
        hit = 0
        for frames, n in stacks:
            for f in frames:
                name, _, where = f.partition(" (")
                if (
                    name.startswith(func) if func.endswith("_") else name == func
                ) and part in where:
                    hit += n
                    break
        lines.append(f"  {100 * hit / total:5.1f} %  {label}")
    leaf: collections.Counter[str] = collections.Counter()
    for frames, n in stacks:
        leaf[frames[-1]] += n
    lines.append("top self time (leaf frames):")
    for frame, n in leaf.most_common(10):
        lines.append(f"  {100 * n / total:5.1f} %  {frame[:110]}")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# The run.
# --------------------------------------------------------------------------


def _pin(pids: list[int], cpus: list[int]) -> None:
    import psutil

    for pid in pids:
        try:
            root = psutil.Process(pid)
            for proc in [root, *root.children(recursive=True)]:
                proc.cpu_affinity(cpus)
        except psutil.Error:
            pass


def profile_phase(
    load: Load, groups: dict[str, list[int]], workers: int, args: argparse.Namespace
) -> list[str]:
    """py-spy on one web process while wrk drives it at max throughput. With one
    web process on two cores, the web process gets CPU 0 to itself and Postgres,
    Redis and wrk share CPU 1, so the samples show work, not waiting for a CPU
    after waking Redis or Postgres up."""
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    pid = web_worker_pids(groups["web"][0])[0]
    pin = workers == 1 and (os.cpu_count() or 1) >= 2 and not args.no_pin
    everything = [p for pids in groups.values() for p in pids]
    all_cpus = list(range(os.cpu_count() or 1))
    texts = []
    try:
        if pin:
            _pin([pid], [0])
            _pin([p for g, pids in groups.items() if g != "web" for p in pids], [1])
        for endpoint in ENDPOINTS:
            load._settle()
            say(f"profiling web pid {pid} under wrk -c{max(args.connections)} on {endpoint}")
            process = subprocess.Popen(
                [load.wrk, "-t1", f"-c{max(args.connections)}",
                 f"-d{int(args.profile_seconds) + 9}s", "-s", str(load.script),
                 load.base + ENDPOINTS[endpoint]],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            if pin:
                _pin([process.pid], [1])
            time.sleep(1)
            out = OUT_DIR / f"rest-profile-{endpoint}-web{workers}"
            summary = profile(pid, args.profile_seconds, out, native=args.native)
            stdout, _, _ = finish(process)
            line = next((x for x in stdout.splitlines() if x.startswith("WRKJSON ")), None)
            rps = ""
            if line is not None:
                r = json.loads(line[len("WRKJSON ") :])
                rps = (
                    f"; wrk got {r['requests'] / (r['duration_us'] / 1e6):,.0f} req/s while sampled"
                )
            placement = "; web pinned to CPU 0, Postgres + Redis + wrk to CPU 1" if pin else ""
            texts.append(
                f"## {ENDPOINTS[endpoint]}, web --workers {workers}{placement}{rps}\n"
                f"(py-spy{' --native' if args.native else ''}; raw stacks {out.with_suffix('.txt')}, "
                f"flame graph {out.with_suffix('.svg')})\n{summary}"
            )
    finally:
        if pin:
            _pin(everything, all_cpus)
    return texts


def web_worker_pids(pid: int) -> list[int]:
    import psutil

    proc = psutil.Process(pid)
    children = [
        c.pid for c in proc.children()
        if any("spawn_main" in part for part in c.cmdline())
    ]  # fmt: skip
    return children or [pid]


def store_pids(stack: Any) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    if stack.postgres is not None:
        pidfile = stack.postgres.pgdata / "postmaster.pid"
        groups["postgres"] = [int(pidfile.read_text().split()[0])]
    if stack.redis is not None:
        groups["redis"] = [int(stack.redis.pid_path.read_text().split()[0])]
    for replica in getattr(stack, "replicas", []):
        pidfile = replica.pgdata / "postmaster.pid"
        groups[f"{REPLICA_GROUP}{replica.index}"] = [int(pidfile.read_text().split()[0])]
    return groups


def print_table(rows: list[Row], limited: bool) -> None:
    # The reads column only with --replicas: the default table stays as it was.
    reads = any(r.reads for r in rows)
    refs = any(r.reference for r in rows)
    print()
    print(
        "| phase | endpoint | web procs | "
        + ("reads | " if reads else "")
        + "conns | target req/s | req/s | p50 ms | p90 ms | p99 ms | max ms | errors | CPU, % of one core (machine: 200) |"
        + (
            " reference req/s (ratio) | web CPU ms/req: Koinonia / reference (ratio) |"
            if refs
            else ""
        )
    )
    print(
        "|---|---|---|---|---|---|---|---|---|---|---|---|"
        + ("---|" if reads else "")
        + ("---|---|" if refs else "")
    )
    for r in rows:
        target = f"{r.target:,.0f}" if r.target else "max"
        note = f" — {r.note}" if r.note else ""
        ref = r.reference
        extra = ""
        if refs:
            extra = (
                f" {ref.rps:,.0f} ({r.rps / max(1.0, ref.rps):.2f}) | "
                f"{r.web_ms():.2f} / {ref.web_ms():.2f} ({ref.web_ms() / max(1e-9, r.web_ms()):.2f}) |"
                if ref is not None
                else " | |"
            )
        print(
            f"| {r.phase} | {ENDPOINTS[r.endpoint]} | {r.workers} | "
            + (f"{r.reads} | " if reads else "")
            + f"{r.connections} | {target} | "
            f"{r.rps:,.0f} | {r.p50:.1f} | {r.p90:.1f} | {r.p99:.1f} | {r.max:.1f} | {r.errors} | "
            f"{cpu_text(r.cpu)}{note} |{extra}"
        )
    paired = [r for r in rows if r.reference is not None]
    if paired:
        import statistics

        print()
        print("Koinonia / reference (median over the paired max-throughput runs):")
        for endpoint in ENDPOINTS:
            for workers in sorted({r.workers for r in paired}):
                mine = [r for r in paired if (r.endpoint, r.workers) == (endpoint, workers)]
                if not mine:
                    continue
                rps = statistics.median(
                    r.rps / max(1.0, r.reference.rps) for r in mine if r.reference
                )
                cpu = statistics.median(
                    r.reference.web_ms() / max(1e-9, r.web_ms()) for r in mine if r.reference
                )
                print(
                    f"- {ENDPOINTS[endpoint]} web={workers}: req/s ratio {rps:.2f}, "
                    f"web CPU per request ratio (reference / Koinonia) {cpu:.2f} over {len(mine)} run(s)"
                )
    if not limited:
        print(
            "\nnote: at least one endpoint answered without RateLimit-* headers (not charged to the limiter)"
        )


def metrics_ab(
    stack: Any, wrk: str, key: str, args: argparse.Namespace, ports: dict[str, int]
) -> None:
    """Web CPU per request with metrics off and on, interleaved (see the module text)."""
    import statistics

    workers = args.workers[0]
    loads: dict[str, Load] = {}
    for name, port in ports.items():
        env = {
            **stack.env,
            "KOINONIA_HTTP_PORT": str(port),
            "KOINONIA_WEB_METRICS_PORT": "off" if name == "off" else "0",
        }
        say(f"starting web (metrics {name}) on port {port}, --workers {workers}")
        stack.spawn(f"web-{name}", "web", "--workers", str(workers), env=env)
        stack.wait_ready(f"http://127.0.0.1:{port}/health/ready", timeout_s=90)
        base = f"http://127.0.0.1:{port}"
        check_responses(base, key)
        groups = {"web": [stack.processes[f"web-{name}"].pid], **store_pids(stack)}
        loads[name] = Load(
            wrk, base, key, groups, args.wrk_threads,
            quiet=args.quiet, quiet_wait=args.quiet_wait, retries=args.retries,
        )  # fmt: skip
    for load in loads.values():
        for endpoint in ENDPOINTS:
            load.wrk_run(endpoint, workers, 16, args.warmup, phase="warm-up")
    say(f"warmed up both nodes; {args.metrics_ab} repetitions at {args.ab_rate:.0f} req/s")
    cost: dict[tuple[str, str], list[float]] = {}
    for rep in range(args.metrics_ab):
        order = list(loads) if rep % 2 == 0 else list(reversed(loads))
        for endpoint in ENDPOINTS:
            for name in order:
                row = loads[name].paced_run(
                    endpoint, workers, args.ab_rate, args.paced_duration, args.paced_connections
                )
                # % of one core over the window / requests per second = CPU s per request
                ms = 10 * row.cpu.get("web", 0.0) / max(1.0, row.rps)
                cost.setdefault((endpoint, name), []).append(ms)
                say(
                    f"rep {rep + 1} {endpoint:13s} metrics {name:3s}: {ms:.3f} ms web CPU per "
                    f"request ({row.rps:,.0f} req/s, p99 {row.p99:.1f} ms, errors {row.errors}) "
                    f"{row.note}"
                )
    print()
    print(f"web --workers {workers}, paced {args.ab_rate:.0f} req/s x {args.paced_duration:g} s")
    print()
    print("| endpoint | metrics | runs | median ms web CPU/request | spread (min-max) |")
    print("|---|---|---|---|---|")
    for (endpoint, name), values in cost.items():
        print(
            f"| {ENDPOINTS[endpoint]} | {name} | {len(values)} | "
            f"{statistics.median(values):.3f} | {min(values):.3f}-{max(values):.3f} |"
        )
    print()
    for endpoint in ENDPOINTS:
        off = statistics.median(cost[(endpoint, "off")])
        on = statistics.median(cost[(endpoint, "on")])
        print(f"{ENDPOINTS[endpoint]}: metrics on / off = {on / off:.3f} (median CPU per request)")


def wait_replicas_caught_up(stack: Any, timeout_s: float = 600.0) -> None:
    """Wait until every replica has replayed what the primary holds now (a fresh seed
    is a lot of WAL): a replica still replaying would be skipped, or compete for CPU."""
    import psycopg

    def lsn(url: str, query: str) -> int:
        with psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute(query).fetchone()
        assert row is not None
        high, low = str(row[0]).split("/")
        return (int(high, 16) << 32) + int(low, 16)

    target = lsn(stack.env["DATABASE_URL"], "SELECT pg_current_wal_lsn()")
    deadline = time.monotonic() + timeout_s
    for replica in stack.replicas:
        while lsn(replica.url, "SELECT pg_last_wal_replay_lsn()") < target:
            if time.monotonic() > deadline:
                raise SystemExit(f"replica {replica.index} did not catch up in {timeout_s:.0f} s")
            time.sleep(0.2)
    say(f"{len(stack.replicas)} replica(s) caught up with the primary")


def print_replica_summary(rows: list[Row]) -> None:
    """Primary alone against primary + replicas, per endpoint and web count: req/s,
    p99, CPU per request of each Postgres, and what moving the replicas' CPU to a
    machine of their own would give (an estimate from the measured CPU, CPU-bound)."""
    cores = os.cpu_count() or 1

    def ms(row: Row, *groups: str) -> float:
        """CPU ms per request of ``groups`` (% of one core / req/s x 10)."""
        return sum(row.cpu.get(g, 0.0) for g in groups) * 10 / max(1.0, row.rps)

    def replicas_of(row: Row) -> list[str]:
        return sorted(g for g in row.cpu if g.startswith(REPLICA_GROUP) and not g.endswith(" sys"))

    print()
    print("Replicas: best max-throughput run and the paced run of each configuration")
    print()
    print(
        "| endpoint | web procs | reads | req/s (max) | p99 ms (max) | p99 ms (paced) | "
        "CPU ms/request: web | primary | replicas | redis | load |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    estimates: list[str] = []
    keys = sorted({(r.endpoint, r.workers) for r in rows}, key=lambda k: (k[1], k[0]))
    for endpoint, workers in keys:
        alone_local = None
        for reads in sorted({r.reads for r in rows}, key=lambda x: x != "primary"):
            mine = [
                r for r in rows if (r.endpoint, r.workers, r.reads) == (endpoint, workers, reads)
            ]
            best = max((r for r in mine if r.phase == "max"), key=lambda r: r.rps, default=None)
            paced = next((r for r in mine if r.phase == "paced"), None)
            if best is None:
                continue
            replica_groups = replicas_of(best)
            local = ms(best, "web", "postgres", "redis", "load", "irq")
            replica = ms(best, *replica_groups)
            print(
                f"| {ENDPOINTS[endpoint]} | {workers} | {reads} | {best.rps:,.0f} | {best.p99:.1f} | "
                f"{paced.p99 if paced else float('nan'):.1f} | {ms(best, 'web'):.2f} | "
                f"{ms(best, 'postgres'):.2f} | {replica:.2f} | {ms(best, 'redis'):.2f} | "
                f"{ms(best, 'load'):.2f} |"
            )
            if reads == "primary":
                alone_local = local
                continue
            here = cores * 1000 / (local + replica)
            split = cores * 1000 / local
            line = (
                f"{ENDPOINTS[endpoint]} web={workers}: on this box web+primary+redis+load "
                f"{local:.2f} ms + replicas {replica:.2f} ms per request -> ~{here:,.0f} req/s on "
                f"{cores} cores; replicas on a second machine -> this box spends {local:.2f} ms "
                f"-> ~{split:,.0f} req/s"
            )
            if replica > 0:
                line += (
                    f" (the replica machine, {cores} cores: ~{cores * 1000 / replica:,.0f} req/s)"
                )
            if alone_local:
                line += f"; primary alone: {alone_local:.2f} ms -> ~{cores * 1000 / alone_local:,.0f} req/s"
            estimates.append(line)
    if estimates:
        print()
        print("Second machine for the replicas (estimate: CPU-bound, from CPU per request above):")
        for line in estimates:
            print(f"- {line}")


def paired_run(
    load: Load,
    ref_load: Load | None,
    endpoint: str,
    workers: int,
    connections: int,
    args: argparse.Namespace,
    rep: int,
) -> Row:
    """One max-throughput run of Koinonia, paired with the reference's when there is
    one; who goes first alternates (``rep``), so both meet the same background."""
    if ref_load is None:
        return load.wrk_run(endpoint, workers, connections, args.duration)
    if rep % 2 == 0:
        row = load.wrk_run(endpoint, workers, connections, args.duration)
        ref = ref_load.wrk_run(endpoint, workers, connections, args.duration)
    else:
        ref = ref_load.wrk_run(endpoint, workers, connections, args.duration)
        row = load.wrk_run(endpoint, workers, connections, args.duration)
    row.reference = ref
    return row


def start_reference(
    env: dict[str, str], church_id: str, workers: int, port: int, log: Path
) -> subprocess.Popen[bytes]:
    """bench/rest_reference.py on ``port``, ready (GET /health) on return."""
    import urllib.request

    ref_env = {**env, "REFERENCE_CHURCH_ID": church_id}
    out = log.open("ab")
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "rest_reference.py"),
         "--port", str(port), "--workers", str(workers)],
        env=ref_env, stdout=out, stderr=out,
    )  # fmt: skip
    out.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the reference server exited ({process.returncode}); see {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as answer:
                if answer.status == 200:
                    return process
        except OSError:
            time.sleep(0.2)
    stop_reference(process)
    raise SystemExit(f"the reference server did not start; see {log}")


def stop_reference(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run(args: argparse.Namespace) -> None:
    from rest_seed import SeedPlan, load_or_seed

    from deploy.stack import Stack, free_ports
    from storage.domain.phones import PhoneVault
    from storage.process.settings import Settings

    wrk = require_wrk()

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # so that the finally below stops the stack

    signal.signal(signal.SIGTERM, on_term)
    data_dir = Path(args.data_dir).absolute()
    if args.reseed and data_dir.exists():
        say(f"--reseed: removing {data_dir}")
        shutil.rmtree(data_dir)
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
    for name in ("DATABASE_URL", "REDIS_URL"):
        env.pop(name, None)  # always the bench's own embedded stores
    stack = Stack(
        data_dir, http_port=web_port, sim_port=sim_port, env=env, quiet=False,
        replicas=args.replicas,
    )  # fmt: skip
    rows: list[Row] = []
    limited = True
    profiles: list[str] = []
    try:
        stack.start_stores()
        settings = Settings.from_env(stack.env)
        vault = PhoneVault(settings.security.phone_key, settings.security.lookup_key)
        plan = SeedPlan(members=args.members, broadcasts=args.broadcasts, months=args.months)
        seeded = load_or_seed(stack.env["DATABASE_URL"], vault, data_dir, plan, args.reseed)
        say(
            f"data: {seeded.recipients:,} recipient rows, {seeded.messages:,} broadcasts, "
            f"{seeded.conversations:,} conversations, {seeded.conversation_messages:,} conversation messages"
        )
        base = f"http://127.0.0.1:{web_port}"
        if args.metrics_ab:
            off_port, on_port = free_ports(2)
            metrics_ab(stack, wrk, seeded.api_key, args, {"off": off_port, "on": on_port})
            return
        configurations = [""]
        if args.replicas:
            wait_replicas_caught_up(stack)
            configurations = ["primary", f"{args.replicas} replica{'s' * (args.replicas > 1)}"]
        for workers, reads in ((w, c) for w in args.workers for c in configurations):
            web_env = dict(stack.env)
            if reads == "primary":
                # The replicas run (and are measured) but web is not told of them.
                web_env.pop("DATABASE_REPLICA_URLS", None)
            say(
                f"starting koinonia web --workers {workers}"
                + (f", reads: {reads}" if reads else "")
            )
            stack.spawn("web", "web", "--workers", str(workers), env=web_env)
            stack.wait_ready(timeout_s=90)
            limited = check_responses(base, seeded.api_key) and limited
            groups = {"web": [stack.processes["web"].pid], **store_pids(stack)}
            load = Load(
                wrk, base, seeded.api_key, groups, args.wrk_threads,
                quiet=args.quiet, quiet_wait=args.quiet_wait, retries=args.retries,
            )  # fmt: skip
            ref_load: Load | None = None
            if not args.no_reference:
                (ref_port,) = free_ports(1)
                say(f"starting the reference server (bench/rest_reference.py) --workers {workers}")
                reference = start_reference(
                    web_env, seeded.church_id, workers, ref_port, data_dir / "reference.log"
                )
                ref_groups = {"web": [reference.pid], **store_pids(stack)}
                ref_load = Load(
                    wrk, f"http://127.0.0.1:{ref_port}", seeded.api_key, ref_groups,
                    args.wrk_threads, quiet=args.quiet, quiet_wait=args.quiet_wait,
                    retries=args.retries,
                )  # fmt: skip
            for endpoint in ENDPOINTS:
                load.wrk_run(endpoint, workers, max(args.connections), args.warmup, phase="warm-up")
                if ref_load is not None:
                    ref_load.wrk_run(
                        endpoint, workers, max(args.connections), args.warmup, phase="warm-up"
                    )
            say(f"warmed up ({args.warmup:.0f} s per endpoint)")
            for endpoint in ENDPOINTS:
                best: Row | None = None
                for connections in args.connections:
                    for rep in range(args.reference_reps if ref_load is not None else 1):
                        row = paired_run(load, ref_load, endpoint, workers, connections, args, rep)
                        row.reads = reads
                        rows.append(row)
                        say(
                            f"max  {endpoint:13s} web={workers} c={connections:<4d} {row.rps:8,.0f} req/s  p99 {row.p99:6.1f} ms  errors {row.errors}  cpu {cpu_text(row.cpu)}"
                            + (f"  [{row.ratio_text()}]" if row.reference else "")
                        )
                        if best is None or row.rps > best.rps:
                            best = row
                assert best is not None
                rate = best.rps / 2
                row = load.paced_run(
                    endpoint, workers, rate, args.paced_duration, args.paced_connections
                )
                row.reads = reads
                rows.append(row)
                say(
                    f"paced {endpoint:12s} web={workers} {rate:6,.0f}/s   {row.rps:8,.0f} req/s  p50 {row.p50:.1f} p90 {row.p90:.1f} p99 {row.p99:.1f} max {row.max:.1f} ms  errors {row.errors}  cpu {cpu_text(row.cpu)} {row.note}"
                )
            if args.profile and workers == args.profile_workers:
                profiles += profile_phase(load, groups, workers, args)
            if ref_load is not None:
                stop_reference(reference)
            stack.stop_process("web")
    finally:
        stack.stop()
    print(
        f"\nmachine: {os.cpu_count()} cores; data: {seeded.recipients:,} recipient rows in "
        f"{seeded.messages:,} broadcasts over {args.months} past months (+ this one), "
        f"{seeded.conversations:,} conversations; Postgres pool max {args.pool_max} per web process"
    )
    print_table(rows, limited)
    if args.replicas:
        print_replica_summary(rows)
    for text in profiles:
        print()
        print(text)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--paced-client":
        paced_client_main(sys.argv[2])
        return
    sys.path.insert(0, str(ROOT / "bench"))
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )

    def ints(raw: str) -> list[int]:
        return [int(x) for x in raw.split(",") if x.strip()]

    parser.add_argument(
        "--workers", type=ints, default=[1, 2, 3], help="web process counts, e.g. 1,2,3"
    )
    parser.add_argument(
        "--connections", type=ints, default=[16, 64, 128], help="wrk connection counts"
    )
    parser.add_argument(
        "--duration", type=float, default=10.0, help="seconds per max-throughput run"
    )
    parser.add_argument("--warmup", type=float, default=4.0, help="seconds of warm-up per endpoint")
    parser.add_argument("--paced-duration", type=float, default=20.0)
    parser.add_argument("--paced-connections", type=int, default=32)
    parser.add_argument("--wrk-threads", type=int, default=1)
    parser.add_argument(
        "--pool-max", type=int, default=20, help="KOINONIA_DB_POOL_MAX per web process"
    )
    parser.add_argument(
        "--quiet", type=float, default=15.0,
        help="before each run, wait until other processes use less than this %% of the machine",
    )  # fmt: skip
    parser.add_argument("--quiet-wait", type=float, default=180.0, help="longest wait for that, s")
    parser.add_argument(
        "--retries", type=int, default=2, help="runs again when other work disturbed it"
    )
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    parser.add_argument(
        "--reseed", action="store_true", help="delete the data folder and seed again"
    )
    parser.add_argument("--members", type=int, default=20_000)
    parser.add_argument("--broadcasts", type=int, default=2_000)
    parser.add_argument("--months", type=int, default=6)
    parser.add_argument("--profile", action="store_true", help="py-spy one web process under load")
    parser.add_argument(
        "--replicas", type=int, default=0,
        help="N embedded streaming replicas: each web configuration runs with the primary "
        "alone, then with DATABASE_REPLICA_URLS",
    )  # fmt: skip
    parser.add_argument(
        "--metrics-ab", type=int, default=0, metavar="REPS",
        help="web CPU per request with metrics off and on, REPS interleaved repetitions",
    )  # fmt: skip
    parser.add_argument(
        "--ab-rate", type=float, default=300.0, help="fixed request rate of --metrics-ab runs"
    )
    parser.add_argument(
        "--profile-workers", type=int, default=1, help="web process count to profile at"
    )
    parser.add_argument("--profile-seconds", type=float, default=15.0)
    parser.add_argument(
        "--no-pin", action="store_true", help="profile without pinning web to a core of its own"
    )
    parser.add_argument(
        "--no-reference",
        action="store_true",
        help="do not pair the max-throughput runs with bench/rest_reference.py",
    )
    parser.add_argument(
        "--reference-reps",
        type=int,
        default=1,
        help="paired Koinonia/reference runs per endpoint and connection count",
    )
    parser.add_argument(
        "--native",
        action="store_true",
        help="py-spy --native (C frames; pauses the process per sample)",
    )
    run(parser.parse_args())


if __name__ == "__main__":
    main()
