"""A lean HTTP/1.1 client: keep-alive connections per origin, answers parsed by httptools.

The worker's Telnyx adapter (delivery/telnyx.py) sends every text through it, and
the simulator posts its two signed webhooks per text with it, so its cost per
request is paid three times per recipient. aiohttp's client spent 150-190 µs of
CPU per send in the worker and a third of the simulator's CPU (py-spy: request and
response objects, header multidicts, URL objects, timeout handles); this client
writes the request bytes itself (callers may build them once, ``exchange``) and
lets ``httptools`` (installed with uvicorn) parse the answer. It speaks what those
need: one request at a time per connection, ``Content-Length`` or chunked answers,
keep-alive unless the server says ``Connection: close``, TLS for ``https://``.

A pooled connection the server closed before any answer arrived gets the request
once more, on a new connection (never over the other idle ones, which would resend
to a peer that takes requests and then drops connections). That is safe for both
callers: Telnyx sends carry an Idempotency-Key, and a webhook redelivered is what
the receiver dedupes anyway. No redirects: Telnyx does not follow them either, a
3xx is a failed attempt.
"""

from __future__ import annotations

import asyncio
import ssl
from urllib.parse import urlsplit

import httptools
import msgspec


class Closed(Exception):
    """The connection closed before a whole answer arrived."""

    def __init__(self, answered: bool) -> None:
        super().__init__("connection closed before the answer")
        self.answered = answered
        """Some of the answer had arrived (so the request was surely received)."""


class Answer(msgspec.Struct, gc=False):
    status: int
    body: bytes
    headers: dict[str, str]
    """Lower-cased names; empty unless the client keeps headers."""


_NO_HEADERS: dict[str, str] = {}


class _Connection(asyncio.Protocol):
    """One keep-alive connection: one request at a time, its answer."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[Answer] | None = None
        self.closed = False
        self._headers = _NO_HEADERS
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
        answer = Answer(self.parser.get_status_code(), b"".join(self._body), self._headers)
        if not self.parser.should_keep_alive():
            self.close()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(answer)

    def _fail(self, exc: Exception) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    def send(self, request: bytes) -> asyncio.Future[Answer]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self._body, self._started = [], False
        self.transport.write(request)
        return self.waiter

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class _HeadedConnection(_Connection):
    """The same, keeping the answer's headers (httptools calls ``on_header`` only on
    a protocol that has it, so a client without headers pays nothing for them)."""

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def send(self, request: bytes) -> asyncio.Future[Answer]:
        self._headers = {}
        return super().send(request)


Origin = tuple[str, str, int]
"""(scheme, host, port)."""


def origin_of(url: str) -> Origin:
    """A URL's origin; ValueError when it is not http(s)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url[:200]!r}")
    return scheme, parts.hostname, parts.port or (443 if scheme == "https" else 80)


def authority_of(origin: Origin) -> str:
    """The ``Host`` header of an origin: no port when it is the scheme's default."""
    scheme, host, port = origin
    shown = f"[{host}]" if ":" in host else host
    return shown if port == (443 if scheme == "https" else 80) else f"{shown}:{port}"


class Http11Client:
    """Keep-alive connections per origin; at most ``idle_per_origin`` kept idle each.

    Concurrency is the caller's (the simulator's fixed pool of senders): every request
    in flight holds its own connection."""

    def __init__(
        self,
        *,
        timeout_s: float,
        connect_timeout_s: float = 5.0,
        idle_per_origin: int = 128,
        keep_headers: bool = False,
    ) -> None:
        self._timeout_s = timeout_s
        self._connect_timeout_s = min(connect_timeout_s, timeout_s)
        self._idle_per_origin = idle_per_origin
        self._protocol = _HeadedConnection if keep_headers else _Connection
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
        origin = origin_of(url)
        parts = urlsplit(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        head = [f"POST {target} HTTP/1.1\r\nHost: {authority_of(origin)}\r\n"]
        head += [f"{name}: {value}\r\n" for name, value in headers]
        head.append(f"Content-Length: {len(body)}\r\n\r\n")
        request = "".join(head).encode("latin-1") + body
        async with asyncio.timeout(self._timeout_s):
            answer = await self.exchange(origin, request)
        return answer.status, answer.body

    async def exchange(self, origin: Origin, request: bytes) -> Answer:
        """One request, whole on the wire as given (``Host`` and framing included), and
        its answer; the caller bounds the time. Raises ``OSError``, ``Closed``,
        ``httptools.HttpParserError`` or ``TimeoutError`` (connecting)."""
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

    async def _on(self, origin: Origin, conn: _Connection, request: bytes) -> Answer:
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
                _, conn = await loop.create_connection(self._protocol, host, port)
            else:
                _, conn = await loop.create_connection(
                    self._protocol, host, port, ssl=context, server_hostname=host
                )
        return conn
