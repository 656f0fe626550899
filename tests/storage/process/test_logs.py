"""JSON log lines carry their context: ``request_id`` inside an HTTP request, the
job's ids inside a worker's queue entry or a scheduler job (storage/process/logs.py).

Read from the session stack's own log files (tests/conftest.py: ``stack.log_path``).
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from deploy.stack import Stack
from storage.process.logs import JsonFormatter, log_context
from tests.conftest import Church, unique_phone, wait_until


def lines(stack: Stack, name: str) -> list[dict[str, Any]]:
    found = []
    for raw in stack.log_path(name).read_text(errors="replace").splitlines():
        if raw.startswith("{"):
            try:
                found.append(json.loads(raw))
            except json.JSONDecodeError:
                continue  # a line cut by the read
    return found


def first(stack: Stack, name: str, **wanted: Any) -> dict[str, Any] | None:
    for line in lines(stack, name):
        if all(line.get(k) == v for k, v in wanted.items()):
            return line
    return None


def test_request_and_job_lines_carry_their_ids(stack: Stack, church: Church) -> None:
    group = church.group()
    for _ in range(2):
        church.member(unique_phone(), [group])
    answer = church.api.post(
        "/v1/messages", json={"body": "Logs", "target": {"group_ids": [group]}}
    )
    assert answer.status_code == 202, answer.text
    request_id = answer.headers["x-request-id"]
    message_id = answer.json()["data"]["id"]
    counts = church.counts_when(message_id, lambda c: c["delivered"] == 2)
    assert counts["delivered"] == 2, counts

    # HTTP: the access line of that request, by its request id.
    wait_until(
        lambda: first(stack, "web", request_id=request_id, msg="request") is not None,
        10,
        "the request's access line",
    )
    access = first(stack, "web", request_id=request_id, msg="request")
    assert access is not None
    assert (access["component"], access["method"], access["status"]) == ("web", "POST", 202)
    assert access["path"] == "/v1/messages"

    # Worker: the materialize job and the send batch, with ids from the log context
    # (church_id, job, entry and batch are no extra of those calls).
    wait_until(
        lambda: first(stack, "worker", message_id=message_id, msg="batch done") is not None,
        10,
        "the worker's batch line",
    )
    materialized = first(stack, "worker", message_id=message_id, msg="recipients materialized")
    assert materialized is not None
    assert materialized["church_id"] == church.id
    assert materialized["job"] == "materialize"
    assert materialized["entry"]
    batch = first(stack, "worker", message_id=message_id, msg="batch done")
    assert batch is not None
    assert batch["church_id"] == church.id
    assert batch["batch"]
    assert batch["attempt"] == "1"
    assert (batch["recipients"], batch["sent"]) == (2, 2)
    # No request id leaks into a worker line, and no trace ids with tracing off.
    for line in (materialized, batch, access):
        assert "trace_id" not in line
        assert "span_id" not in line
    assert "request_id" not in materialized
    assert "request_id" not in batch


def test_scheduler_lines_carry_the_job(stack: Stack, church: Church) -> None:
    group = church.group()
    church.member(unique_phone(), [group])
    send_at = (datetime.now(UTC) + timedelta(seconds=1.5)).isoformat()
    answer = church.api.post(
        "/v1/messages",
        json={"body": "Later", "target": {"group_ids": [group]}, "send_at": send_at},
    )
    assert answer.status_code == 202, answer.text
    message_id = answer.json()["data"]["id"]
    church.counts_when(message_id, lambda c: c["delivered"] == 1)
    wait_until(
        lambda: first(stack, "scheduler", msg="scheduled messages started") is not None,
        10,
        "the scheduler's line",
    )
    started = first(stack, "scheduler", msg="scheduled messages started")
    assert started is not None
    assert (started["component"], started["job"]) == ("scheduler", "start_scheduled")


def test_log_context_nests_and_ends() -> None:
    formatter = JsonFormatter("worker")

    def entry() -> dict[str, Any]:
        record = logging.LogRecord("t", logging.INFO, __file__, 1, "hello", None, None)
        parsed: dict[str, Any] = json.loads(formatter.format(record))
        return parsed

    with log_context(message_id="m", church_id="c"):
        with log_context(batch="b"):
            inner = entry()
        outer = entry()
    after = entry()
    assert (inner["message_id"], inner["church_id"], inner["batch"]) == ("m", "c", "b")
    assert "batch" not in outer
    assert outer["message_id"] == "m"
    assert not {"message_id", "church_id", "batch"} & after.keys()
