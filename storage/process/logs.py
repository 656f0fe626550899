"""Structured JSON logs, one object per line, carrying the request id.

Inside an HTTP request a line carries ``request_id``; inside a job (a worker's
queue entry, a scheduler job, a webhook delivery) the job's ids, set with
``log_context``; with tracing on (storage/process/tracing.py), ``trace_id`` and
``span_id`` of the current span.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any

import msgspec

from storage.domain.envelope import request_id_var
from storage.process import tracing

_RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}
_encoder = msgspec.json.Encoder()

log_fields_var: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar(
    "log_fields", default=None
)
"""The ids of the job this task is doing (``message_id``, ``church_id``, ``batch``, ...)."""


@contextlib.contextmanager
def log_context(**fields: str) -> Iterator[None]:
    """Every log line inside the block carries ``fields`` (added to any outer ones)."""
    outer = log_fields_var.get()
    token = log_fields_var.set({**outer, **fields} if outer else fields)
    try:
        yield
    finally:
        log_fields_var.reset(token)


class JsonFormatter(logging.Formatter):
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
        fields = log_fields_var.get()
        if fields:
            entry.update(fields)
        ids = tracing.log_ids()
        if ids is not None:
            entry["trace_id"], entry["span_id"] = ids
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return _encoder.encode(entry).decode()


def configure_logging(level: str = "INFO", *, process: str = "koinonia") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(process))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("uvicorn.access").disabled = True
