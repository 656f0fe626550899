"""``<data dir>/stack.json`` and how operator commands find their stores.

The unit tests stand in for the servers with ``sleep`` run under their names (a
stale-file check looks at the program behind a pid, not only at the pid). The slow
test starts the real ``koinonia dev`` and runs operator commands against it with no
store URL in their environment.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import msgspec
import pytest

from deploy.embedded import pid_alive
from deploy.stack import free_ports
from deploy.stack_file import (
    Endpoint,
    MetricsEndpoint,
    NoStores,
    Process,
    RedisEntry,
    RedisNode,
    StackFile,
    operator_settings,
    read_stack_file,
    remove_stack_file,
    stack_file_path,
    write_stack_file,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
STORE_VARIABLES = ("DATABASE_URL", "REDIS_URL", "KOINONIA_PHONE_KEY", "KOINONIA_LOOKUP_KEY")
PG_URL = "postgresql://koinonia@127.0.0.1:5999/koinonia"
REDIS_URL = "redis://127.0.0.1:6999/0"

Spawn = Callable[[str], int]


@pytest.fixture
def running_as(tmp_path: Path) -> Iterator[Spawn]:
    """Start a process whose program name is the one given (``postgres``,
    ``valkey-server``); returns its pid. All are stopped after the test."""
    started: list[subprocess.Popen[bytes]] = []
    sleep = shutil.which("sleep")
    assert sleep is not None

    def spawn(name: str) -> int:
        program = tmp_path / "bin" / name
        program.parent.mkdir(exist_ok=True)
        if not program.exists():
            program.symlink_to(sleep)
        process = subprocess.Popen([str(program), "300"])
        started.append(process)
        deadline = time.monotonic() + 5
        while not pid_alive(process.pid, name):
            assert time.monotonic() < deadline, f"{name} did not start"
            time.sleep(0.01)
        return process.pid

    yield spawn
    for process in started:
        process.kill()
        process.wait()


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def a_stack(data_dir: Path, *, pg_pid: int | None, redis_pid: int | None) -> StackFile:
    return StackFile(
        pid=os.getpid(),
        data_dir=str(data_dir.resolve()),
        postgres=Endpoint(url=PG_URL, pid=pg_pid),
        redis=RedisEntry(url=REDIS_URL, pid=redis_pid),
        simulator=(Process(name="simulator", pid=11, address="http://127.0.0.1:8025"),),
        web=(Process(name="web", pid=12, address="http://127.0.0.1:8000"),),
        worker=(Process(name="worker", pid=13),),
        scheduler=(Process(name="scheduler", pid=14),),
    )


def clean_env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in STORE_VARIABLES}
    return {**env, "KOINONIA_DATA_DIR": str(data_dir), **extra}


def cli(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deploy.cli", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# The file -----------------------------------------------------------------------------


def test_the_stack_file_round_trips(tmp_path: Path) -> None:
    stack = StackFile(
        pid=123,
        data_dir=str(tmp_path),
        postgres=Endpoint(url=PG_URL, pid=1),
        replicas=(Endpoint(url="postgresql://koinonia@127.0.0.1:6001/koinonia", pid=2),),
        pgbouncer=Endpoint(url="postgresql://koinonia@127.0.0.1:6432/koinonia", pid=3),
        redis=RedisEntry(
            url="redis://127.0.0.1:7000/0",
            cluster=(
                RedisNode(address="127.0.0.1:7000", role="primary", pid=4),
                RedisNode(address="127.0.0.1:7001", role="replica", pid=5),
            ),
        ),
        simulator=(Process(name="simulator", pid=6, address="http://127.0.0.1:8025"),),
        web=(Process(name="web", pid=7, address="http://127.0.0.1:8000"),),
        worker=(Process(name="worker", pid=8), Process(name="worker2", pid=9)),
        scheduler=(Process(name="scheduler", pid=10),),
        metrics=(
            MetricsEndpoint(process="web", address="127.0.0.1:9180"),
            MetricsEndpoint(process="worker2", address="127.0.0.1:9183"),
        ),
    )
    path = stack_file_path(tmp_path)
    assert path == tmp_path.resolve() / "stack.json"
    write_stack_file(path, stack)
    assert read_stack_file(path) == stack
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["stack.json"]  # no temporary file left
    raw = json.loads(path.read_text())
    assert raw["postgres"] == {"url": PG_URL, "pid": 1}
    assert raw["redis"]["cluster"][1] == {"address": "127.0.0.1:7001", "role": "replica", "pid": 5}
    assert raw["worker"][0] == {"name": "worker", "pid": 8, "address": None}
    assert raw["metrics"][1] == {"process": "worker2", "address": "127.0.0.1:9183"}

    # A minimal file: no replicas, PgBouncer, cluster nor metrics.
    minimal = a_stack(tmp_path, pg_pid=1, redis_pid=2)
    write_stack_file(path, minimal)
    raw = json.loads(path.read_text())
    assert (raw["replicas"], raw["pgbouncer"], raw["redis"]["cluster"], raw["metrics"]) == (
        [],
        None,
        [],
        [],
    )
    assert msgspec.json.decode(path.read_bytes(), type=StackFile) == minimal


def test_only_the_writer_removes_the_file(tmp_path: Path) -> None:
    path = stack_file_path(tmp_path)
    write_stack_file(path, a_stack(tmp_path, pg_pid=1, redis_pid=2))
    remove_stack_file(path, os.getpid() + 1)  # an older `koinonia dev` stopping late
    assert path.exists()
    remove_stack_file(path, os.getpid())
    assert not path.exists()
    remove_stack_file(path, os.getpid())  # already gone: fine


# Resolving the stores ---------------------------------------------------------------


def test_the_environment_wins_over_the_file(tmp_path: Path, running_as: Spawn) -> None:
    path = stack_file_path(tmp_path)
    write_stack_file(path, a_stack(tmp_path, pg_pid=running_as("postgres"), redis_pid=None))
    env = clean_env(tmp_path, DATABASE_URL="postgresql://db/x", REDIS_URL="redis://r:1/0")
    settings = operator_settings(env)
    assert (settings.database.url, settings.redis.url) == ("postgresql://db/x", "redis://r:1/0")
    # Nothing read from the file, not even the development keys.
    assert settings.security.phone_key == b""


def test_the_file_names_the_stores_and_the_dev_keys(tmp_path: Path, running_as: Spawn) -> None:
    stack = a_stack(tmp_path, pg_pid=running_as("postgres"), redis_pid=running_as("valkey-server"))
    write_stack_file(stack_file_path(tmp_path), stack)
    keys = {name: base64.b64encode(os.urandom(32)).decode() for name in STORE_VARIABLES[2:]}
    (tmp_path / "dev-secrets.json").write_text(json.dumps(keys))

    settings = operator_settings(clean_env(tmp_path))
    assert (settings.database.url, settings.redis.url) == (PG_URL, REDIS_URL)
    assert settings.security.phone_key == base64.b64decode(keys["KOINONIA_PHONE_KEY"])
    assert settings.security.lookup_key == base64.b64decode(keys["KOINONIA_LOOKUP_KEY"])

    # Each store on its own: an URL in the environment, the other from the file.
    mixed = operator_settings(clean_env(tmp_path, DATABASE_URL="postgresql://db/x"))
    assert (mixed.database.url, mixed.redis.url) == ("postgresql://db/x", REDIS_URL)
    # An empty variable counts as unset.
    empty = operator_settings(clean_env(tmp_path, DATABASE_URL="", REDIS_URL=""))
    assert (empty.database.url, empty.redis.url) == (PG_URL, REDIS_URL)
    # Keys set in the environment are kept.
    own = base64.b64encode(os.urandom(32)).decode()
    kept = operator_settings(clean_env(tmp_path, KOINONIA_PHONE_KEY=own))
    assert kept.security.phone_key == base64.b64decode(own)


def test_without_either_it_names_both_ways(tmp_path: Path) -> None:
    with pytest.raises(NoStores) as caught:
        operator_settings(clean_env(tmp_path))
    message = str(caught.value)
    assert "DATABASE_URL and REDIS_URL" in message
    assert "`koinonia dev`" in message
    assert str(tmp_path.resolve() / "stack.json") in message
    with pytest.raises(NoStores, match=r"set DATABASE_URL, or start `koinonia dev`"):
        operator_settings(clean_env(tmp_path), redis=False)
    with pytest.raises(NoStores, match=r"set REDIS_URL, or start"):
        operator_settings(clean_env(tmp_path, DATABASE_URL="postgresql://db/x"))


def test_a_stale_file_is_refused(tmp_path: Path, running_as: Spawn) -> None:
    path = stack_file_path(tmp_path)
    valkey = running_as("valkey-server")
    # Postgres gone (`koinonia dev` killed, then its servers stopped).
    write_stack_file(path, a_stack(tmp_path, pg_pid=dead_pid(), redis_pid=valkey))
    with pytest.raises(NoStores, match=r"stale: its Postgres \(pid \d+\) is not running"):
        operator_settings(clean_env(tmp_path))
    # The pid runs, but it is not Postgres (taken over after a reboot).
    write_stack_file(path, a_stack(tmp_path, pg_pid=os.getpid(), redis_pid=valkey))
    with pytest.raises(NoStores, match="stale"):
        operator_settings(clean_env(tmp_path), redis=False)
    # Postgres runs, the Redis it names does not.
    write_stack_file(path, a_stack(tmp_path, pg_pid=running_as("postgres"), redis_pid=dead_pid()))
    assert operator_settings(clean_env(tmp_path), redis=False).database.url == PG_URL
    with pytest.raises(NoStores, match=r"its Redis \(pid \d+\) is not running"):
        operator_settings(clean_env(tmp_path))
    # External stores (no pids): the `koinonia dev` that wrote the file must run.
    external = msgspec.structs.replace(
        a_stack(tmp_path, pg_pid=None, redis_pid=None), pid=dead_pid()
    )
    write_stack_file(path, external)
    with pytest.raises(NoStores, match="the `koinonia dev` that wrote it"):
        operator_settings(clean_env(tmp_path))
    write_stack_file(path, a_stack(tmp_path, pg_pid=None, redis_pid=None))
    assert operator_settings(clean_env(tmp_path)).database.url == PG_URL
    # Not a stack file at all.
    path.write_text("{not json")
    with pytest.raises(NoStores, match="cannot read"):
        operator_settings(clean_env(tmp_path))


@pytest.mark.parametrize(
    "command",
    [
        ("migrate",),
        ("outbox",),
        ("dead-letters", "list"),
        ("import-members", "--church-id", "00000000-0000-0000-0000-000000000001", "FILE"),
    ],
)
def test_operator_commands_explain_what_is_missing(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    csv = tmp_path / "members.csv"
    csv.write_text("phone\n")
    args = [str(csv) if a == "FILE" else a for a in command]
    data_dir = tmp_path / "data"
    done = cli(*args, env=clean_env(data_dir))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "DATABASE_URL" in done.stderr
    assert "`koinonia dev`" in done.stderr
    assert str(data_dir.resolve() / "stack.json") in done.stderr
    # A stale file: refused the same way.
    data_dir.mkdir()
    write_stack_file(stack_file_path(data_dir), a_stack(data_dir, pg_pid=dead_pid(), redis_pid=1))
    stale = cli(*args, env=clean_env(data_dir))
    assert stale.returncode == 2, stale.stderr
    assert "stale" in stale.stderr
    assert "Traceback" not in stale.stderr


# The real `koinonia dev` -------------------------------------------------------------


@pytest.mark.slow
def test_koinonia_dev_publishes_its_stack(tmp_path: Path) -> None:
    data_dir = tmp_path / "dev"
    web_port, sim_port = free_ports(2)
    env = clean_env(
        data_dir,
        KOINONIA_HTTP_PORT=str(web_port),
        KOINONIA_SIM_PORT=str(sim_port),
        KOINONIA_LOG_LEVEL="WARNING",
        # Any free port (the defaults are 9180-9182): the stack learns what was bound.
        KOINONIA_WEB_METRICS_PORT="0",
        KOINONIA_WORKER_METRICS_PORT="0",
        KOINONIA_SCHEDULER_METRICS_PORT="0",
    )
    env.pop("KOINONIA_METRICS_TOKEN", None)
    path = stack_file_path(data_dir)
    dev = subprocess.Popen(
        [sys.executable, "-m", "deploy.cli", "dev"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert dev.stdout is not None
        ready = dev.stdout.readline()  # blocks until ready, or "" when dev exits
        assert ready.startswith(f"Koinonia ready at http://127.0.0.1:{web_port}"), ready
        stack = read_stack_file(path)  # written before the ready line
        assert stack.pid == dev.pid
        assert stack.data_dir == str(data_dir.resolve())
        assert stack.postgres.pid is not None
        assert pid_alive(stack.postgres.pid, "postgres")
        assert stack.redis.pid is not None
        assert pid_alive(stack.redis.pid, "valkey-server")
        assert stack.postgres.url.startswith("postgresql://koinonia@127.0.0.1:")
        assert stack.redis.url.startswith("redis://127.0.0.1:")
        assert (stack.replicas, stack.pgbouncer, stack.redis.cluster) == ((), None, ())
        metrics = {m.process: m.address for m in stack.metrics}
        assert sorted(metrics) == ["scheduler", "web", "worker"]
        for address in metrics.values():
            host, port = address.rsplit(":", 1)
            assert host == "127.0.0.1", address
            assert int(port) > 0, address
            # Open: no KOINONIA_METRICS_TOKEN in this environment.
            assert httpx.get(f"http://{address}/metrics").status_code == 200
        processes = {
            kind: [(p.name, p.address) for p in entries]
            for kind, entries in (
                ("simulator", stack.simulator),
                ("web", stack.web),
                ("worker", stack.worker),
                ("scheduler", stack.scheduler),
            )
        }
        assert processes == {
            "simulator": [("simulator", f"http://127.0.0.1:{sim_port}")],
            "web": [("web", f"http://127.0.0.1:{web_port}")],
            "worker": [("worker", None)],
            "scheduler": [("scheduler", None)],
        }
        children = [*stack.simulator, *stack.web, *stack.worker, *stack.scheduler]
        assert all(pid_alive(p.pid) for p in children)
        assert httpx.get(f"{stack.web[0].address}/health/ready").status_code == 200

        # Operator commands with no store URL in their environment find the stack.
        migrated = cli("migrate", env=env)
        assert migrated.returncode == 0, migrated.stderr
        assert migrated.stdout.strip() == "migrations applied: none (up to date)"
        assert f"using the stack of `koinonia dev` in {data_dir.resolve()}" in migrated.stderr
        letters = cli("dead-letters", "list", env=env)
        assert letters.returncode == 0, letters.stderr
        assert (letters.stdout, letters.stderr.splitlines()[-1]) == ("", "dead letters: 0")
        mail = cli("outbox", env=env)
        assert (mail.returncode, mail.stdout.strip()) == (0, "outbox: no mail"), mail.stderr

        dev.send_signal(signal.SIGTERM)
        assert dev.wait(60) == 0
        assert not path.exists()
        pids = [stack.postgres.pid, stack.redis.pid, *(p.pid for p in children)]
        assert [pid for pid in pids if pid_alive(pid)] == []
        gone = cli("migrate", env=env)
        assert gone.returncode == 2, gone.stderr
        assert "does not exist" in gone.stderr
    finally:
        if dev.poll() is None:
            dev.send_signal(signal.SIGTERM)
            try:
                dev.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(dev.pid, signal.SIGKILL)
                dev.wait()
        if dev.stdout is not None:
            dev.stdout.close()
