"""One webhook attempt over HTTP: sign, POST, measure, keep the first KiB of the answer.

Destinations are checked where the connection is made: a literal address in the
URL before the request, and every address a name resolves to inside the
connector's resolver, so the address that was checked is the one connected to
(a name that re-resolves to a private address between save and send is still
refused). Redirects are not followed: a 3xx is a failed attempt.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from delivery.webhook_signatures import signed_headers
from storage.pg.webhook_endpoints import is_public_address
from storage.pg.webhook_outbox import DueDelivery, Outcome, event_id_text
from storage.process.settings import WebhookSettings

EXCERPT_BYTES = 1024


class DestinationRefused(OSError):
    """The endpoint's address is private, loopback or link-local, and that is not allowed."""


class PublicOnlyResolver(AbstractResolver):
    """Resolves with the default resolver and keeps only public addresses."""

    def __init__(self, inner: AbstractResolver) -> None:
        self._inner = inner

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        public = [r for r in found if is_public_address(ipaddress.ip_address(r["host"]))]
        if not public:
            raise DestinationRefused(f"{host} resolves only to non-public addresses")
        return public

    async def close(self) -> None:
        await self._inner.close()


def open_session(settings: WebhookSettings) -> aiohttp.ClientSession:
    """One pooled client per worker (keep-alive to each endpoint, bounded per host)."""
    inner: AbstractResolver = DefaultResolver()
    connector = aiohttp.TCPConnector(
        limit=settings.concurrency,
        limit_per_host=settings.per_endpoint_concurrency,
        resolver=inner if settings.allow_private_destinations else PublicOnlyResolver(inner),
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=settings.timeout_s),
        trust_env=False,
        auto_decompress=True,
    )


def literal_problem(url: str, allow_private: bool) -> str | None:
    """A literal non-public address never reaches the resolver: refuse it here."""
    if allow_private:
        return None
    host = (urlsplit(url).hostname or "").rstrip(".")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if is_public_address(address):
        return None
    return f"destination refused: {host} is not a public address"


async def attempt(
    session: aiohttp.ClientSession, due: DueDelivery, settings: WebhookSettings
) -> Outcome:
    problem = literal_problem(due.url, settings.allow_private_destinations)
    if problem is not None:
        return Outcome(status_code=None, latency_ms=0, error=problem)
    body = due.body()
    headers = signed_headers(event_id_text(due.event_id), int(time.time()), body, due.secrets)
    started = time.perf_counter()
    status: int | None = None
    excerpt: str | None = None
    error: str | None = None
    try:
        async with session.post(
            due.url, data=body, headers=headers, allow_redirects=False
        ) as response:
            status = response.status
            excerpt = _text(await _head(response.content, EXCERPT_BYTES))
    except TimeoutError:
        error = f"no answer within {settings.timeout_s:g} s"
    except Exception as exc:  # ClientError, and anything a strange URL or peer causes
        error = _describe(exc)
    latency_ms = round((time.perf_counter() - started) * 1000)
    return Outcome(status_code=status, latency_ms=latency_ms, response_excerpt=excerpt, error=error)


async def _head(stream: aiohttp.StreamReader, limit: int) -> bytes:
    data = b""
    while len(data) < limit:
        chunk = await stream.read(limit - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _text(raw: bytes) -> str:
    # Postgres text holds no NUL characters.
    return raw.decode("utf-8", errors="replace").replace("\x00", "")[:EXCERPT_BYTES]


def _describe(exc: BaseException) -> str:
    cause: BaseException | None = exc
    for _ in range(5):
        if cause is None:
            break
        if isinstance(cause, DestinationRefused):
            return f"destination refused: {cause}"
        cause = cause.__cause__ or getattr(cause, "os_error", None)
    text = str(exc) or type(exc).__name__
    return text.replace("\x00", "")[:500]
