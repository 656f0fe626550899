"""deploy/prometheus: the scrape config, the alerting rules and their unit tests.

Fast: promtool accepts ``prometheus.yml`` and ``alerts.yml`` and passes
``alerts.test.yml``; every alert has a case where it fires and one where it stays
quiet, and carries ``for``, a severity and its value in the annotations.

Slow: a real Prometheus scrapes the session's stack (the addresses ``stack.json``
records), a broadcast, a member's reply and a WebSocket client move the request,
send, queue and realtime series, every metric the alerts name is in the scraped
data, and every rule evaluates without error against it.

Prometheus and promtool come with Debian's ``prometheus`` package; without them
these tests fail (never skip) saying how to install it.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml  # type: ignore[import-untyped]  # PyYAML comes with uvicorn[standard]
from websockets.sync.client import ClientConnection, connect

from deploy.stack import Stack, free_ports
from deploy.stack_file import read_stack_file
from tests.conftest import Church, unique_phone

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
CONFIG = PROMETHEUS_DIR / "prometheus.yml"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERT_TESTS = PROMETHEUS_DIR / "alerts.test.yml"

JOBS = {"web": "koinonia-web", "worker": "koinonia-worker", "scheduler": "koinonia-scheduler"}
"""Process kind → its job in prometheus.yml (the alerts select on these)."""
DEFAULT_TARGETS = {
    "koinonia-web": "127.0.0.1:9180",
    "koinonia-worker": "127.0.0.1:9181",
    "koinonia-scheduler": "127.0.0.1:9182",
}
WAIT_S = 60.0
"""Every wait of the slow test is bounded by this."""

NO_SAMPLES = {"koinonia_db_replica_lag_seconds"}
"""Metrics the alerts use that have no samples in the test stack: replica lag is
labelled by replica and the stack runs none, so /metrics has only its HELP and TYPE
lines and Prometheus knows it from its metadata alone."""


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None and (Path("/usr/bin") / name).exists():
        found = str(Path("/usr/bin") / name)  # PATH without /usr/bin
    if found is None:
        pytest.fail(f"{name} not found: apt-get install prometheus (it brings promtool)")
    return found


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_tool("promtool"), *args],
        cwd=PROMETHEUS_DIR,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _rules() -> list[dict[str, Any]]:
    groups = _load(ALERTS)["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


# -- fast: promtool and the files' shape ------------------------------------------------


def test_prometheus_config_is_valid() -> None:
    result = _promtool("check", "config", str(CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout, result.stdout
    config = _load(CONFIG)
    assert config["rule_files"] == ["alerts.yml"]
    jobs = {
        job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
        for job in config["scrape_configs"]
    }
    assert jobs == {job: [target] for job, target in DEFAULT_TARGETS.items()}
    text = CONFIG.read_text()
    # The comments say how to scrape with the metrics token.
    assert "KOINONIA_METRICS_TOKEN" in text
    assert "type: Bearer" in text


def test_alerting_rules_are_valid() -> None:
    result = _promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in result.stdout, result.stdout


def test_alert_unit_tests_pass() -> None:
    result = _promtool("test", "rules", str(ALERT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout, result.stdout


def test_every_alert_fires_in_one_case_and_stays_quiet_in_another() -> None:
    tests = _load(ALERT_TESTS)
    assert tests["rule_files"] == ["alerts.yml"]
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    alerts = {rule["alert"] for rule in _rules()}
    assert len(alerts) == len(_rules()), "two alerts share a name"
    assert sorted(alerts - fires) == [], "alerts never seen firing in alerts.test.yml"
    assert sorted(alerts - quiet) == [], "alerts never seen quiet in alerts.test.yml"
    assert sorted((fires | quiet) - alerts) == [], "tests of alerts alerts.yml lacks"


def test_every_alert_waits_has_a_severity_and_shows_its_value() -> None:
    for rule in _rules():
        name = rule["alert"]
        assert re.fullmatch(r"\d+[smh]", str(rule.get("for", ""))), f"{name}: no for:"
        assert rule.get("labels", {}).get("severity") in {"warning", "critical"}, name
        annotations = rule.get("annotations", {})
        for key in ("summary", "description"):
            assert "$value" in annotations.get(key, ""), f"{name}: {key} lacks the value"


# -- slow: a real Prometheus against the session's stack --------------------------------


def _host_port(address: str) -> str:
    """``host:port`` of ``http://host:port/metrics`` or of ``host:port`` itself."""
    if "//" not in address:
        address = f"http://{address}"
    parts = urlsplit(address)
    assert parts.hostname, f"not a metrics address: {address!r}"
    assert parts.port, f"not a metrics address: {address!r}"
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{host}:{parts.port}"


def _metrics_targets(stack: Stack) -> dict[str, list[str]]:
    """Job → the metrics ``host:port`` of each running web, worker and scheduler, as
    ``stack.json`` records them (``metrics``: each process's name and address)."""
    # Brought up to date first, as a ready stack does: tests before this one restart
    # the worker, which then binds another free port.
    stack.learn_metrics(time.monotonic() + WAIT_S)
    stack.write_stack_file()
    written = read_stack_file(stack.stack_file)
    assert written.metrics, f"{stack.stack_file} records no metrics addresses"
    targets: dict[str, list[str]] = {}
    for endpoint in written.metrics:
        job = JOBS.get(stack.kinds.get(endpoint.process, endpoint.process))
        if job is not None:
            targets.setdefault(job, []).append(_host_port(endpoint.address))
    assert set(targets) == set(JOBS.values()), f"{written.metrics}: {targets}"
    return targets


def _write_config(directory: Path, targets: dict[str, list[str]], token: str) -> Path:
    """The shipped prometheus.yml, scraping ``targets`` every second, beside a copy of
    alerts.yml (its rule_files entry is relative to the config)."""
    config = _load(CONFIG)
    config["global"].update(
        {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"}
    )
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": targets[job["job_name"]]}]
        if token:
            job["authorization"] = {"type": "Bearer", "credentials": token}
    shutil.copy(ALERTS, directory / ALERTS.name)
    path = directory / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture
def prometheus(stack: Stack, tmp_path: Path) -> Iterator[httpx.Client]:
    """A real Prometheus scraping the stack's processes every second; an HTTP client
    on its API once every target is up. Stopped (killed if it must be) afterwards."""
    binary = _tool("prometheus")
    config = _write_config(
        tmp_path, _metrics_targets(stack), stack.env.get("KOINONIA_METRICS_TOKEN", "")
    )
    check = _promtool("check", "config", str(config))
    assert check.returncode == 0, check.stdout + check.stderr
    (port,) = free_ports(1)
    log_path = tmp_path / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    api = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5.0)
    try:

        def ready() -> bool:
            if process.poll() is not None:
                tail = log_path.read_text(errors="replace")[-3000:]
                pytest.fail(f"prometheus exited with {process.returncode}:\n{tail}")
            try:
                return api.get("/-/ready").status_code == 200
            except httpx.HTTPError:
                return False

        _eventually(ready, "prometheus answers /-/ready")

        def target_health() -> dict[str, tuple[str, str]]:
            active = api.get("/api/v1/targets").json()["data"]["activeTargets"]
            return {t["scrapeUrl"]: (t["health"], t["lastError"]) for t in active}

        def targets_up() -> bool:
            health = target_health()
            return bool(health) and all(h == "up" for h, _ in health.values())

        _eventually(targets_up, "every target scraped (health up)", show=target_health)
        yield api
    finally:
        api.close()
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


def _eventually(
    check: Callable[[], Any], what: str, *, show: Callable[[], Any] | None = None
) -> Any:
    """Poll ``check`` until it returns something truthy (returned), for at most
    WAIT_S; then fail with ``what`` and, with ``show``, what it shows at the end."""
    deadline = time.monotonic() + WAIT_S
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            seen = f"; last seen: {show()!r}" if show is not None else ""
            raise AssertionError(f"{what}: not true within {WAIT_S:.0f} s{seen}")
        time.sleep(0.25)


def _query(api: httpx.Client, promql: str) -> list[dict[str, Any]]:
    answer = api.get("/api/v1/query", params={"query": promql})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def _value(api: httpx.Client, promql: str) -> float:
    """The value of a one-series query; 0 when it has no series (a labelled counter
    not yet incremented)."""
    result = _query(api, promql)
    assert len(result) <= 1, f"{promql}: {result}"
    return float(result[0]["value"][1]) if result else 0.0


MOVES = {
    "API requests (POST /v1/messages)": (
        'sum(koinonia_http_requests_total{job="koinonia-web", route="/v1/messages", method="POST"})'
    ),
    "provider webhooks (receipts and the reply)": (
        'sum(koinonia_http_requests_total{job="koinonia-web", '
        'route="/v1/provider/telnyx/webhooks", method="POST"})'
    ),
    "API durations": 'sum(koinonia_http_request_duration_seconds_count{job="koinonia-web"})',
    "sends": 'sum(koinonia_sends_total{job="koinonia-worker", outcome="sent"})',
    "queue accept-to-sent": 'sum(koinonia_accept_to_sent_seconds_count{job="koinonia-worker"})',
    "realtime events written": (
        'sum(koinonia_realtime_events_delivered_total{job="koinonia-web", transport="websocket"})'
    ),
    "realtime connections": (
        'sum(koinonia_realtime_connections{job="koinonia-web", transport="websocket"})'
    ),
}
"""Series the test's traffic must raise (counters; the connection gauge while the
test's WebSocket is open)."""


def _subscribe(ws: ClientConnection, *channels: str) -> None:
    welcome = json.loads(ws.recv(timeout=10))
    assert welcome["type"] == "welcome", welcome
    for n, channel in enumerate(channels):
        ws.send(json.dumps({"type": "subscribe", "id": f"s{n}", "channel": channel}))
    subscribed: set[str] = set()
    while subscribed != set(channels):
        frame = json.loads(ws.recv(timeout=10))
        assert frame["type"] in {"subscribed", "event"}, frame
        if frame["type"] == "subscribed":
            subscribed.add(frame["channel"])


def _events(ws: ClientConnection, at_least: int) -> list[dict[str, Any]]:
    """Event frames read from ``ws`` until ``at_least`` came (bounded by WAIT_S)."""
    deadline = time.monotonic() + WAIT_S
    events: list[dict[str, Any]] = []
    while len(events) < at_least:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"only {len(events)} events in {WAIT_S:.0f} s: {events}"
        frame = json.loads(ws.recv(timeout=remaining))
        if frame["type"] == "event":
            events.append(frame)
    return events


def _metric_names(text: str) -> set[str]:
    """The koinonia metrics ``text`` names (``up``, Prometheus's own, is not one)."""
    return set(re.findall(r"\bkoinonia_[a-z0-9_]+\b", text))


@pytest.mark.slow
def test_prometheus_scrapes_the_stack_and_the_alerts_evaluate(
    stack: Stack, prometheus: httpx.Client, church: Church, sim_url: str
) -> None:
    api = prometheus
    before = {what: _value(api, promql) for what, promql in MOVES.items()}

    group = church.group()
    phone = unique_phone()
    church.member(phone, [group])
    with connect(
        f"ws://127.0.0.1:{stack.http_port}/v1/realtime",
        additional_headers={"Authorization": f"Bearer {church.key}"},
        open_timeout=10,
    ) as ws:
        _subscribe(ws, "dashboard", "inbox")
        message_id = church.broadcast(group, "Prayer meeting at 7")
        counts = church.counts_when(message_id, lambda c: c["delivered"] == 1, WAIT_S)
        assert counts["delivered"] == 1, counts
        reply = httpx.post(
            f"{sim_url}/_sim/inbound",
            json={"from": phone, "to": church.phone_number, "text": "Amen"},
            timeout=10,
        )
        assert reply.status_code == 202, reply.text
        assert church.conversations_when(1, WAIT_S), "the reply never reached the inbox"
        # The broadcast's progress (dashboard) and the reply's conversation (inbox).
        _events(ws, 2)

        def now() -> dict[str, float]:
            return {what: _value(api, promql) for what, promql in MOVES.items()}

        def all_moved() -> bool:
            return all(value > before[what] for what, value in now().items())

        # While the WebSocket is open, so the connection gauge counts it.
        _eventually(all_moved, f"every series rose from {before}", show=now)

    # Queue backlogs are sampled for both queues.
    queues = {r["metric"]["queue"] for r in _query(api, "koinonia_queue_backlog")}
    assert {"send", "materialize"} <= queues, queues
    # Every process sees both stores.
    up = {
        (r["metric"]["job"], r["metric"]["store"]): float(r["value"][1])
        for r in _query(api, "koinonia_store_up")
    }
    assert up == {(job, s): 1.0 for job in JOBS.values() for s in ("postgres", "redis")}, up

    # Every metric the alerts name (in expressions, or to operators in annotations) is
    # in the scraped data: with samples, or (NO_SAMPLES) with metadata.
    used: set[str] = set()
    for rule in _rules():
        used |= _metric_names(rule["expr"])
        used |= _metric_names(" ".join(rule.get("annotations", {}).values()))
    assert {"koinonia_http_requests_total", "koinonia_store_up"} <= used, used
    names = set(api.get("/api/v1/label/__name__/values").json()["data"])
    metadata = api.get("/api/v1/metadata").json()["data"]
    missing = sorted(
        name
        for name in used
        if not (
            name in names
            or f"{name}_count" in names  # a histogram named by its family
            or (name in NO_SAMPLES and name in metadata)
        )
    )
    assert missing == [], f"alerts.yml names metrics the stack does not export: {missing}"

    # Every rule has been evaluated against the real data, without error.
    def loaded() -> list[dict[str, Any]]:
        groups = api.get("/api/v1/rules").json()["data"]["groups"]
        return [r for g in groups for r in g["rules"]]

    def evaluated() -> list[dict[str, Any]] | None:
        rules = loaded()
        done = len(rules) == len(_rules()) and all(r["health"] != "unknown" for r in rules)
        return rules if done else None

    def health() -> dict[str, str]:
        return {r["name"]: r["health"] for r in loaded()}

    rules = _eventually(evaluated, "every rule evaluated", show=health)
    errors = {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"}
    assert errors == {}, errors
