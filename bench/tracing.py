"""What tracing costs: off (the default) and on, per call, per log line, per request.

Off, storage/process/tracing.py installs nothing and imports nothing of the
OpenTelemetry SDK; every helper is one check of a module global. This measures
that path where the code takes it:

- the helpers the worker, the receipts and the API call per batch or request
  (``span`` as a with-block, ``current_traceparent``, ``log_ids``, ``start_span``);
- one JSON log line (storage/process/logs.py), against a copy of the formatter as
  it was before trace and job ids were added, and the worker's per-entry
  ``log_context``;
- one HTTP request through the ASGI stack in process (RequestContext and a route
  answering a small JSON body, no network): off (no tracing middleware, as
  deploy/app.py builds it without an endpoint) and on (TracingMiddleware, spans to
  a batch processor whose exporter drops them).

    uv run python bench/tracing.py
    uv run python bench/tracing.py --requests 20000 --repeat 7

Best of ``--repeat`` runs (the machine is shared); numbers only, nothing asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
import timeit
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgspec
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from api.middleware import RequestContext
from api.tracing import TracingMiddleware
from storage.domain.envelope import request_id_var
from storage.process import tracing
from storage.process.logs import _RESERVED, JsonFormatter, log_context
from storage.process.tracing_otel import Active

PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class BeforeFormatter(logging.Formatter):
    """storage/process/logs.py JsonFormatter as it was before this change."""

    _encoder = msgspec.json.Encoder()

    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "component": self.component,
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = request_id_var.get()
        if rid != "-":
            entry["request_id"] = rid
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        return self._encoder.encode(entry).decode()


class Dropping(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def per_call_ns(fn: Callable[[], object], number: int, repeat: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e9


def helpers(number: int, repeat: int) -> dict[str, float]:
    def span_block() -> None:
        with tracing.span("send batch", parent=PARENT, kind="consumer") as span:
            if span is not None:
                span.set_attribute("x", 1)

    def start_end() -> None:
        tracing.end(tracing.start_span("webhook batch", kind="client"))

    return {
        "span (with-block, parent, attribute guarded)": per_call_ns(span_block, number, repeat),
        "start_span + end": per_call_ns(start_end, number, repeat),
        "current_traceparent()": per_call_ns(tracing.current_traceparent, number, repeat),
        "log_ids()": per_call_ns(tracing.log_ids, number, repeat),
    }


def log_lines(number: int, repeat: int) -> dict[str, float]:
    record = logging.LogRecord(
        "koinonia.delivery.worker", logging.INFO, __file__, 1, "batch done", None, None
    )
    record.__dict__.update({"recipients": 100, "sent": 100, "ms": 12.5})
    before, after = BeforeFormatter("worker"), JsonFormatter("worker")

    def in_job() -> str:
        with log_context(message_id="m" * 36, church_id="c" * 36, batch="1-0", attempt="1"):
            return after.format(record)

    def context_only() -> None:
        with log_context(message_id="m" * 36, church_id="c" * 36, batch="1-0", attempt="1"):
            pass

    return {
        "log line, formatter before this change": per_call_ns(
            lambda: before.format(record), number, repeat
        ),
        "log line, formatter now (no job, no span)": per_call_ns(
            lambda: after.format(record), number, repeat
        ),
        "log line, formatter now, inside a job's log_context": per_call_ns(in_job, number, repeat),
        "log_context enter+exit (once per queue entry)": per_call_ns(context_only, number, repeat),
    }


def app(traced: bool) -> Starlette:
    async def endpoint(request: Request) -> Response:
        return Response(b'{"success":true}', media_type="application/json")

    middleware = [Middleware(TracingMiddleware)] if traced else []
    middleware.append(Middleware(RequestContext, max_body_bytes=1_048_576))
    return Starlette(routes=[Route("/v1/messages/{id}", endpoint)], middleware=middleware)


async def requests_per_s(asgi: Starlette, count: int) -> float:
    scope_base = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/v1/messages/0190e7a0-0000-7000-8000-000000000000",
        "raw_path": b"/v1/messages/0190e7a0-0000-7000-8000-000000000000",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"bench")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        return None

    logging.getLogger("koinonia.access").setLevel(logging.WARNING)
    for _ in range(200):
        await asgi(dict(scope_base), receive, send)
    started = time.perf_counter()
    for _ in range(count):
        await asgi(dict(scope_base), receive, send)
    return count / (time.perf_counter() - started)


def http(count: int, repeat: int) -> dict[str, float]:
    off_app = app(traced=False)
    off = max(asyncio.run(requests_per_s(off_app, count)) for _ in range(repeat))
    active = Active.with_processor(
        "koinonia-bench", BatchSpanProcessor(Dropping(), max_queue_size=1_000_000)
    )
    with tracing.forced(active):
        on_app = app(traced=True)
        on = max(asyncio.run(requests_per_s(on_app, count)) for _ in range(repeat))
    active.shutdown()
    return {"off": off, "on": on}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    assert not tracing.enabled()
    print("Tracing off (the default): ns per call, best of", args.repeat)
    for name, ns in helpers(args.calls, args.repeat).items():
        print(f"  {name:<58} {ns:8.0f} ns")
    for name, ns in log_lines(args.calls // 4, args.repeat).items():
        print(f"  {name:<58} {ns:8.0f} ns")

    active = Active.with_processor(
        "koinonia-bench", BatchSpanProcessor(Dropping(), max_queue_size=1_000_000)
    )
    with tracing.forced(active):
        print("Tracing on (spans to a batch processor that drops them): ns per call")
        for name, ns in helpers(args.calls // 10, args.repeat).items():
            print(f"  {name:<58} {ns:8.0f} ns")
        with tracing.span("job"):
            for name, ns in log_lines(args.calls // 10, args.repeat).items():
                if "now" in name:
                    print(f"  {name + ', in a span':<58} {ns:8.0f} ns")
    active.shutdown()

    rates = http(args.requests, args.repeat)
    per_off, per_on = 1e6 / rates["off"], 1e6 / rates["on"]
    print(f"One HTTP request in process (RequestContext + route), best of {args.repeat}:")
    print(f"  off (no tracing middleware)  {rates['off']:9.0f} req/s  {per_off:6.1f} us/request")
    print(f"  on  (TracingMiddleware)      {rates['on']:9.0f} req/s  {per_on:6.1f} us/request")
    print(f"  a request's span costs {per_on - per_off:.1f} us when on")


if __name__ == "__main__":
    main()
