"""OpenTelemetry traces: off unless an OTLP endpoint is configured, and then free.

``setup(process)`` reads the standard OpenTelemetry variables once at start-up
(``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``,
``OTEL_EXPORTER_OTLP_PROTOCOL``, default ``http/protobuf``; the SDK reads the
rest itself: ``OTEL_BSP_*``, ``OTEL_TRACES_SAMPLER``, ``OTEL_EXPORTER_OTLP_HEADERS``,
``OTEL_RESOURCE_ATTRIBUTES``) and installs a tracer provider named
``koinonia-<process>`` with a batch span processor and the OTLP exporter. Without
an endpoint nothing is installed and nothing of OpenTelemetry is even imported:
every helper here first checks one module global and returns at once (a shared
null context manager, an empty string, None), so the off path makes no span
objects and no context lookups (docs/operations.md "Traces" has its cost).

Callers never import OpenTelemetry: they name span kinds with strings and pass
trace context around as W3C ``traceparent`` strings, which is how it travels in
queue entries (storage/redis/queue.py) and is stored on the ``message`` row, so a
provider receipt, which comes back without it, joins its broadcast's trace.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from storage.process.tracing_otel import Active

log = logging.getLogger("koinonia.tracing")

SERVICE_PREFIX = "koinonia-"
SUPPORTED_PROTOCOLS = ("http/protobuf", "grpc")

_active: Active | None = None
"""The installed tracer, or None when tracing is off (the default)."""

_NO_SPAN: AbstractContextManager[None] = contextlib.nullcontext()

Attributes = Mapping[str, str | int | float | bool]


def traces_endpoint(env: Mapping[str, str]) -> str:
    """Where spans go: the traces endpoint as given, or the base endpoint plus
    ``/v1/traces`` (for http/protobuf); empty when tracing is off."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return ""
    if env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return ""
    specific = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    if specific:
        return specific
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    if not base:
        return ""
    if protocol_of(env) == "grpc":
        return base
    return base.rstrip("/") + "/v1/traces"


def protocol_of(env: Mapping[str, str]) -> str:
    return (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "").strip()
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "").strip()
        or "http/protobuf"
    )


def setup(process: str, *, environment: str = "", env: Mapping[str, str] | None = None) -> bool:
    """Install tracing for this process (``web``, ``worker``, ``scheduler``) when an
    OTLP endpoint is configured; returns whether it is on. Idempotent. Raises
    ValueError for a protocol this installation cannot speak."""
    global _active
    if _active is not None:
        return True
    e = os.environ if env is None else env
    endpoint = traces_endpoint(e)
    if not endpoint:
        return False
    protocol = protocol_of(e)
    if protocol not in SUPPORTED_PROTOCOLS:
        raise ValueError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol} is not supported: use http/protobuf"
            " (or grpc with opentelemetry-exporter-otlp-proto-grpc installed)"
        )
    from storage.process.tracing_otel import Active

    _active = Active.install(
        SERVICE_PREFIX + process, endpoint=endpoint, protocol=protocol, environment=environment
    )
    log.info(
        "tracing on",
        extra={"endpoint": endpoint, "protocol": protocol, "service": SERVICE_PREFIX + process},
    )
    return True


def shutdown() -> None:
    """Flush what is buffered and stop exporting (at process exit; idempotent)."""
    global _active
    active, _active = _active, None
    if active is not None:
        active.shutdown()


def enabled() -> bool:
    return _active is not None


def span(
    name: str,
    *,
    parent: str = "",
    kind: str = "internal",
    attributes: Attributes | None = None,
    links: Sequence[object] = (),
) -> AbstractContextManager[Span | None]:
    """A span around a block, current inside it (log lines carry its ids).

    ``parent``: a ``traceparent`` to continue (a queue entry's, a message's); empty
    means the current context. ``kind``: internal, server, client, producer,
    consumer. ``links``: values of ``current_link()``. Off: a shared null context
    that yields None."""
    if _active is None:
        return _NO_SPAN
    return _active.span(name, parent, kind, attributes, links)


def start_span(
    name: str,
    *,
    parent: str = "",
    kind: str = "internal",
    attributes: Attributes | None = None,
    links: Sequence[object] = (),
    start_ns: int | None = None,
) -> Span | None:
    """A span the caller ends itself (``end``), not made current; None when off."""
    if _active is None:
        return None
    return _active.start_span(name, parent, kind, attributes, links, start_ns)


def use(span: Span | None) -> AbstractContextManager[Any]:
    """Make a span from ``start_span`` current in a block (tasks created inside it
    inherit it) without ending it."""
    if span is None or _active is None:
        return _NO_SPAN
    return _active.use(span)


def end(span: Span | None, error: BaseException | None = None) -> None:
    """End a span from ``start_span``, marked failed when ``error`` is given."""
    if span is not None:
        if error is not None:
            span.record_exception(error)
            fail(span, type(error).__name__)
        span.end()


def add_link(span: Span | None, link: object | None) -> None:
    """Link a span to another's context (a value of ``current_link()``)."""
    if span is not None and link is not None and _active is not None:
        _active.add_link(span, link)


def fail(span: Span | None, description: str) -> None:
    """Mark a span's outcome as an error."""
    if span is not None and _active is not None:
        _active.fail(span, description)


def annotate(attributes: Attributes) -> None:
    """Add attributes to the current span (nothing when off or outside a span)."""
    if _active is not None:
        _active.annotate(attributes)


def current_traceparent() -> str:
    """The W3C ``traceparent`` of the current span; empty when off or outside a span."""
    if _active is None:
        return ""
    return _active.current_traceparent()


def current_link() -> object | None:
    """The current span's context, for ``links`` of a span made elsewhere later (a
    receipt applied by another task for this request); None when off."""
    if _active is None:
        return None
    return _active.current_link()


def log_ids() -> tuple[str, str] | None:
    """(trace_id, span_id) in hex of the current span, for log lines; None when off."""
    if _active is None:
        return None
    return _active.log_ids()


def parse_traceparent(value: str) -> tuple[int, int, int] | None:
    """(trace id, span id, flags) of a W3C ``traceparent`` of version 00, or None for
    anything else (an empty string, a malformed or all-zero id)."""
    parts = value.split("-")
    if len(parts) != 4 or parts[0] != "00":
        return None
    _, trace_hex, span_hex, flags_hex = parts
    if len(trace_hex) != 32 or len(span_hex) != 16 or len(flags_hex) != 2:
        return None
    try:
        trace_id, span_id, flags = int(trace_hex, 16), int(span_hex, 16), int(flags_hex, 16)
    except ValueError:
        return None
    if not trace_id or not span_id or not (trace_hex + span_hex + flags_hex).islower():
        return None
    return trace_id, span_id, flags


def format_traceparent(trace_id: int, span_id: int, flags: int) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-{flags:02x}"


@contextlib.contextmanager
def forced(active: Active) -> Iterator[None]:
    """Tests: run a block with ``active`` installed (an in-memory exporter's)."""
    global _active
    previous, _active = _active, active
    try:
        yield
    finally:
        _active = previous
