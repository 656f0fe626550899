"""Traces (storage/process/tracing.py): off and free by default; on, one broadcast is
one trace from its 202 to its last receipt, across web and worker processes.

The slow test starts a stack of its own with ``OTEL_EXPORTER_OTLP_ENDPOINT``
pointing at a small OTLP/HTTP receiver on loopback, which decodes what the
exporters send (``ExportTraceServiceRequest``) and keeps the spans.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgspec
import psycopg
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from api.tracing import TracingMiddleware
from delivery.receipts import ReceiptSpans
from deploy.stack import Stack
from storage.domain.statuses import RecipientStatus
from storage.pg.messages import SendText
from storage.pg.recipients import ProviderStatus
from storage.process import tracing
from storage.process.logs import JsonFormatter
from storage.process.tracing_otel import Active
from storage.redis.queue import MaterializeJob, SendBatch, encode_entry, send_decoder
from tests.conftest import Church, running_stack, unique_phone, wait_until

ROOT = Path(__file__).resolve().parents[3]

# -- off: nothing installed, nothing made ---------------------------------------------------

OFF_PROBE = """
import json
import sys
from storage.process import tracing
from storage.process.settings import Settings
from deploy.app import create_app
assert tracing.setup("web", env={}) is False
assert not tracing.enabled()
app = create_app(Settings())
names = [m.cls.__name__ for m in app.user_middleware]
with tracing.span("x", parent="00-" + "1" * 32 + "-" + "2" * 16 + "-01") as span:
    inside = (span, tracing.current_traceparent(), tracing.log_ids(), tracing.current_link())
# redis-py imports the OpenTelemetry API for its own (off) metrics; ours stays unloaded.
loaded = sorted(
    m for m in sys.modules
    if m.startswith(("opentelemetry.sdk.trace", "opentelemetry.exporter"))
    or m == "storage.process.tracing_otel"
)
import opentelemetry.trace
provider = opentelemetry.trace._TRACER_PROVIDER
print(json.dumps([names, list(inside), tracing.start_span("y"), loaded, repr(provider)]))
"""


@pytest.mark.slow  # a fresh interpreter imports the whole app
def test_off_installs_nothing_and_loads_nothing() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_EXPORTER_OTLP")}
    done = subprocess.run(
        [sys.executable, "-c", OFF_PROBE],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    names, inside, started, loaded, provider = json.loads(done.stdout.strip().splitlines()[-1])
    assert "TracingMiddleware" not in names
    assert "RequestContext" in names
    assert inside == [None, "", None, None]
    assert started is None
    # No tracer provider, and the SDK and exporter not even imported.
    assert provider == "None"
    assert loaded == []


def test_endpoint_and_protocol_from_the_environment() -> None:
    assert tracing.traces_endpoint({}) == ""
    base = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/"}
    assert tracing.traces_endpoint(base) == "http://collector:4318/v1/traces"
    specific = base | {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://x:1/t"}
    assert tracing.traces_endpoint(specific) == "http://x:1/t"
    assert tracing.traces_endpoint(base | {"OTEL_SDK_DISABLED": "true"}) == ""
    assert tracing.traces_endpoint(base | {"OTEL_TRACES_EXPORTER": "none"}) == ""
    assert tracing.protocol_of(base) == "http/protobuf"
    with pytest.raises(ValueError, match="http/json"):
        tracing.setup("web", env=base | {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})
    assert not tracing.enabled()


def test_traceparent_strings() -> None:
    good = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    parsed = tracing.parse_traceparent(good)
    assert parsed == (0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, 1)
    assert tracing.format_traceparent(*parsed) == good
    for bad in (
        "",
        "garbage",
        "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "00-" + "0" * 32 + "-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-" + "0" * 16 + "-01",
        "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b716920333-01",
        "00-0af7651916cd43dd8448eb211c80319z-b7ad6b7169203331-01",
    ):
        assert tracing.parse_traceparent(bad) is None, bad


def test_queue_entries_without_trace_context_are_the_old_format() -> None:
    church, message = uuid.uuid4(), uuid.uuid4()
    batch = SendBatch(
        church_id=church,
        message_id=message,
        created_at=datetime(2025, 1, 1, tzinfo=UTC),
        recipient_ids=[uuid.uuid4()],
        from_number="+15550000000",
    )
    # Tracing off: no traceparent in the entry (an earlier version reads it).
    assert "traceparent" not in msgspec.msgpack.decode(encode_entry(batch))
    job = MaterializeJob(church_id=church, message_id=message, created_at=batch.created_at)
    assert "traceparent" not in msgspec.msgpack.decode(encode_entry(job))
    # An entry of an earlier version (no field) decodes with an empty one.
    old = msgspec.msgpack.encode(
        {
            "type": "batch",
            "church_id": str(church),
            "message_id": str(message),
            "created_at": "2025-01-01T00:00:00Z",
            "recipient_ids": [str(r) for r in batch.recipient_ids],
            "from_number": "+15550000000",
            "attempt": 1,
            "max_attempts": 5,
        }
    )
    assert send_decoder.decode(old).traceparent == ""
    traced = msgspec.structs.replace(batch, traceparent="00-" + "1" * 32 + "-" + "2" * 16 + "-01")
    assert send_decoder.decode(encode_entry(traced)) == traced


def test_broadcast_with_tracing_off_stores_no_context(stack: Stack, church: Church) -> None:
    group = church.group()
    church.member(unique_phone(), [group])
    message_id = church.broadcast(group, "untraced")
    church.counts_when(message_id, lambda c: c["delivered"] == 1)
    with psycopg.connect(stack.env["DATABASE_URL"]) as conn:
        row = conn.execute(
            "SELECT traceparent FROM message WHERE id = %s", (uuid.UUID(message_id),)
        ).fetchone()
    assert row == (None,)


# -- on, in process: names, parents, log ids ------------------------------------------------


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    active = Active.with_processor("koinonia-test", SimpleSpanProcessor(exporter))
    with tracing.forced(active):
        yield exporter
    active.shutdown()


@pytest.mark.anyio
async def test_server_spans_are_named_by_route_template(spans: InMemorySpanExporter) -> None:
    async def thing(request: Request) -> PlainTextResponse:
        inner = tracing.current_traceparent()
        return PlainTextResponse(inner, status_code=201)

    async def broken(request: Request) -> PlainTextResponse:
        return PlainTextResponse("no", status_code=503)

    app = Starlette(
        routes=[Route("/v1/things/{id}", thing, methods=["POST"]), Route("/broken", broken)]
    )
    app.add_middleware(TracingMiddleware)
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        first = await client.post(f"/v1/things/{uuid.uuid4()}", headers={"traceparent": parent})
        await client.get("/nowhere/123")
        await client.get("/broken")
        await client.get("/health/live")
    assert first.status_code == 201
    made = {s.name: s for s in spans.get_finished_spans()}
    assert set(made) == {"POST /v1/things/{id}", "GET", "GET /broken"}
    server = made["POST /v1/things/{id}"]
    assert server.attributes is not None
    assert server.attributes["http.route"] == "/v1/things/{id}"
    assert server.attributes["http.response.status_code"] == 201
    # The caller's trace is continued, and the handler sees the server span as current.
    assert server.context is not None
    assert server.parent is not None
    assert server.context.trace_id == 0x0AF7651916CD43DD8448EB211C80319C
    assert server.parent.span_id == 0xB7AD6B7169203331
    assert first.text == tracing.format_traceparent(
        server.context.trace_id, server.context.span_id, 1
    )
    assert made["GET"].attributes is not None
    assert made["GET"].attributes["http.response.status_code"] == 404
    assert made["GET"].status.status_code.name == "UNSET"
    assert made["GET /broken"].status.status_code.name == "ERROR"


def test_spans_continue_a_stored_context_and_logs_carry_it(
    spans: InMemorySpanExporter,
) -> None:
    import logging

    stored = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    formatter = JsonFormatter("worker")
    with tracing.span("send batch", parent=stored, kind="consumer") as span:
        assert span is not None
        tp = tracing.current_traceparent()
        record = logging.LogRecord("t", logging.INFO, __file__, 1, "inside", None, None)
        line = json.loads(formatter.format(record))
        link = tracing.current_link()
    late = tracing.start_span("receipts", parent=tp, links=[link])
    tracing.end(late)
    finished = {s.name: s for s in spans.get_finished_spans()}
    batch, receipts = finished["send batch"], finished["receipts"]
    assert batch.context is not None
    assert receipts.context is not None
    assert receipts.parent is not None
    assert batch.context.trace_id == receipts.context.trace_id == 0x0AF7651916CD43DD8448EB211C80319C
    assert receipts.parent.span_id == batch.context.span_id
    assert [lk.context.span_id for lk in receipts.links] == [batch.context.span_id]
    assert line["trace_id"] == f"{batch.context.trace_id:032x}"
    assert line["span_id"] == f"{batch.context.span_id:016x}"


class FakeTexts:
    def __init__(self, traceparent: str) -> None:
        self.traceparent = traceparent
        self.reads = 0

    async def get(self, church_id: uuid.UUID, message_id: uuid.UUID, conn: object) -> SendText:
        self.reads += 1
        return SendText("hi", False, None, self.traceparent)


@pytest.mark.anyio
async def test_receipt_spans_gather_a_message_by_the_window(spans: InMemorySpanExporter) -> None:
    stored = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    texts = FakeTexts(stored)
    receipts = ReceiptSpans("receipts", texts, window_s=0.2)  # type: ignore[arg-type]
    church, message, other = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()

    def update(message_id: uuid.UUID) -> ProviderStatus:
        return ProviderStatus(
            event_id=str(uuid.uuid4()),
            event_type="message.finalized",
            church_id=church,
            message_id=message_id,
            recipient_id=uuid.uuid4(),
            target=RecipientStatus.DELIVERED,
            provider_message_id="p",
            error_code=None,
        )

    with tracing.span("webhook", kind="server"):
        link = tracing.current_link()
    touched = await receipts.add(None, [(update(message), link), (update(other), None)])  # type: ignore[arg-type]
    assert touched == [(church, message), (church, other)]
    await receipts.add(None, [(update(message), link)] * 3)  # type: ignore[arg-type]
    assert spans.get_finished_spans()[1:] == ()  # still gathering (the webhook span ended)
    await anyio.sleep(0.3)  # the window closes them
    made = [s for s in spans.get_finished_spans() if s.name == "receipts"]
    assert sorted(s.attributes["koinonia.receipts"] for s in made if s.attributes) == [1, 4]
    mine = next(
        s for s in made if s.attributes and s.attributes["koinonia.message_id"] == str(message)
    )
    assert mine.context is not None
    assert mine.parent is not None
    assert mine.context.trace_id == 0x0AF7651916CD43DD8448EB211C80319C
    assert mine.parent.span_id == 0xB7AD6B7169203331
    assert len(mine.links) == 4
    assert texts.reads == 2  # once per message and span, not per receipt
    await receipts.add(None, [(update(message), None)])  # type: ignore[arg-type]
    receipts.close()
    assert len([s for s in spans.get_finished_spans() if s.name == "receipts"]) == 3


# -- on, end to end ------------------------------------------------------------------------


class Received(msgspec.Struct):
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    links: list[tuple[str, str]]


class Collector:
    """An OTLP/HTTP receiver for traces on loopback (POST /v1/traces, protobuf)."""

    def __init__(self) -> None:
        self.spans: list[Received] = []
        self.lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                encoding = (self.headers.get("content-encoding") or "").lower()
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                if self.path != "/v1/traces":
                    self.send_response(404)
                    self.end_headers()
                    return
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                collector.add(request)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def add(self, request: ExportTraceServiceRequest) -> None:
        for resource_spans in request.resource_spans:
            service = next(
                (
                    a.value.string_value
                    for a in resource_spans.resource.attributes
                    if a.key == "service.name"
                ),
                "",
            )
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    attributes = {a.key: _value(a.value) for a in span.attributes}
                    received = Received(
                        service=service,
                        name=span.name,
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        attributes=attributes,
                        links=[(lk.trace_id.hex(), lk.span_id.hex()) for lk in span.links],
                    )
                    with self.lock:
                        self.spans.append(received)

    def of_trace(self, trace_id: str) -> list[Received]:
        with self.lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def named(self, name: str) -> list[Received]:
        with self.lock:
            return [s for s in self.spans if s.name == name]


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    found = Collector()
    found.thread.start()
    yield found
    found.server.shutdown()


@pytest.fixture(scope="module")
def traced_stack(tmp_path_factory: pytest.TempPathFactory, collector: Collector) -> Iterator[Stack]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "NO_PROXY": "127.0.0.1,localhost",
            "KOINONIA_LOG_LEVEL": "INFO",
            "KOINONIA_PASSWORD_TIME_COST": "1",
            "KOINONIA_PASSWORD_MEMORY_KIB": "8192",
            "KOINONIA_SCHEDULER_INTERVAL_S": "1",
        }
    )
    with running_stack(tmp_path_factory, "traced", env) as stack:
        yield stack


@pytest.mark.slow
def test_a_broadcast_is_one_trace_from_202_to_receipts(
    traced_stack: Stack, collector: Collector
) -> None:
    church = Church(f"http://127.0.0.1:{traced_stack.http_port}")
    try:
        group = church.group()
        for _ in range(3):
            church.member(unique_phone(), [group])
        answer = church.api.post(
            "/v1/messages", json={"body": "Traced", "target": {"group_ids": [group]}}
        )
        assert answer.status_code == 202, answer.text
        message_id = answer.json()["data"]["id"]
        counts = church.counts_when(message_id, lambda c: c["delivered"] == 3)
        assert counts["delivered"] == 3, counts
    finally:
        church.close()

    # The 202's server span: its trace is the broadcast's.
    def accepted() -> list[Received]:
        return [
            s
            for s in collector.named("POST /v1/messages")
            if s.attributes.get("http.response.status_code") == 202
        ]

    wait_until(lambda: bool(accepted()), 15, "the POST /v1/messages span")
    (post,) = accepted()
    assert post.service == "koinonia-web"
    assert post.attributes["http.route"] == "/v1/messages"
    trace_id = post.trace_id

    with psycopg.connect(traced_stack.env["DATABASE_URL"]) as conn:
        row = conn.execute(
            "SELECT traceparent FROM message WHERE id = %s", (uuid.UUID(message_id),)
        ).fetchone()
    assert row is not None
    assert row[0].startswith(f"00-{trace_id}-{post.span_id}-")  # flags: sampled (and random)

    def names() -> list[str]:
        return sorted(s.name for s in collector.of_trace(trace_id))

    def complete() -> bool:
        found = names()
        receipts = [s for s in collector.of_trace(trace_id) if s.name == "receipts"]
        applied = sum(int(s.attributes["koinonia.receipts"]) for s in receipts)
        return {"materialize", "send batch", "provider send"} <= set(found) and applied == 6

    deadline = time.monotonic() + 20
    while not complete():
        assert time.monotonic() < deadline, [
            (x.name, x.attributes) for x in collector.of_trace(trace_id)
        ]
        time.sleep(0.1)
    spans = collector.of_trace(trace_id)
    by_name: dict[str, list[Received]] = {}
    for s in spans:
        by_name.setdefault(s.name, []).append(s)
    # One span per job and batch, never one per recipient: 3 recipients, 1 batch.
    assert len(by_name["POST /v1/messages"]) == 1
    assert len(by_name["materialize"]) == 1
    assert len(by_name["send batch"]) == 1
    assert len(by_name["provider send"]) == 1
    assert set(by_name) == {
        "POST /v1/messages",
        "materialize",
        "send batch",
        "provider send",
        "receipts",
    }
    # Receipts come one webhook each (2 per recipient); a message's receipts are counted
    # in one span per second and process, so fewer spans than receipts.
    assert 1 <= len(by_name["receipts"]) < 6
    for s in spans:
        assert not any("recipient_id" in key for key in s.attributes), s

    (materialize,) = by_name["materialize"]
    (batch,) = by_name["send batch"]
    (send,) = by_name["provider send"]
    assert {materialize.service, batch.service, send.service} == {"koinonia-worker"}
    assert materialize.parent_span_id == post.span_id
    assert batch.parent_span_id == materialize.span_id
    assert send.parent_span_id == batch.span_id
    assert batch.attributes["koinonia.recipients"] == 3
    assert send.attributes["koinonia.provider.requests"] == 3
    assert send.attributes["koinonia.provider.accepted"] == 3
    for receipt in by_name["receipts"]:
        assert receipt.service == "koinonia-web"
        assert receipt.parent_span_id == post.span_id
        assert receipt.attributes["koinonia.message_id"] == message_id
        # Linked to the webhook requests it answered, each a trace of its own.
        assert receipt.links
        for linked_trace, linked_span in receipt.links:
            assert linked_trace != trace_id
            wait_until(
                lambda ls=linked_span: (
                    ls in {s.span_id for s in collector.named("POST /v1/provider/telnyx/webhooks")}
                ),
                10,
                "the linked webhook span",
            )

    # Log lines of the worker carry the trace id of the broadcast.
    worker_lines = [
        json.loads(raw)
        for raw in traced_stack.log_path("worker").read_text().splitlines()
        if raw.startswith("{")
    ]
    ours = [line for line in worker_lines if line.get("message_id") == message_id]
    assert ours
    assert all(line.get("trace_id") == trace_id for line in ours), ours
    web_lines = [
        json.loads(raw)
        for raw in traced_stack.log_path("web").read_text().splitlines()
        if raw.startswith("{")
    ]
    access = [
        line
        for line in web_lines
        if line.get("msg") == "request"
        and line.get("path") == "/v1/messages"
        and line.get("status") == 202
    ]
    assert [line["trace_id"] for line in access] == [trace_id]
    assert httpx.get(f"http://127.0.0.1:{traced_stack.http_port}/health/live").status_code == 200


@pytest.mark.slow
def test_started_processes_name_their_service(traced_stack: Stack) -> None:
    """Each process type installs its own service name (web, worker, scheduler)."""
    deadline = time.monotonic() + 10
    seen: dict[str, str] = {}
    while time.monotonic() < deadline and len(seen) < 3:
        for name in ("web", "worker", "scheduler"):
            for raw in traced_stack.log_path(name).read_text().splitlines():
                if raw.startswith("{") and '"tracing on"' in raw:
                    seen[name] = json.loads(raw)["service"]
        time.sleep(0.1)
    assert seen == {
        "web": "koinonia-web",
        "worker": "koinonia-worker",
        "scheduler": "koinonia-scheduler",
    }
