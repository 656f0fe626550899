"""A lean HTTP/1.1 client for the simulator's webhooks: keep-alive connections per origin.

The simulator posts two signed webhooks per text, so its client's cost per request
is paid twice per recipient. py-spy under bench/pipeline.py showed aiohttp's client
as a third of the simulator's CPU (request and response objects, header multidicts,
URL objects, timeout handles); this client writes the request bytes itself and lets
``httptools`` (installed with uvicorn) parse the answer, as the worker's Telnyx
adapter does (delivery/telnyx.py). It speaks what a webhook needs: one request at a
time per connection, ``Content-Length`` or chunked answers, keep-alive unless the
server says ``Connection: close``, TLS for ``https://`` URLs. A pooled connection
the server closed before answering gets the request once more on a new one (a
webhook redelivered is what the receiver dedupes anyway). No redirects: Telnyx
does not follow them either, a 3xx is a failed attempt.
"""

from __future__ import annotations

import asyncio
import ssl
from urllib.parse import urlsplit

import httptools


class Closed(Exception):
    """The connection closed before a whole answer arrived."""

    def __init__(self, answered: bool) -> None:
        super().__init__("connection closed before the answer")
        self.answered = answered
        """Some of the answer had arrived (so the request was surely received)."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection: one request at a time, its answer's status and body."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.closed = False
        self._body: list[bytes] = []
        self._started = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._started = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(exc)
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(Closed(self._started))

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        answer = (self.parser.get_status_code(), b"".join(self._body))
        if not self.parser.should_keep_alive():
            self.close()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(answer)

    def _fail(self, exc: Exception) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    def send(self, request: bytes) -> asyncio.Future[tuple[int, bytes]]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self._body, self._started = [], False
        self.transport.write(request)
        return self.waiter

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


Origin = tuple[str, str, int]
"""(scheme, host, port)."""


class Http11Client:
    """Keep-alive connections per origin; at most ``idle_per_origin`` kept idle each.

    Concurrency is the caller's (the simulator's fixed pool of senders): every request
    in flight holds its own connection."""

    def __init__(
        self, *, timeout_s: float, connect_timeout_s: float = 5.0, idle_per_origin: int = 128
    ) -> None:
        self._timeout_s = timeout_s
        self._connect_timeout_s = min(connect_timeout_s, timeout_s)
        self._idle_per_origin = idle_per_origin
        self._idle: dict[Origin, list[_Connection]] = {}
        self._ssl: ssl.SSLContext | None = None
        self._closing = False

    async def aclose(self) -> None:
        self._closing = True  # connections of requests still in flight close after them
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()

    async def post(
        self, url: str, body: bytes, headers: list[tuple[str, str]]
    ) -> tuple[int, bytes]:
        """POST ``body`` to ``url``: the answer's status and body. Raises ``OSError``,
        ``Closed``, ``httptools.HttpParserError``, ``TimeoutError`` (all within
        ``timeout_s``) or ``ValueError`` (a URL that is not http(s))."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url[:200]!r}")
        tls = scheme == "https"
        port = parts.port or (443 if tls else 80)
        host = parts.hostname
        shown = f"[{host}]" if ":" in host else host
        authority = shown if port == (443 if tls else 80) else f"{shown}:{port}"
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        head = [f"POST {target} HTTP/1.1\r\nHost: {authority}\r\n"]
        head += [f"{name}: {value}\r\n" for name, value in headers]
        head.append(f"Content-Length: {len(body)}\r\n\r\n")
        request = "".join(head).encode("latin-1") + body
        async with asyncio.timeout(self._timeout_s):
            return await self._exchange((scheme, host, port), request)

    async def _exchange(self, origin: Origin, request: bytes) -> tuple[int, bytes]:
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            if conn.closed:
                continue
            try:
                return await self._on(origin, conn, request)
            except Closed as exc:
                if exc.answered:
                    raise
            # Closed unanswered (the peer dropped an idle connection): once more, on
            # a new connection; never over the other idle ones, which would resend
            # to a peer that takes requests and then drops connections.
            break
        return await self._on(origin, await self._connect(origin), request)

    async def _on(self, origin: Origin, conn: _Connection, request: bytes) -> tuple[int, bytes]:
        try:
            answer = await conn.send(request)
        except BaseException:
            conn.close()
            raise
        if self._closing:
            conn.close()
        elif not conn.closed:
            idle = self._idle.setdefault(origin, [])
            if len(idle) < self._idle_per_origin:
                idle.append(conn)
            else:
                conn.close()
        return answer

    async def _connect(self, origin: Origin) -> _Connection:
        scheme, host, port = origin
        context: ssl.SSLContext | None = None
        if scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            context = self._ssl
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self._connect_timeout_s):
            if context is None:
                _, conn = await loop.create_connection(_Connection, host, port)
            else:
                _, conn = await loop.create_connection(
                    _Connection, host, port, ssl=context, server_hostname=host
                )
        return conn
