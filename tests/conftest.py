"""Shared fixtures: one real stack per test session.

The session starts embedded Postgres and Redis (or uses DATABASE_URL /
REDIS_URL when set), applies the production migrations, and runs the provider
simulator, a web process, a worker and the scheduler as real child processes,
exactly as ``koinonia dev`` does. Tests isolate themselves by tenancy: each one
signs up its own church, so nothing needs truncating between tests.

The children log at INFO to ``<stack data dir>/logs/<name>.log`` (``stack.log_path``),
not to the terminal: look there when a test fails, and tests read them
(tests/storage/process/test_logs.py).
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import redis
from redis.cluster import ClusterNode, RedisCluster

from deploy.stack import Stack, free_ports
from storage.domain.receipt_refs import ReceiptRefs
from storage.process.settings import Settings
from storage.redis.connection import seed_nodes

pytest_plugins = [
    "tests.replica_support",
    "tests.redis_cluster_support",
    "tests.object_store_support",
    "tests.archive_support",
]

_OWN_BASETEMP = "_koinonia_own_basetemp"


def pytest_configure(config: pytest.Config) -> None:
    """A temporary folder of this session's own, outside ``/tmp/pytest-of-<user>``.

    As root, the embedded servers run as an unprivileged account that must traverse
    the folders above their data (deploy/embedded.py opens them to it). Every new
    pytest session resets ``/tmp/pytest-of-<user>`` to mode 0700, which would cut a
    session already running there off its own Postgres (PANIC: pg_control:
    Permission denied) whenever two suites run on one machine at once."""
    if config.option.basetemp is None:
        folder = tempfile.mkdtemp(prefix="koinonia-pytest-")
        config.option.basetemp = folder
        setattr(config, _OWN_BASETEMP, folder)


def _extra_servers(item: pytest.Item) -> int:
    """0: the session stack alone; 1: the streaming replica too; 2: the Redis Cluster
    itself; 3: the second stack that runs on that cluster (``cluster_stack``, taken
    directly or as the ``cluster`` case of ``any_stack``)."""
    names = set(getattr(item, "fixturenames", ()))
    callspec = getattr(item, "callspec", None)
    params: dict[str, object] = dict(callspec.params) if callspec is not None else {}
    if "cluster_stack" in names or params.get("any_stack") == "cluster":
        return 3
    if "redis_cluster" in names or "cluster" in params.values():
        return 2
    return 1 if "pg_replicas" in names else 0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that need the session's extra servers run last (stable order otherwise).

    A session fixture lives from its first user to the session's end: a replica that
    streams every later write, and a second stack whose worker, scheduler and relays
    poll all the time, would slow every test collected after their first user. Run at
    the end, they cost only their own tests' time. Tests on the bare cluster (which
    flush it between tests) come before the stack on the cluster starts: flushing it
    under a running worker would race the worker's own writes."""
    items.sort(key=_extra_servers)
    from tests.archive_support import uses_archive_s3_stack

    users = [i.nodeid for i in items if uses_archive_s3_stack(i)]
    _LAST_S3_USER[:] = users[-1:]


_LAST_S3_USER: list[str] = []


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    if _LAST_S3_USER and item.nodeid == _LAST_S3_USER[0]:
        from tests.archive_support import stop_archive_s3_stack

        stop_archive_s3_stack()


def pytest_unconfigure(config: pytest.Config) -> None:
    folder = getattr(config, _OWN_BASETEMP, None)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


METRICS_TOKEN = "metrics-token-of-the-test-suite"
"""The stack's KOINONIA_METRICS_TOKEN: ``/metrics`` and ``/health/detailed`` take it."""
MONITORING = {"Authorization": f"Bearer {METRICS_TOKEN}"}
"""Headers of the monitoring system: what ``/metrics`` needs, and ``/health/detailed``
takes as an admin's credentials."""


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@contextlib.contextmanager
def running_stack(
    tmp_path_factory: pytest.TempPathFactory, name: str, env: dict[str, str]
) -> Iterator[Stack]:
    """A whole stack as the suite runs one (its own embedded stores unless ``env``
    names others, web and simulator on free ports, fsync off, children logging to
    ``<data dir>/logs``), ready on entry and stopped on exit."""
    web_port, sim_port = free_ports(2)
    data_dir = tmp_path_factory.mktemp(name)
    stack = Stack(
        data_dir,
        http_port=web_port,
        sim_port=sim_port,
        env=env,
        fast_unsafe=True,
        quiet=True,
        log_dir=data_dir / "logs",
    )
    try:
        stack.start_stores()
        stack.start_processes()
        stack.wait_ready()
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    env = dict(os.environ)
    # Tracing off, as by default (tests/storage/process/test_tracing.py runs its own
    # stack with it on).
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    env.pop("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", None)
    env.update(
        {
            # INFO: the log tests read request and job lines (logs go to files).
            "KOINONIA_LOG_LEVEL": "INFO",
            "KOINONIA_RECONCILE_AFTER_S": "5",
            "KOINONIA_SCHEDULER_INTERVAL_S": "1",
            "KOINONIA_CLAIM_IDLE_MS": "5000",
            "KOINONIA_RETRY_BASE_S": "0.2",
            # Receipts that never come are looked up at the provider after 2 s, not 1 h.
            "KOINONIA_RECEIPT_TIMEOUT_S": "2",
            # argon2id at its lowest sensible cost: every test church signs up, and
            # the production profile (64 MiB, 3 passes) costs about 0.3 s a hash here.
            "KOINONIA_PASSWORD_TIME_COST": "1",
            "KOINONIA_PASSWORD_MEMORY_KIB": "8192",
            # Every test church is on the starter plan and every request comes from
            # 127.0.0.1: the suite raises the plan, key and per-IP login limits so
            # only tests about limits meet them (they set a church's or a key's own
            # limit, which the defaults never override, or use the per-account ones).
            "KOINONIA_RATE_STARTER": "1000000",
            "KOINONIA_RATE_API_KEY": "1000000",
            "KOINONIA_RATE_LOGIN_IP": "100000",
            "KOINONIA_RATE_RESET_IP": "100000",
            # Webhook receivers in tests listen on loopback; retries compressed
            # (the schedule's 27.6 h become about 2 s), endpoints disabled sooner.
            "KOINONIA_WEBHOOK_ALLOW_PRIVATE": "true",
            "KOINONIA_WEBHOOK_RETRY_SCALE": "0.00002",
            "KOINONIA_WEBHOOK_FAILURE_THRESHOLD": "3",
            # /metrics of web, worker and scheduler on free ports (the stack learns
            # them: stack.metrics), their gauges refreshed every second.
            "KOINONIA_WEB_METRICS_PORT": "0",
            "KOINONIA_WORKER_METRICS_PORT": "0",
            "KOINONIA_SCHEDULER_METRICS_PORT": "0",
            "KOINONIA_METRICS_SAMPLE_S": "1",
            "KOINONIA_METRICS_TOKEN": METRICS_TOKEN,
        }
    )
    with running_stack(tmp_path_factory, "koinonia", env) as stack:
        yield stack


@pytest.fixture(scope="session")
def base_url(stack: Stack) -> str:
    return f"http://127.0.0.1:{stack.http_port}"


@pytest.fixture(scope="session")
def sim_url(stack: Stack) -> str:
    return f"http://127.0.0.1:{stack.sim_port}"


class Church:
    """A signed-up church: its ids, session client, and an API-key client."""

    def __init__(self, base_url: str) -> None:
        self.email = f"owner-{uuid.uuid4().hex[:10]}@example.org"
        self.session = httpx.Client(base_url=base_url, timeout=10.0)
        answer = self.session.post(
            "/v1/auth/signup",
            json={
                "church_name": "Grace Chapel",
                "email": self.email,
                "password": "correct horse battery",
            },
        )
        assert answer.status_code == 201, answer.text
        data = answer.json()["data"]
        self.id: str = data["church"]["id"]
        self.phone_number: str = data["church"]["phone_number"]
        self.user_id: str = data["user"]["id"]
        self.csrf = self.session.cookies["koinonia_csrf"]
        # The session client behaves like the browser app: it echoes the CSRF cookie.
        self.session.headers["X-CSRF-Token"] = self.csrf
        answer = self.session.post(
            "/v1/api-keys", json={"name": "tests"}, headers={"X-CSRF-Token": self.csrf}
        )
        assert answer.status_code == 201, answer.text
        self.key: str = answer.json()["data"]["key"]
        self.api = httpx.Client(
            base_url=base_url, timeout=10.0, headers={"Authorization": f"Bearer {self.key}"}
        )
        # Quiet hours (08:00-21:00 church time by default) would hold scheduled and
        # recurring sends whenever the suite runs at night; the quiet-hours tests set
        # their own windows.
        quiet = self.api.patch(
            "/v1/church", json={"quiet_hours_start": "00:00", "quiet_hours_end": "00:00"}
        )
        assert quiet.status_code == 200, quiet.text

    def group(self, name: str = "Choir") -> str:
        answer = self.api.post("/v1/groups", json={"name": name})
        assert answer.status_code == 201, answer.text
        return str(answer.json()["data"]["id"])

    def member(self, phone: str, group_ids: list[str] | None = None, **extra: Any) -> str:
        body: dict[str, Any] = {"first_name": "Ada", "last_name": "Lovelace", "phone": phone}
        if group_ids is not None:
            body["group_ids"] = group_ids
        body.update(extra)
        answer = self.api.post("/v1/members", json=body)
        assert answer.status_code == 201, answer.text
        return str(answer.json()["data"]["id"])

    def broadcast(self, group: str, body: str = "Hello") -> str:
        """Post a broadcast to one group; returns the message id."""
        answer = self.api.post(
            "/v1/messages", json={"body": body, "target": {"group_ids": [group]}}
        )
        assert answer.status_code == 202, answer.text
        return str(answer.json()["data"]["id"])

    def counts_when(
        self, message_id: str, done: Callable[[dict[str, int]], bool], seconds: float = 30
    ) -> dict[str, int]:
        """Poll a broadcast's counts until ``done`` holds or time runs out; the last
        counts either way, for the caller's assertion to show."""
        deadline = time.monotonic() + seconds
        while True:
            counts: dict[str, int] = self.api.get(f"/v1/messages/{message_id}").json()["data"][
                "counts"
            ]
            if done(counts) or time.monotonic() > deadline:
                return counts
            time.sleep(0.02)

    def conversations_when(self, at_least: int, seconds: float = 10) -> list[dict[str, Any]]:
        deadline = time.monotonic() + seconds
        while True:
            found: list[dict[str, Any]] = self.api.get("/v1/conversations").json()["data"]
            if len(found) >= at_least or time.monotonic() > deadline:
                return found
            time.sleep(0.1)

    def close(self) -> None:
        self.session.close()
        self.api.close()


@pytest.fixture
def church(base_url: str) -> Iterator[Church]:
    created = Church(base_url)
    yield created
    created.close()


@pytest.fixture
def other_church(base_url: str) -> Iterator[Church]:
    created = Church(base_url)
    yield created
    created.close()


def texts_sent(sim_url: str, phones: list[str]) -> list[int]:
    """How many texts the simulator really sent to each phone (replays not counted)."""
    by_destination = httpx.get(f"{sim_url}/_sim/stats").json()["by_destination"]
    return [int(by_destination.get(p, 0)) for p in phones]


_phone_counter = iter(range(10_000_000))


def unique_phone() -> str:
    """A valid US number no other test uses (area code 201, exchange 2xx-9xx)."""
    n = next(_phone_counter) + (os.getpid() % 50) * 100_000
    return f"+1201{2000000 + n:07d}"


def wait_until(check: Callable[[], bool], seconds: float = 30.0, what: str = "condition") -> None:
    """Poll ``check`` until it holds; fail saying ``what`` did not happen in time."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not true within {seconds} s")
        time.sleep(0.05)


def texted_in(
    church: Church, sim_url: str, phone: str | None = None, **member: Any
) -> tuple[str, str]:
    """A member (``member`` fields) who texted the church "Hi" through the simulator:
    (member id, conversation id), once the conversation is in the inbox."""
    phone = phone or unique_phone()
    member_id = church.member(phone, **member)
    httpx.post(
        f"{sim_url}/_sim/inbound", json={"from": phone, "to": church.phone_number, "text": "Hi"}
    ).raise_for_status()
    found: list[str] = []

    def arrived() -> bool:
        answer = church.api.get("/v1/conversations", params={"limit": 200})
        found[:] = [c["id"] for c in answer.json()["data"] if c["member_id"] == member_id]
        return bool(found)

    wait_until(arrived, 10, "the member's text reached the inbox")
    return member_id, found[0]


def receipt_ref(stack: Stack, church_id: object, message_id: object, recipient_id: object) -> str:
    """The callback reference the worker gives the provider for a recipient (our MAC
    included), as the stack's own key makes it."""
    refs = ReceiptRefs(base64.b64decode(stack.env["KOINONIA_LOOKUP_KEY"]))
    return refs.make(*(uuid.UUID(str(v)) for v in (church_id, message_id, recipient_id)))


@pytest.fixture
def data_dir(stack: Stack) -> Path:
    return stack.data_dir


# -- the same test on a standalone Redis and on a Redis Cluster ---------------------
#
# A test that takes ``any_stack`` (or ``any_base_url``, ``any_sim_url``, ``any_church``)
# runs twice: ``[standalone]`` on the session ``stack``, ``[cluster]`` on
# ``cluster_stack`` (tests/redis_cluster_support.py), with the same assertions. The
# cluster stack starts the first time a cluster case runs.

STACK_KINDS = ["standalone", "cluster"]


@pytest.fixture(params=STACK_KINDS, ids=STACK_KINDS)
def any_stack(request: pytest.FixtureRequest) -> Stack:
    """The session stack on a standalone Redis, then the one on the cluster."""
    name = "stack" if request.param == "standalone" else "cluster_stack"
    found: Stack = request.getfixturevalue(name)
    return found


@pytest.fixture
def any_base_url(any_stack: Stack) -> str:
    return f"http://127.0.0.1:{any_stack.http_port}"


@pytest.fixture
def any_sim_url(any_stack: Stack) -> str:
    return f"http://127.0.0.1:{any_stack.sim_port}"


@pytest.fixture
def any_church(any_base_url: str) -> Iterator[Church]:
    """A church signed up on ``any_stack``."""
    created = Church(any_base_url)
    yield created
    created.close()


@contextlib.contextmanager
def stack_redis(stack: Stack) -> Iterator[redis.Redis]:
    """A synchronous client of ``stack``'s Redis, whichever kind it is, closed afterwards.

    On a cluster (``REDIS_CLUSTER_NODES`` in its environment) redis-py's
    ``RedisCluster``, typed as ``redis.Redis`` as storage.redis.connection does for
    the asyncio clients: the command methods are the same, and each key's command
    goes to its slot's master."""
    settings = Settings.from_env(stack.env).redis
    client: redis.Redis
    if settings.cluster_nodes:
        nodes, options = seed_nodes(settings.cluster_nodes)
        seeds = [ClusterNode(n.host, n.port) for n in nodes]  # type: ignore[no-untyped-call]
        client = cast(redis.Redis, RedisCluster(startup_nodes=seeds, **options))
    else:
        client = redis.Redis.from_url(settings.url)
    try:
        yield client
    finally:
        client.close()


def flush_redis(stack: Stack) -> None:
    """FLUSHALL ``stack``'s Redis; on a cluster, every master (each holds its slots'
    keys only, and a replica follows its master)."""
    with stack_redis(stack) as client:
        if isinstance(client, RedisCluster):
            # The masters of the client's slot map, which covers every slot (the
            # sync client insists on full coverage): a key left on one would let a
            # flush test pass for the wrong reason.
            client.flushall(target_nodes=client.get_primaries())
        else:
            client.flushall()
