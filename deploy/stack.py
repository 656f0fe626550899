"""The whole development stack as child processes: what ``koinonia dev`` runs.

Embedded Postgres and Redis when no URLs are given, migrations, then the
provider simulator, one web process, one worker and the scheduler, wired to
each other through environment variables. Once ready it writes
``<data dir>/stack.json`` (deploy/stack_file.py), where operator commands find
its stores, and removes it when it stops. The test suite and the benches use
the same class, so they exercise the same start-up path as a developer.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import httpx

from delivery.simulator import new_signing_seed, public_key_b64
from deploy.embedded import EmbeddedServerError, free_port
from deploy.embedded_pgbouncer import EmbeddedPgBouncer
from deploy.embedded_postgres import EmbeddedPostgres
from deploy.embedded_redis import EmbeddedRedis
from deploy.embedded_redis_cluster import EmbeddedRedisCluster
from deploy.embedded_replica import EmbeddedReplica
from deploy.stack_file import (
    Endpoint,
    MetricsEndpoint,
    Process,
    RedisEntry,
    RedisNode,
    StackFile,
    remove_stack_file,
    stack_file_path,
    write_stack_file,
)
from storage.pg.database import migrate
from storage.process.settings import METRICS_PROCESSES, metrics_port_variable

INBOUND_PATH = "/v1/provider/telnyx/webhooks"
METRICS_KINDS = METRICS_PROCESSES
"""The process kinds that serve ``/metrics``."""


def dev_secrets(data_dir: Path) -> dict[str, str]:
    """Keys for development, made once and kept in the data folder (never used in
    production, where they come from the environment)."""
    path = data_dir / "dev-secrets.json"
    if path.exists():
        loaded: dict[str, str] = json.loads(path.read_text())
        return loaded
    secrets = {
        "KOINONIA_PHONE_KEY": base64.b64encode(os.urandom(32)).decode(),
        "KOINONIA_LOOKUP_KEY": base64.b64encode(os.urandom(32)).decode(),
        "KOINONIA_SIM_SIGNING_SEED": new_signing_seed(),
    }
    path.write_text(json.dumps(secrets))
    path.chmod(0o600)
    return secrets


def say(text: str) -> None:
    """Progress for the person who started the command (stderr; stdout stays clean)."""
    print(f"koinonia: {text}", file=sys.stderr, flush=True)


class Stack:
    """Starts and stops embedded stores and the process types of the Procfile."""

    def __init__(
        self,
        data_dir: Path,
        *,
        http_port: int = 8000,
        sim_port: int = 8025,
        env: Mapping[str, str] | None = None,
        fast_unsafe: bool = False,
        quiet: bool = False,
        log_dir: Path | None = None,
        metrics_port: str | None = "0",
        replicas: int | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.replica_count = replicas
        """How many embedded streaming replicas to run (None: ``KOINONIA_DEV_REPLICAS``
        of ``env``, default 0)."""
        self.metrics_port = metrics_port
        """The metrics port of every child whose variable is unset: ``0`` (any free
        port; tests and benches never collide), None for the settings' defaults
        (``koinonia dev``: 9180, 9181, 9182)."""
        self.log_dir = log_dir
        """When set, each child's stdout and stderr (its JSON log lines) are appended to
        ``<log_dir>/<name>.log`` instead of the terminal (the test suite reads them)."""
        self.http_port = http_port
        self.sim_port = sim_port
        self.base_env = dict(os.environ if env is None else env)
        self.fast_unsafe = fast_unsafe
        self.quiet = quiet
        self.postgres: EmbeddedPostgres | None = None
        self.redis: EmbeddedRedis | None = None
        self.redis_cluster: EmbeddedRedisCluster | None = None
        """Started instead of ``redis`` with ``KOINONIA_DEV_REDIS_CLUSTER=1``."""
        self.pgbouncer: EmbeddedPgBouncer | None = None
        self.replicas: list[EmbeddedReplica] = []
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        # Per process name: its kind (``koinonia <kind>``) and the URL it serves.
        self.kinds: dict[str, str] = {}
        self.addresses: dict[str, str | None] = {}
        self.metrics: dict[str, str] = {}
        """Per process name: the ``host:port`` of its ``/metrics``, learned from the
        address file the child writes once bound (so that port 0 works)."""
        self._metrics_files: dict[str, Path] = {}
        self.env: dict[str, str] = {}
        self.stack_file = stack_file_path(data_dir)
        self._stack_file_written = False

    def _say(self, text: str) -> None:
        if not self.quiet:
            say(text)

    def start_stores(self) -> dict[str, str]:
        """Embedded Postgres/Redis unless URLs are given; migrations; the child env."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = dict(self.base_env)
        secrets = dev_secrets(self.data_dir)
        for name, value in secrets.items():
            env.setdefault(name, value)
        if not env.get("DATABASE_URL"):
            self._say(f"starting embedded Postgres in {self.data_dir / 'postgres'}")
            self.postgres = EmbeddedPostgres(self.data_dir, fast_unsafe=self.fast_unsafe)
            env["DATABASE_URL"] = self.postgres.start()
        if env.get("REDIS_CLUSTER_NODES"):
            pass  # an external cluster: the children's settings read it
        elif not env.get("REDIS_URL") and env.get("KOINONIA_DEV_REDIS_CLUSTER", "") in (
            "1",
            "true",
            "yes",
        ):
            self._say("starting embedded Redis Cluster (3 masters, 3 replicas)")
            self.redis_cluster = EmbeddedRedisCluster(self.data_dir, persist=not self.fast_unsafe)
            self.redis_cluster.start()
            env["REDIS_CLUSTER_NODES"] = self.redis_cluster.cluster_nodes_setting
        elif not env.get("REDIS_URL"):
            self._say("starting embedded Redis")
            self.redis = EmbeddedRedis(self.data_dir, persist=not self.fast_unsafe)
            env["REDIS_URL"] = self.redis.start()
        self._say("applying migrations")
        self._start_pgbouncer(env)
        applied = asyncio.run(migrate(env.get("DATABASE_SESSION_URL") or env["DATABASE_URL"]))
        if applied:
            self._say(f"migrations applied: {', '.join(applied)}")
        self._start_replicas(env)
        public = f"http://127.0.0.1:{self.http_port}"
        env.setdefault("KOINONIA_ENV", "development")
        # Development receivers (a local webhook consumer) live on loopback.
        env.setdefault("KOINONIA_WEBHOOK_ALLOW_PRIVATE", "true")
        env["KOINONIA_HTTP_PORT"] = str(self.http_port)
        env["KOINONIA_SIM_PORT"] = str(self.sim_port)
        env.setdefault("KOINONIA_PUBLIC_URL", public)
        env.setdefault("KOINONIA_PROVIDER_URL", f"http://127.0.0.1:{self.sim_port}")
        env.setdefault(
            "KOINONIA_PROVIDER_PUBLIC_KEY", public_key_b64(env["KOINONIA_SIM_SIGNING_SEED"])
        )
        env.setdefault("KOINONIA_SIM_WEBHOOK_URL", env["KOINONIA_PUBLIC_URL"] + INBOUND_PATH)
        env.setdefault("KOINONIA_SIM_STATE_FILE", str(self.data_dir / "simulator-state.msgpack"))
        # The stack's objects under its own data folder, not under whatever folder each
        # child starts in (what KOINONIA_OBJECT_STORE_URL's default would resolve to).
        env.setdefault("KOINONIA_OBJECT_STORE_URL", (self.data_dir.resolve() / "objects").as_uri())
        env.setdefault("KOINONIA_ALLOWED_ORIGINS", f"http://localhost:{self.http_port}")
        if self.metrics_port is not None:
            for kind in METRICS_KINDS:
                env.setdefault(metrics_port_variable(kind), self.metrics_port)
        self.env = env
        return env

    def _start_replicas(self, env: dict[str, str]) -> None:
        """Start the embedded replicas and give their URLs to the children."""
        count = self.replica_count
        if count is None:
            raw = env.get("KOINONIA_DEV_REPLICAS", "").strip() or "0"
            if not raw.isdigit():
                raise ValueError(f"KOINONIA_DEV_REPLICAS must be a number, not {raw!r}")
            count = int(raw)
        if count == 0:
            return
        if self.postgres is None:
            raise RuntimeError(
                "KOINONIA_DEV_REPLICAS needs the embedded Postgres: with DATABASE_URL set, "
                "give its replicas in DATABASE_REPLICA_URLS instead"
            )
        # After the migrations: the base backups then hold the schema already.
        for index in range(1, count + 1):
            self._say(f"starting embedded replica {index} of {count}")
            replica = EmbeddedReplica(self.postgres, index, fast_unsafe=self.fast_unsafe)
            self.replicas.append(replica)
            replica.start()
        env["DATABASE_REPLICA_URLS"] = ",".join(r.url for r in self.replicas)

    def _start_pgbouncer(self, env: dict[str, str]) -> None:
        """``KOINONIA_DEV_PGBOUNCER``: PgBouncer in transaction mode in front of the
        embedded primary; the children go through it, migrations do not."""
        if env.get("KOINONIA_DEV_PGBOUNCER", "").strip().lower() not in {"1", "true", "yes", "on"}:
            return
        if self.postgres is None:
            raise RuntimeError(
                "KOINONIA_DEV_PGBOUNCER needs the embedded Postgres: with DATABASE_URL set, "
                "point DATABASE_URL at your PgBouncer instead"
            )
        self._say("starting PgBouncer (transaction pooling) in front of Postgres")
        self.pgbouncer = EmbeddedPgBouncer(self.data_dir, self.postgres.url)
        env["DATABASE_SESSION_URL"] = self.postgres.url
        env["DATABASE_URL"] = self.pgbouncer.start()
        env["KOINONIA_DB_PREPARED_STATEMENTS"] = "off"

    def spawn(self, name: str, *args: str, env: Mapping[str, str] | None = None) -> None:
        """Run ``koinonia <args>`` as a child with the stack's environment."""
        command = [sys.executable, "-m", "deploy.cli", *args]
        child_env = dict(env or self.env)
        kind = args[0] if args else name
        self.metrics.pop(name, None)
        self._metrics_files.pop(name, None)
        if kind in METRICS_KINDS and _metrics_port(kind, args, child_env) != "off":
            address_file = self.data_dir / "metrics" / f"{name}.address"
            address_file.unlink(missing_ok=True)
            child_env["KOINONIA_METRICS_ADDRESS_FILE"] = str(address_file)
            self._metrics_files[name] = address_file
        if self.log_dir is None:
            self.processes[name] = subprocess.Popen(command, env=child_env, start_new_session=True)
        else:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            with self.log_path(name).open("ab") as out:
                self.processes[name] = subprocess.Popen(
                    command, env=child_env, start_new_session=True, stdout=out, stderr=out
                )
        self.kinds[name] = kind
        self.addresses[name] = _serves(kind, child_env)

    def log_path(self, name: str) -> Path:
        """Where child ``name`` writes its log when the stack has a ``log_dir``."""
        if self.log_dir is None:
            raise RuntimeError("this stack's children log to the terminal (no log_dir)")
        return self.log_dir / f"{name}.log"

    def _log_tail(self, name: str, lines: int = 20) -> str:
        if self.log_dir is None or not self.log_path(name).exists():
            return ""
        tail = self.log_path(name).read_text(errors="replace").splitlines()[-lines:]
        return "\n" + "\n".join(tail)

    def start_processes(self) -> None:
        self._say("starting simulator, web, worker and scheduler")
        self.spawn("simulator", "simulator")
        self.spawn("web", "web")
        self.spawn("worker", "worker")
        self.spawn("scheduler", "scheduler")

    def wait_ready(self, url: str | None = None, timeout_s: float = 60.0) -> None:
        """Wait until ``url`` (default: the stack's web process) answers 200; with the
        default, the stack is ready and (re)writes ``stack.json``."""
        target = url or f"http://127.0.0.1:{self.http_port}/health/ready"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise RuntimeError(
                        f"{name} exited with {process.returncode} during start-up"
                        + self._log_tail(name)
                    )
            try:
                if httpx.get(target, timeout=1.0).status_code == 200:
                    if url is None:
                        self.learn_metrics(deadline)
                        self.write_stack_file()
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{target} did not answer 200 within {timeout_s:.0f} s")

    def learn_metrics(self, deadline: float) -> dict[str, str]:
        """Wait (until ``deadline``, a ``time.monotonic()``) for every running child
        with a metrics port to write its bound address; say each new one."""
        for name, path in self._metrics_files.items():
            while name not in self.metrics:
                process = self.processes.get(name)
                if process is None:
                    break
                if process.poll() is not None:
                    raise RuntimeError(
                        f"{name} exited with {process.returncode} during start-up"
                        + self._log_tail(name)
                    )
                try:
                    address = path.read_text().strip()
                except FileNotFoundError:
                    address = ""
                if address:
                    self.metrics[name] = address
                    self._say(f"metrics {name} http://{address}/metrics")
                elif time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not report its metrics address in time")
                else:
                    time.sleep(0.05)
        return self.metrics

    def stop_process(self, name: str, *, kill: bool = False, timeout_s: float = 15.0) -> None:
        process = self.processes.pop(name, None)
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)

    def store(self, name: str) -> EmbeddedPostgres | EmbeddedRedis:
        """The embedded ``postgres`` or ``redis`` this stack started (outage tests and
        benches stop and start it; an external store cannot be)."""
        server = self.postgres if name == "postgres" else self.redis
        if server is None:
            raise RuntimeError(
                f"no embedded {name}: DATABASE_URL / REDIS_URL point at an external one, "
                "which this stack cannot stop and start"
            )
        return server

    def outage(self, name: str) -> None:
        """Stop an embedded store, keeping its port for ``recover``."""
        server = self.store(name)
        server.requested_port = server.port
        server.stop()

    def recover(self, name: str) -> None:
        """Start an embedded store stopped by ``outage`` again, on the same port."""
        self.store(name).start()
        if self._stack_file_written:
            self.write_stack_file()  # the store's new pid

    def describe(self) -> StackFile:
        """What ``stack.json`` holds: the stores and the running children."""
        database_url = self.env.get("DATABASE_URL", "")
        redis_url = self.env.get("REDIS_URL", "")
        by_kind: dict[str, list[Process]] = {}
        for name, process in self.processes.items():
            if process.poll() is None:
                kind = self.kinds.get(name, name)
                entry = Process(name=name, pid=process.pid, address=self.addresses.get(name))
                by_kind.setdefault(kind, []).append(entry)
        return StackFile(
            pid=os.getpid(),
            data_dir=str(self.data_dir.resolve()),
            postgres=Endpoint(
                url=self.postgres.url if self.postgres is not None else database_url,
                pid=self.postgres.pid if self.postgres is not None else None,
            ),
            replicas=tuple(Endpoint(url=r.url, pid=r.pid) for r in self.replicas),
            pgbouncer=(
                Endpoint(url=self.pgbouncer.url, pid=self.pgbouncer.pid)
                if self.pgbouncer is not None
                else None
            ),
            redis=self._redis_entry(redis_url),
            simulator=tuple(by_kind.get("simulator", ())),
            web=tuple(by_kind.get("web", ())),
            worker=tuple(by_kind.get("worker", ())),
            scheduler=tuple(by_kind.get("scheduler", ())),
            metrics=tuple(
                MetricsEndpoint(process=name, address=address)
                for name, address in self.metrics.items()
                if name in self.processes and self.processes[name].poll() is None
            ),
        )

    def _redis_entry(self, redis_url: str) -> RedisEntry:
        cluster = self.redis_cluster
        if cluster is not None and cluster.nodes:
            try:
                masters = {v.node_id for v in cluster.view() if v.is_master and v.slots}
            except EmbeddedServerError:
                # No node answers: record the layout the cluster was built with.
                masters = {n.node_id for n in cluster.nodes[: cluster.masters]}
            return RedisEntry(
                url=f"redis://{cluster.nodes[0].address}",
                cluster=tuple(
                    RedisNode(
                        address=node.address,
                        role="primary" if node.node_id in masters else "replica",
                        pid=node.pid,
                    )
                    for node in cluster.live_nodes()
                ),
            )
        seeds = [n.strip() for n in self.env.get("REDIS_CLUSTER_NODES", "").split(",") if n]
        if seeds:
            # An external cluster: list its seeds (host:port or URL) so that operator
            # commands find it through stack.json.
            first = seeds[0] if "://" in seeds[0] else f"redis://{seeds[0]}"
            return RedisEntry(
                url=first,
                cluster=tuple(RedisNode(address=seed, role="seed") for seed in seeds),
            )
        return RedisEntry(
            url=self.redis.url if self.redis is not None else redis_url,
            pid=self.redis.pid if self.redis is not None else None,
        )

    def write_stack_file(self) -> None:
        """Write ``<data dir>/stack.json`` atomically (deploy/stack_file.py)."""
        write_stack_file(self.stack_file, self.describe())
        self._stack_file_written = True

    def stop(self) -> None:
        # First, so no operator command connects to a stack on its way down.
        remove_stack_file(self.stack_file, os.getpid())
        self._stack_file_written = False
        for name in list(self.processes):
            self.stop_process(name)
        if self.redis is not None:
            self.redis.stop()
            self.redis = None
        if self.redis_cluster is not None:
            self.redis_cluster.stop()
            self.redis_cluster = None
        if self.pgbouncer is not None:
            self.pgbouncer.stop()
            self.pgbouncer = None
        # Before the primary: a replica outliving it would log a failed
        # reconnection every few seconds until stopped.
        for replica in self.replicas:
            replica.stop()
        self.replicas = []
        if self.postgres is not None:
            self.postgres.stop()
            self.postgres = None


def _metrics_port(kind: str, args: tuple[str, ...], env: Mapping[str, str]) -> str:
    """The metrics port a ``koinonia <kind> <args>`` child starts with (``off``, or a
    port as given): ``--metrics-port`` first, then its variable."""
    if "--metrics-port" in args[:-1]:
        return args[args.index("--metrics-port") + 1].strip().lower()
    return env.get(metrics_port_variable(kind), "").strip().lower() or "default"


def _serves(kind: str, env: Mapping[str, str]) -> str | None:
    """The URL a ``koinonia <kind>`` process started with ``env`` serves, if any."""
    if kind == "web":
        host, port = env.get("KOINONIA_HTTP_HOST", "127.0.0.1"), env.get("KOINONIA_HTTP_PORT")
    elif kind == "simulator":
        host, port = env.get("KOINONIA_SIM_HOST", "127.0.0.1"), env.get("KOINONIA_SIM_PORT")
    else:
        return None
    return f"http://{host}:{port or (8000 if kind == 'web' else 8025)}"


def free_ports(count: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    return sorted(ports)
