"""The on path of storage/process/tracing.py: imported only when tracing is set up.

Everything that touches OpenTelemetry lives here, so a process with tracing off
never imports it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)

from storage.process.tracing import format_traceparent, parse_traceparent

_KINDS = {
    "internal": SpanKind.INTERNAL,
    "server": SpanKind.SERVER,
    "client": SpanKind.CLIENT,
    "producer": SpanKind.PRODUCER,
    "consumer": SpanKind.CONSUMER,
}
MAX_LINKS = 32
"""Links per span at most (a receipt round links the webhook requests it answers)."""


def exporter_for(endpoint: str, protocol: str) -> SpanExporter:
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[import-not-found,unused-ignore]
                OTLPSpanExporter as GrpcExporter,
            )
        except ImportError as exc:
            raise ValueError(
                "OTEL_EXPORTER_OTLP_PROTOCOL=grpc needs opentelemetry-exporter-otlp-proto-grpc,"
                " which is not installed: use http/protobuf"
            ) from exc
        exporter: SpanExporter = GrpcExporter(endpoint=endpoint)
        return exporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=endpoint)


def context_of(traceparent: str) -> Context | None:
    """The remote parent a ``traceparent`` names, or None."""
    parsed = parse_traceparent(traceparent)
    if parsed is None:
        return None
    trace_id, span_id, flags = parsed
    remote = SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags & 0x01))
    return trace.set_span_in_context(NonRecordingSpan(remote))


class Active:
    """An installed tracer provider and the tracer every span of the process uses."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("koinonia")

    @classmethod
    def install(
        cls, service: str, *, endpoint: str, protocol: str, environment: str = ""
    ) -> Active:
        """The process's global tracer provider, exporting in batches over OTLP."""
        return cls.with_processor(
            service, BatchSpanProcessor(exporter_for(endpoint, protocol)), environment, True
        )

    @classmethod
    def with_processor(
        cls, service: str, processor: SpanProcessor, environment: str = "", install: bool = False
    ) -> Active:
        """Tests pass a SimpleSpanProcessor over an in-memory exporter (not installed
        globally)."""
        # OTEL_RESOURCE_ATTRIBUTES are kept; service.name is always the process type's,
        # so web, worker and scheduler are told apart whatever OTEL_SERVICE_NAME says.
        fixed: dict[str, str] = {"service.name": service, "service.namespace": "koinonia"}
        if environment:
            fixed["deployment.environment.name"] = environment
        resource = Resource.create().merge(Resource(fixed))
        provider = TracerProvider(resource=resource)
        provider.add_span_processor(processor)
        if install:
            trace.set_tracer_provider(provider)
        return cls(provider)

    def shutdown(self) -> None:
        self.provider.shutdown()

    def _context(self, parent: str) -> Context | None:
        return context_of(parent) if parent else None

    def span(
        self,
        name: str,
        parent: str,
        kind: str,
        attributes: Mapping[str, Any] | None,
        links: Sequence[object],
    ) -> AbstractContextManager[Span]:
        return self.tracer.start_as_current_span(
            name,
            context=self._context(parent),
            kind=_KINDS[kind],
            attributes=attributes,
            links=_links(links),
        )

    def start_span(
        self,
        name: str,
        parent: str,
        kind: str,
        attributes: Mapping[str, Any] | None,
        links: Sequence[object],
        start_ns: int | None,
    ) -> Span:
        return self.tracer.start_span(
            name,
            context=self._context(parent),
            kind=_KINDS[kind],
            attributes=attributes,
            links=_links(links),
            start_time=start_ns,
        )

    def use(self, span: Span) -> AbstractContextManager[Any]:
        return trace.use_span(span, end_on_exit=False)

    def add_link(self, span: Span, link: object) -> None:
        if isinstance(link, SpanContext):
            span.add_link(link)

    def fail(self, span: Span, description: str) -> None:
        span.set_status(Status(StatusCode.ERROR, description))

    def annotate(self, attributes: Mapping[str, Any]) -> None:
        current = trace.get_current_span()
        if current.is_recording():
            current.set_attributes(attributes)

    def current_traceparent(self) -> str:
        found = trace.get_current_span().get_span_context()
        if not found.is_valid:
            return ""
        return format_traceparent(found.trace_id, found.span_id, int(found.trace_flags))

    def current_link(self) -> object | None:
        found = trace.get_current_span().get_span_context()
        return found if found.is_valid else None

    def log_ids(self) -> tuple[str, str] | None:
        found = trace.get_current_span().get_span_context()
        if not found.is_valid:
            return None
        return f"{found.trace_id:032x}", f"{found.span_id:016x}"


def _links(values: Sequence[object]) -> list[Link] | None:
    if not values:
        return None
    return [Link(v) for v in values[:MAX_LINKS] if isinstance(v, SpanContext)]
