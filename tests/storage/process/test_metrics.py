"""Prometheus metrics (storage/process/metrics.py, docs/operations.md "Metrics").

Against the session stack, whose web, worker and scheduler serve ``/metrics`` on
ports they picked (``0``; the stack learns them from the address file each child
writes) behind the suite's ``KOINONIA_METRICS_TOKEN``: every output passes
``promtool check metrics``, names the series of the spec, labels HTTP requests
by route template only, and moves with a broadcast. In-process: the token, port
``0`` and ``off``. A port in use stops a process naming its variable; several
web workers report on one port (slow lane).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import connect as ws_connect

from deploy.stack import Stack, free_ports
from storage.process.metrics import (
    COMMON,
    SERIES,
    Metrics,
    MetricsPortInUse,
    serve_metrics,
    with_metrics_port,
)
from storage.process.services import Services
from storage.process.settings import Settings
from tests.conftest import MONITORING, Church, unique_phone, wait_until

REPO_ROOT = Path(__file__).resolve().parents[3]

SPEC_SERIES = {
    "web": [
        "koinonia_http_requests_total",
        "koinonia_http_request_duration_seconds",
        "koinonia_realtime_connections",
        "koinonia_realtime_events_delivered_total",
        "koinonia_realtime_slow_consumer_closes_total",
        "koinonia_realtime_recoveries_total",
        "koinonia_event_publish_to_write_seconds",
        "koinonia_receipt_latency_seconds",
    ],
    "worker": [
        "koinonia_queue_backlog",
        "koinonia_queue_oldest_age_seconds",
        "koinonia_accept_to_sent_seconds",
        "koinonia_sends_total",
        "koinonia_send_retries_total",
        "koinonia_dead_letters_total",
        "koinonia_dead_letter_backlog",
        "koinonia_circuit_state",
        "koinonia_provider_request_duration_seconds",
        "koinonia_webhook_deliveries_total",
        "koinonia_webhook_backlog",
        "koinonia_webhook_endpoints_disabled_total",
    ],
    "scheduler": ["koinonia_provider_request_duration_seconds"],
}
EVERY_PROCESS = [
    "koinonia_store_up",
    "koinonia_db_pool_connections",
    "koinonia_db_pool_waiting",
    "koinonia_db_pool_waits_total",
    "koinonia_db_queries_total",
    "koinonia_db_replica_lag_seconds",
    "koinonia_cache_hits_total",
    "koinonia_cache_misses_total",
]


def scrape(address: str, headers: dict[str, str] | None = None) -> str:
    answer = httpx.get(
        f"http://{address}/metrics", headers=MONITORING if headers is None else headers
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    return answer.text


def families(text: str) -> set[str]:
    """The metric names a scrape describes (``# TYPE`` lines: samples or not)."""
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


def value(text: str, sample: str, **labels: str) -> float:
    """The sum of the samples named ``sample`` whose labels include ``labels``."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def promtool_check(text: str, what: str) -> None:
    promtool = shutil.which("promtool") or (
        "/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None
    )
    if promtool is None:
        pytest.fail("promtool is not installed (apt install prometheus, or put it on PATH)")
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, (
        f"{what}: promtool check metrics\n{checked.stdout}{checked.stderr}"
    )


# -- the stack's processes ------------------------------------------------------------


def test_every_process_serves_metrics_promtool_accepts(stack: Stack) -> None:
    assert set(stack.metrics) >= {"web", "worker", "scheduler"}
    for process in ("web", "worker", "scheduler"):
        text = scrape(stack.metrics[process])
        promtool_check(text, process)
        names = families(text)
        missing = [n for n in SPEC_SERIES[process] + EVERY_PROCESS if n not in names]
        assert not missing, f"{process} lacks {missing}"
        # The process itself (CPU, memory) comes along; no ``_created`` series.
        assert "process_resident_memory_bytes" in names, process
        assert not [n for n in names if n.endswith("_created")], process
    # Gauges of live state: the sampler has seen both stores and the pool.
    worker = scrape(stack.metrics["worker"])
    assert value(worker, "koinonia_store_up", store="postgres") == 1
    assert value(worker, "koinonia_store_up", store="redis") == 1
    assert value(worker, "koinonia_db_pool_connections") >= 1
    assert value(worker, "koinonia_circuit_state") == 0
    # Every process's metrics are recorded in stack.json, by process.
    recorded = json.loads(stack.stack_file.read_text())["metrics"]
    assert {entry["process"]: entry["address"] for entry in recorded} == {
        name: address for name, address in stack.metrics.items() if name in stack.processes
    }


def test_metrics_need_the_token(stack: Stack) -> None:
    url = f"http://{stack.metrics['worker']}/metrics"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(url, headers=MONITORING).status_code == 200
    assert (
        httpx.get(f"http://{stack.metrics['worker']}/other", headers=MONITORING).status_code == 404
    )


def test_http_series_use_route_templates(church: Church, stack: Stack) -> None:
    message_id, stray = str(uuid.uuid4()), uuid.uuid4().hex
    assert church.api.get(f"/v1/messages/{message_id}").status_code == 404
    assert church.api.get(f"/nowhere/{stray}").status_code == 404
    text = scrape(stack.metrics["web"])
    assert message_id not in text
    assert stray not in text
    route = {"route": "/v1/messages/{id}", "method": "GET"}
    assert value(text, "koinonia_http_requests_total", status="404", **route) >= 1
    assert value(text, "koinonia_http_request_duration_seconds_count", **route) >= 1
    assert value(text, "koinonia_http_requests_total", route="unmatched", status="404") >= 1
    routes = {
        s.labels["route"]
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "koinonia_http_requests_total"
    }
    assert all(r == "unmatched" or r.startswith("/") for r in routes), routes


def test_counters_move_with_a_broadcast(church: Church, stack: Stack) -> None:
    web, worker = stack.metrics["web"], stack.metrics["worker"]
    before_web, before_worker = scrape(web), scrape(worker)
    group = church.group()
    church.member(unique_phone(), [group])
    url = f"ws://127.0.0.1:{stack.http_port}/v1/realtime"
    with ws_connect(url, additional_headers={"Authorization": f"Bearer {church.key}"}) as ws:
        assert json.loads(ws.recv(10))["type"] == "welcome"
        ws.send(json.dumps({"type": "subscribe", "id": "s1", "channel": "dashboard"}))
        subscribed = json.loads(ws.recv(10))
        assert subscribed["type"] == "subscribed", subscribed
        message_id = church.broadcast(group)
        while True:  # until the broadcast completes
            frame = json.loads(ws.recv(30))
            if frame["type"] == "event" and frame["event"]["type"] == "message.completed":
                assert frame["event"]["data"]["message_id"] == message_id
                break
        during = scrape(web)
        assert value(during, "koinonia_realtime_connections", transport="websocket") >= 1
    # A second connection resumes the channel from where the first one stood.
    with ws_connect(url, additional_headers={"Authorization": f"Bearer {church.key}"}) as ws:
        json.loads(ws.recv(10))
        since = {"offset": subscribed["offset"], "epoch": subscribed["epoch"]}
        ws.send(
            json.dumps({"type": "subscribe", "id": "s2", "channel": "dashboard", "since": since})
        )
        while json.loads(ws.recv(10))["type"] != "subscribed":
            pass

    def moved(text: str, before: str, sample: str, by: float = 1, **labels: str) -> bool:
        return value(text, sample, **labels) >= value(before, sample, **labels) + by

    def worker_moved() -> bool:
        now = scrape(worker)
        return (
            moved(now, before_worker, "koinonia_sends_total", outcome="sent")
            and moved(now, before_worker, "koinonia_accept_to_sent_seconds_count")
            and moved(
                now,
                before_worker,
                "koinonia_provider_request_duration_seconds_count",
                operation="send",
                outcome="ok",
            )
            and moved(now, before_worker, "koinonia_db_queries_total", target="primary")
        )

    wait_until(worker_moved, 10, "the worker's send series did not move")

    def web_moved() -> bool:
        now = scrape(web)
        return (
            moved(
                now, before_web, "koinonia_realtime_events_delivered_total", transport="websocket"
            )
            and moved(now, before_web, "koinonia_event_publish_to_write_seconds_count")
            and moved(now, before_web, "koinonia_realtime_recoveries_total", outcome="recovered")
            and moved(now, before_web, "koinonia_receipt_latency_seconds_count")
        )

    wait_until(web_moved, 10, "the web's realtime and receipt series did not move")
    wait_until(
        lambda: (
            value(scrape(web), "koinonia_realtime_connections", transport="websocket")
            == value(before_web, "koinonia_realtime_connections", transport="websocket")
        ),
        5,
        "closed WebSockets are still counted",
    )


# -- in the process -------------------------------------------------------------------


def test_the_server_takes_port_zero_and_its_token(tmp_path: Path) -> None:
    address_file = tmp_path / "worker.address"
    settings = Settings.from_env(
        {
            "KOINONIA_WORKER_METRICS_PORT": "0",
            "KOINONIA_METRICS_TOKEN": "sesame",
            "KOINONIA_METRICS_ADDRESS_FILE": str(address_file),
        }
    )
    metrics = Metrics.create("worker")
    server = serve_metrics(settings, "worker", metrics.registry)
    assert server is not None
    try:
        assert address_file.read_text().strip() == server.address
        assert not server.address.endswith(":0")
        url = f"http://{server.address}/metrics"
        refused = httpx.get(url)
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"].startswith("Bearer")
        assert httpx.get(url, headers={"Authorization": "Basic sesame"}).status_code == 401
        text = scrape(server.address, {"Authorization": "Bearer sesame"})
        assert "koinonia_sends_total" in text
        # The same port again: refused, naming the variable.
        taken = with_metrics_port(settings, "worker", server.address.rsplit(":", 1)[1])
        with pytest.raises(MetricsPortInUse, match="KOINONIA_WORKER_METRICS_PORT"):
            serve_metrics(taken, "worker", CollectorRegistry())
    finally:
        server.stop()


@pytest.mark.anyio
async def test_off_means_no_server_and_no_metrics(stack: Stack) -> None:
    settings = Settings.from_env({**stack.env, "KOINONIA_WORKER_METRICS_PORT": "OFF"})
    assert settings.metrics.worker_port == "off"
    assert Metrics.for_process(settings, "worker") is None
    assert serve_metrics(settings, "worker", CollectorRegistry()) is None
    services = await Services.open(settings, redis_connections=2, metrics=None)
    try:
        assert services.metrics is None
        assert services.sampler is None
    finally:
        await services.close()
    assert with_metrics_port(settings, "worker", "9999").metrics.worker_port == "9999"
    with pytest.raises(ValueError, match="KOINONIA_WEB_METRICS_PORT"):
        Settings.from_env({"KOINONIA_WEB_METRICS_PORT": "eighty"})
    with pytest.raises(ValueError, match="--metrics-port"):
        with_metrics_port(settings, "web", "70000")
    # What each process exports from start-up.
    assert set(SERIES["scheduler"]) >= set(COMMON)


def _cli(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "deploy.cli", *args],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


@pytest.mark.slow  # starts a process of its own
def test_a_port_in_use_stops_the_process_naming_its_variable(stack: Stack) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        env = {**stack.env, "KOINONIA_SCHEDULER_METRICS_PORT": str(port)}
        process = _cli("scheduler", env=env)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode not in (0, None)
    assert "KOINONIA_SCHEDULER_METRICS_PORT" in stderr, stderr
    assert f"metrics port {port}" in stderr, stderr


@pytest.mark.slow  # starts a process of its own
def test_a_process_with_metrics_off_serves_none(stack: Stack, tmp_path: Path) -> None:
    address_file = tmp_path / "scheduler.address"
    env = {**stack.env, "KOINONIA_METRICS_ADDRESS_FILE": str(address_file)}
    process = _cli("scheduler", "--metrics-port", "off", env=env)
    try:
        assert process.stderr is not None
        for line in process.stderr:  # JSON log lines; the stack logs at INFO
            if "scheduler started" in line:
                break
            assert "metrics served" not in line, line
        else:
            pytest.fail(f"the scheduler exited with {process.wait()}")
        assert not address_file.exists()
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(30)


# -- several web workers, one port ----------------------------------------------------


Workers = tuple[str, str, Path, subprocess.Popen[str]]
"""The web's base URL, its metrics address, the multiprocess directory, the process."""


@pytest.fixture
def two_web_workers(stack: Stack, tmp_path: Path) -> Iterator[Workers]:
    (http_port,) = free_ports(1)
    address_file = tmp_path / "web.address"
    shared = tmp_path / "multiproc"
    shared.mkdir()
    (shared / "counter_1.db").write_bytes(b"")  # left by an earlier run: emptied at start
    env = {
        **stack.env,
        "KOINONIA_HTTP_PORT": str(http_port),
        "KOINONIA_DB_POOL_MIN": "2",
        "KOINONIA_METRICS_ADDRESS_FILE": str(address_file),
        "PROMETHEUS_MULTIPROC_DIR": str(shared),
    }
    process = _cli("web", "--workers", "2", "--metrics-port", "0", env=env)
    base = f"http://127.0.0.1:{http_port}"
    try:
        wait_until(address_file.exists, 30, "the web supervisor's metrics address")

        def ready() -> bool:
            assert process.poll() is None, process.communicate()[1]
            try:
                return httpx.get(f"{base}/health/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, 60, "two web workers ready")
        yield base, address_file.read_text().strip(), shared, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@pytest.mark.slow
def test_web_workers_report_on_one_port(two_web_workers: Workers) -> None:
    base, address, shared, process = two_web_workers
    before = value(scrape(address), "koinonia_http_requests_total", route="/health/live")
    requests = 60
    for _ in range(requests):
        with httpx.Client() as fresh:  # new connections, spread over both workers
            assert fresh.get(f"{base}/health/live").status_code == 200

    def both_reported() -> bool:
        text = scrape(address)
        # Each worker's pool holds at least KOINONIA_DB_POOL_MIN = 2 connections.
        return value(text, "koinonia_db_pool_connections") >= 4

    wait_until(both_reported, 20, "the pools of both workers on the one port")
    text = scrape(address)
    promtool_check(text, "web --workers 2")
    served = value(text, "koinonia_http_requests_total", route="/health/live")
    assert served - before == requests
    assert value(text, "koinonia_store_up", store="postgres") == 1
    files = {p.name for p in shared.glob("*.db")}
    assert "counter_1.db" not in files
    assert len({name.rsplit("_", 1)[1] for name in files if name.startswith("counter_")}) == 2
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0
    assert list(shared.glob("*.db")) == [], "the workers' files are removed at exit"
