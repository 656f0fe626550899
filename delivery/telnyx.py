"""Telnyx v2 Messaging adapter: ``POST /v2/messages`` with an Idempotency-Key.

Every text is one HTTP request, so the client's cost per request is the worker's
largest. aiohttp spent 150-190 µs of CPU per send here (py-spy: request and
response objects, header multidicts, timeout handles, payload registry); this
adapter builds each request's bytes itself and sends them over delivery/http11.py's
keep-alive connections, whose answers ``httptools`` parses, and spent 63-70 µs
(6,000 sends to the simulator, 64 in flight, same machine). TLS is asyncio's, for
``https://`` base URLs.

A request that finds its pooled connection closed by the server before any
answer arrived is sent once more on a new connection; that, a timeout (the
send may have happened) and every other retry are safe because the
Idempotency-Key stays the same for every attempt at one recipient.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import httptools
import msgspec

from delivery.http11 import Closed, Http11Client, authority_of, origin_of
from delivery.provider import Lookup, SendRequest, SendResult
from storage.process.metrics import Metrics

if TYPE_CHECKING:
    from prometheus_client import Histogram


class _Error(msgspec.Struct):
    code: str | int | None = None
    title: str | None = None


class _Data(msgspec.Struct):
    id: str


class _Ok(msgspec.Struct):
    data: _Data


class _Errors(msgspec.Struct):
    errors: list[_Error] = []


class _Party(msgspec.Struct):
    status: str | None = None


class _Found(msgspec.Struct):
    to: list[_Party] = []
    errors: list[_Error] = []


class _FoundAnswer(msgspec.Struct):
    data: _Found


_ok_decoder = msgspec.json.Decoder(_Ok)
_found_decoder = msgspec.json.Decoder(_FoundAnswer)
_errors_decoder = msgspec.json.Decoder(_Errors)
_encoder = msgspec.json.Encoder()

PATH = "/v2/messages"


class TelnyxProvider:
    """A pool of keep-alive connections; ``concurrency`` sends in flight at most."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout_s: float = 10.0,
        concurrency: int = 64,
        metrics: Metrics | None = None,
    ) -> None:
        url = urlsplit(base_url.rstrip("/"))
        self._origin = origin_of(base_url)
        self._path = (url.path or "") + PATH
        authority = authority_of(self._origin)
        self._head = (
            f"POST {self._path} HTTP/1.1\r\nHost: {authority}\r\n"
            f"Authorization: Bearer {api_key}\r\nContent-Type: application/json\r\n"
            "Accept: application/json\r\n"
        ).encode("latin-1")
        self._lookup_head = (
            f"Host: {authority}\r\nAuthorization: Bearer {api_key}\r\n"
            "Accept: application/json\r\n\r\n"
        ).encode("latin-1")
        self._timeout_s = timeout_s
        self._slots = asyncio.Semaphore(concurrency)
        self._http = Http11Client(
            timeout_s=timeout_s, idle_per_origin=concurrency, keep_headers=True
        )
        # koinonia_provider_request_duration_seconds, bound once: (ok, error) per operation.
        self._timed: dict[str, tuple[Histogram, Histogram]] | None = None
        if metrics is not None:
            duration = metrics.provider_duration
            self._timed = {
                op: (duration.labels(op, "ok"), duration.labels(op, "error"))
                for op in ("send", "lookup")
            }

    async def aclose(self) -> None:
        await self._http.aclose()

    async def send(self, batch: list[SendRequest]) -> list[SendResult]:
        if len(batch) == 1:
            return [await self._send_one(batch[0])]
        return list(await asyncio.gather(*(self._send_one(r) for r in batch)))

    async def lookup(self, provider_message_id: str) -> Lookup | None:
        """``GET /v2/messages/{id}``: the recipient's status as Telnyx reports it now."""
        if not provider_message_id.replace("-", "").isalnum():
            return None
        raw = (
            f"GET {self._path}/{provider_message_id} HTTP/1.1\r\n".encode("latin-1")
            + self._lookup_head
        )
        async with self._slots:
            started = time.perf_counter()
            try:
                async with asyncio.timeout(self._timeout_s):
                    answer = await self._http.exchange(self._origin, raw)
            except (TimeoutError, OSError, Closed, httptools.HttpParserError):
                self._time("lookup", started, 0)
                return None
        self._time("lookup", started, answer.status)
        if answer.status != 200:
            return None
        try:
            found = _found_decoder.decode(answer.body).data
        except msgspec.DecodeError:
            return None
        if not found.to or not found.to[0].status:
            return None
        code = found.errors[0].code if found.errors else None
        return Lookup(status=found.to[0].status, error_code=None if code is None else str(code))

    def _request(self, request: SendRequest) -> bytes:
        body: dict[str, object] = {
            "from": request.from_number,
            "to": request.to,
            "text": request.text,
        }
        if request.media_urls:
            body["media_urls"] = request.media_urls
            if not request.text:
                # Telnyx wants a text to be non-empty when given; an MMS may have none.
                del body["text"]
        if request.webhook_url:
            body["webhook_url"] = request.webhook_url
            body["use_profile_webhooks"] = False
        payload = _encoder.encode(body)
        return b"".join(
            (
                self._head,
                b"Idempotency-Key: ",
                request.idempotency_key.encode("latin-1"),
                b"\r\nContent-Length: ",
                str(len(payload)).encode(),
                b"\r\n\r\n",
                payload,
            )
        )

    async def _send_one(self, request: SendRequest) -> SendResult:
        raw = self._request(request)
        async with self._slots:
            started = time.perf_counter()
            try:
                async with asyncio.timeout(self._timeout_s):
                    answer = await self._http.exchange(self._origin, raw)
            except TimeoutError:
                self._time("send", started, 0)
                # The send may have happened; the idempotency key makes the retry safe.
                return SendResult(ok=False, retryable=True, unavailable=True, error_code="timeout")
            except (OSError, Closed, httptools.HttpParserError):
                self._time("send", started, 0)
                return SendResult(
                    ok=False, retryable=True, unavailable=True, error_code="connection_error"
                )
        self._time("send", started, answer.status)
        return interpret(answer.status, answer.body, answer.headers)

    def _time(self, operation: str, started: float, status: int) -> None:
        """Observe one request's duration: ok for a 2xx answer, error otherwise."""
        if self._timed is not None:
            ok, error = self._timed[operation]
            (ok if 200 <= status < 300 else error).observe(time.perf_counter() - started)


def interpret(status: int, content: bytes, headers: Mapping[str, str]) -> SendResult:
    """A SendResult for one Telnyx answer (pure; tested on its own)."""
    if 200 <= status < 300:
        try:
            return SendResult(ok=True, provider_message_id=_ok_decoder.decode(content).data.id)
        except msgspec.DecodeError:
            return SendResult(ok=False, retryable=True, error_code="bad_response")
    code = _first_code(content) or f"http_{status}"
    if status == 429:
        return SendResult(
            ok=False,
            retryable=True,
            throttled=True,
            error_code=code,
            retry_after_s=_retry_after(headers),
        )
    if status >= 500 or status == 408:
        return SendResult(
            ok=False,
            retryable=True,
            unavailable=True,
            error_code=code,
            retry_after_s=_retry_after(headers),
        )
    return SendResult(ok=False, retryable=False, error_code=code)


def _first_code(content: bytes) -> str | None:
    try:
        errors = _errors_decoder.decode(content).errors
    except msgspec.DecodeError:
        return None
    if errors and errors[0].code is not None:
        return str(errors[0].code)
    return None


def _retry_after(headers: Mapping[str, str]) -> float | None:
    raw = headers.get("retry-after") or headers.get("Retry-After")
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        return None
