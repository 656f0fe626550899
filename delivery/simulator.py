"""A Telnyx v2 Messaging simulator for development, tests and benchmarks.

It speaks Telnyx's wire format so the real Telnyx adapter runs against it
unchanged, and keeps all its state in process memory (never the app's Redis):

- ``POST /v2/messages``: Bearer-authenticated send, answered as Telnyx does;
  honours ``Idempotency-Key`` (24 h, byte-for-byte body match, only successful
  answers replayed); then ``message.sent`` and ``message.finalized`` webhooks,
  signed with Ed25519 like Telnyx's, to the send's ``webhook_url`` or the
  configured default.
- ``media_urls`` on a send are fetched as a carrier does, before the answer (Telnyx
  "fetches the media at send time"): GET, at most 1 MiB each, within 5 s, redirects
  followed (``delivery.simulator_webhooks.fetch_media``). A file that cannot be
  fetched (an error status, a timeout, an empty or oversized body) does not refuse
  the send: Telnyx documents an unreachable media URL as "MMS sent but recipient
  receives SMS only", so the send is accepted and goes out, its outcome unchanged,
  and the file shows as ``size: null`` (and ``media_sizes[i]: null`` below).
  Fetched files carry ``content_type`` (as declared; sniffed from the bytes when
  declared as ``application/octet-stream`` or not at all, as Telnyx does),
  ``sha256`` and ``size`` in the ``message.sent`` / ``message.finalized`` payloads
  and ``GET /v2/messages/{id}``; the send's own answer, rebuilt byte for byte on an
  idempotent replay, lists the URLs only.
- ``GET /_sim/messages?to=<E.164>``: every send accepted for that destination (SMS
  and MMS, replays not repeated), oldest first, as
  ``[{"from","to","text","media_urls","media_sizes"}]``; the newest 50 per destination.
- ``POST /_sim/inbound``: a member's reply, delivered as a signed
  ``message.received`` webhook; STOP / START keywords block and unblock later
  sends between the two numbers (Telnyx error 40300). With ``"media":
  [{"content_type","data_base64"}]`` it is an MMS: the simulator serves each file
  at ``GET /_sim/media/{token}`` for an hour (then 404, as a provider's links
  expire) and the payload lists ``media: [{"url","content_type","size",
  "hash_sha256"}]`` with ``type: "MMS"``.
- ``GET /_sim/stats``, ``POST /_sim/reset``, ``GET|POST /_sim/config``,
  ``GET /_sim/public-key``: the control API the tests and benchmarks drive.

The rules live in ``delivery.simulator_state`` (no I/O) and webhook delivery in
``delivery.simulator_webhooks``; this module is the HTTP edge that turns their
errors into Telnyx error responses.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import aiohttp
import anyio
import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from delivery.http11 import Http11Client
from delivery.simulator_state import (
    IDEMPOTENCY_KEY,
    AcceptedSend,
    ConfigPatch,
    SentMessage,
    SimulatorState,
    StoredSend,
)
from delivery.simulator_webhooks import (
    Signer,
    WebhookDispatcher,
    WebhookJob,
    decode_seed,
    fetch_media,
)
from delivery.simulator_wire import (
    MAX_INBOUND_FILE_BYTES,
    MAX_MEDIA_URLS,
    ErrorBody,
    EventPlan,
    InboundRequest,
    Media,
    Message,
    MessageResponse,
    SendRequest,
    SimulatorError,
    error,
    inbound_message,
    is_e164,
    outbound_message,
    validate_inbound,
    validate_send,
)
from storage.process.settings import SimulatorSettings

__all__ = ["create_simulator_app", "new_signing_seed", "public_key_b64"]

logger = logging.getLogger("koinonia.delivery.simulator")

_encoder: Final = msgspec.json.Encoder()
_send_decoder: Final = msgspec.json.Decoder(SendRequest)
_inbound_decoder: Final = msgspec.json.Decoder(InboundRequest)
_patch_decoder: Final = msgspec.json.Decoder(ConfigPatch)

# Webhook delivery: one keep-alive client (at most WEBHOOK_CONNECTIONS idle connections per
# receiver) shared by a fixed pool of senders; each sender has one webhook in flight, so this
# is the concurrency a receiver sees, like Telnyx delivering to one endpoint from many workers.
WEBHOOK_SENDERS: Final = 96
WEBHOOK_CONNECTIONS: Final = 128
WEBHOOK_TIMEOUT_S: Final = 10.0
# On shutdown, queued webhooks get this long to go out; the rest are kept in the state file.
SHUTDOWN_DRAIN_S: Final = 5.0
# The body of /_sim/inbound: ten of the largest files a member may send, in base64.
MAX_INBOUND_BODY_BYTES: Final = MAX_MEDIA_URLS * (MAX_INBOUND_FILE_BYTES * 4 // 3 + 1024) + 65_536


def new_signing_seed() -> str:
    """A fresh Ed25519 signing seed: base64 of 32 random bytes."""
    return base64.b64encode(secrets.token_bytes(32)).decode()


def public_key_b64(seed_b64: str) -> str:
    """The base64 raw 32-byte Ed25519 public key for a base64 32-byte seed (what the app
    needs as ``KOINONIA_PROVIDER_PUBLIC_KEY`` to verify the simulator's webhooks)."""
    return Signer(decode_seed(seed_b64)).public_key_b64


class KeptState(msgspec.Struct, frozen=True):
    """What a stopping simulator keeps for the next start (KOINONIA_SIM_STATE_FILE)."""

    pending: list[WebhookJob]
    sent: list[SentMessage]


_state_encoder: Final = msgspec.msgpack.Encoder()
_state_decoder: Final = msgspec.msgpack.Decoder(KeptState)


class StatsBody(msgspec.Struct, frozen=True):
    total: int
    by_destination: dict[str, int]
    webhooks_sent: int
    webhooks_failed: int
    webhooks_pending: int


class PublicKeyBody(msgspec.Struct, frozen=True):
    public_key: str


class InboundIds(msgspec.Struct, frozen=True):
    id: str
    event_id: str


class InboundAccepted(msgspec.Struct, frozen=True):
    data: InboundIds


class ResetBody(msgspec.Struct, frozen=True):
    reset: bool = True


async def _read_capped(request: Request, limit: int) -> bytes | None:
    """The request body, or None once it passes ``limit`` bytes (read no further)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


def _json(body: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(_encoder.encode(body), status, headers, media_type="application/json")


def _error_response(exc: SimulatorError, headers: dict[str, str] | None = None) -> Response:
    return _json(ErrorBody(exc.errors), exc.status, {**exc.headers, **(headers or {})})


def _decode_error(exc: msgspec.DecodeError) -> SimulatorError:
    """Telnyx's answer to a body msgspec could not read: 400 when it is not JSON at all,
    422 (with a JSON pointer to the field, when known) when a field is wrong."""
    if not isinstance(exc, msgspec.ValidationError):
        return error(
            400, "10015", "Bad Request", "The request failed because it was not well-formed."
        )
    message = str(exc)
    pointer = None
    if " - at `$" in message:
        path = message.rsplit(" - at `$", 1)[1].rstrip("`")
        pointer = path.replace("[", ".").replace("]", "").replace(".", "/") or "/"
    return error(422, "10015", "Bad Request", message, pointer)


class _Validated(msgspec.Struct, frozen=True, kw_only=True):
    """A send that passed validation, not yet committed."""

    req: SendRequest
    sender: str
    to: str
    text: str
    webhook_url: str | None
    key: str | None
    fingerprint: bytes


class Simulator:
    """The routes, bound to one state and one dispatcher."""

    def __init__(self, settings: SimulatorSettings) -> None:
        self.settings = settings
        self.signer = Signer(decode_seed(settings.signing_seed or new_signing_seed()))
        self.state = SimulatorState()
        self.dispatcher = WebhookDispatcher(self.signer, self.state.stats, workers=WEBHOOK_SENDERS)
        # The lifespan's aiohttp session, for media fetches (webhooks: delivery/http11.py).
        self._session: aiohttp.ClientSession | None = None

    def _authorized(self, request: Request) -> bool:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return False
        expected = self.settings.api_key
        return not expected or hmac.compare_digest(token.encode(), expected.encode())

    def _message(self, send: _Validated, message_id: uuid.UUID, received_at_ms: int) -> Message:
        return outbound_message(
            send.req,
            send.sender,
            send.to,
            send.text,
            send.webhook_url,
            self.state.identity,
            message_id,
            received_at_ms,
        )

    def _check_repeat(self, send: _Validated) -> Response | None:
        """The answer for a send that must not go out: an idempotent replay, a reused key,
        or a STOP block. Synchronous, so check-then-commit cannot interleave."""
        key = send.key
        if key is not None and (stored := self.state.idempotency.lookup(key, time.monotonic())):
            if hmac.compare_digest(stored.fingerprint, send.fingerprint):
                message_id = uuid.UUID(bytes=stored.message_id)
                return _json(
                    MessageResponse(self._message(send, message_id, stored.received_at_ms))
                )
            return _error_response(
                error(
                    422,
                    "10015",
                    "Bad Request",
                    f"Idempotency-Key '{key}' was already used with a different request body.",
                )
            )
        if self.state.is_blocked(send.sender, send.to):
            return _error_response(
                error(
                    400,
                    "40300",
                    "Blocked due to STOP message",
                    "Messages cannot be sent due to an existing block rule.",
                    "/to",
                )
            )
        return None

    def _admit(self, request: Request) -> tuple[Response | None, dict[str, str]]:
        """The refusal, if any, that comes before a send is even read (credentials, outage,
        rate limit), and the rate-limit headers every answer then carries."""
        if not self._authorized(request):
            failure = error(
                401,
                "10009",
                "Authentication failed",
                "The required authentication headers were either invalid or not included "
                "in the request.",
            )
            return _error_response(failure), {}
        if self.state.config.outage:
            failure = error(
                503,
                "10007",
                "Unexpected error",
                "The service is temporarily unavailable; please retry later.",
            )
            return _error_response(failure, {"Retry-After": "1"}), {}
        rate = self.state.admit(time.monotonic())
        if rate is None:
            return None, {}
        if not rate.allowed:
            failure = error(
                429,
                "10011",
                "Too many requests",
                "You have exceeded the maximum number of allowed requests.",
            )
            return _error_response(failure, rate.headers()), {}
        return None, rate.headers()

    async def send_message(self, request: Request) -> Response:
        refusal, rate_headers = self._admit(request)
        if refusal is not None:
            return refusal
        state = self.state
        raw = await request.body()
        key = request.headers.get("idempotency-key")
        try:
            if key is not None and not IDEMPOTENCY_KEY.fullmatch(key):
                raise error(
                    400,
                    "10015",
                    "Bad Request",
                    "Idempotency-Key must be 1 to 255 letters, digits, '-', '_' or ':'.",
                )
            try:
                req = _send_decoder.decode(raw)
            except msgspec.DecodeError as exc:
                raise _decode_error(exc) from exc
            sender, to, text = validate_send(req)
        except SimulatorError as exc:
            return _error_response(exc, rate_headers)

        send = _Validated(
            req=req,
            sender=sender,
            to=to,
            text=text,
            webhook_url=req.webhook_url or self.settings.default_webhook_url or None,
            key=key,
            fingerprint=hashlib.blake2b(raw, digest_size=16).digest(),
        )
        if (answer := self._check_repeat(send)) is not None:
            answer.headers.update(rate_headers)
            return answer
        # Before the last repeat check: fetching waits, and a retry with the same key
        # may commit meanwhile.
        media = await self._fetch_media(req.media_urls)
        if send.webhook_url:
            # Waiting for room in the webhook queue is the simulator's backpressure; another
            # request with the same key may have committed meanwhile, so check again after.
            await self.dispatcher.reserve()
            if (answer := self._check_repeat(send)) is not None:
                self.dispatcher.release()
                answer.headers.update(rate_headers)
                return answer

        message_id, received_at_ms = uuid.uuid4(), time.time_ns() // 1_000_000
        message = self._message(send, message_id, received_at_ms)
        if key is not None:
            stored = StoredSend(
                send.fingerprint, message_id.bytes, received_at_ms, time.monotonic()
            )
            state.idempotency.remember(key, stored)
        state.stats.count_send(to)
        sizes = tuple(m.size for m in media)
        state.accepted.remember(AcceptedSend(send.sender, to, text, req.media_urls, sizes))
        # What the carrier fetched shows from the first receipt on; the answer itself
        # lists the URLs only, as its idempotent replay will.
        fetched = msgspec.structs.replace(message, media=media) if media else message
        plans, latency = state.plan(), state.latency_s()
        final = next(p.status for p in plans if p.event_type == "message.finalized")
        state.sent.remember(SentMessage(fetched, final, time.time() + latency))
        if send.webhook_url and state.rng.random() < state.config.drop_webhooks:
            self.dispatcher.release()  # the callbacks are lost; the lookup still knows
        elif send.webhook_url:
            job = WebhookJob(fetched, plans, send.webhook_url, req.webhook_failover_url)
            self.dispatcher.submit(job, latency)
        return _json(MessageResponse(message), headers=rate_headers)

    async def _fetch_media(self, urls: tuple[str, ...]) -> tuple[Media, ...]:
        if not urls:
            return ()
        if self._session is None:
            raise RuntimeError("the simulator fetches media only while it runs")
        return await fetch_media(self._session, urls)

    async def messages(self, request: Request) -> Response:
        """``GET /_sim/messages?to=``: what was accepted for one destination."""
        to = request.query_params.get("to", "")
        if not is_e164(to):
            failure = error(
                422,
                "10016",
                "Phone number must be in +E.164 format",
                "'to' must be a +E.164 formatted phone number.",
                "/to",
            )
            return _error_response(failure)
        # The list itself, as docs/protocol.md shows it (a control route, not Telnyx's API).
        return _json(self.state.accepted.for_destination(to))

    async def media(self, request: Request) -> Response:
        """``GET /_sim/media/{token}``: a file a member sent, until its link expires."""
        found = self.state.inbound_media.get(request.path_params["token"], time.time())
        if found is None:
            failure = error(
                404, "10005", "Resource not found", "The media does not exist or has expired."
            )
            return _error_response(failure)
        return Response(found.data, media_type=found.content_type)

    async def get_message(self, request: Request) -> Response:
        """``GET /v2/messages/{id}``: the message with its recipient's current status."""
        if not self._authorized(request):
            failure = error(401, "10009", "Authentication failed", "Invalid or missing API key.")
            return _error_response(failure)
        found = self.state.sent.lookup(request.path_params["id"], time.time())
        if found is None:
            failure = error(
                404, "10005", "Resource not found", "The requested message could not be found."
            )
            return _error_response(failure)
        return _json(MessageResponse(found))

    async def inbound(self, request: Request) -> Response:
        raw = await _read_capped(request, MAX_INBOUND_BODY_BYTES)
        if raw is None:
            failure = error(413, "10015", "Bad Request", "The request body is too large.")
            return _error_response(failure)
        try:
            try:
                req = _inbound_decoder.decode(raw)
            except msgspec.DecodeError as exc:
                raise _decode_error(exc) from exc
            files = validate_inbound(req)
            url = self.settings.default_webhook_url
            if not url:
                raise error(
                    409,
                    "10015",
                    "Bad Request",
                    "No webhook URL is configured (KOINONIA_SIM_WEBHOOK_URL).",
                )
        except SimulatorError as exc:
            return _error_response(exc)

        self.state.record_inbound(req)
        served = self.state.inbound_media.serve(
            f"{str(request.base_url).rstrip('/')}/_sim/media", req.media, files, time.time()
        )
        await self.dispatcher.reserve()
        now = datetime.now(UTC)
        message = inbound_message(req, url, self.state.identity, now, served)
        duplicate = self.state.rng.random() < self.state.config.duplicate_webhooks
        plan = EventPlan(
            str(uuid.uuid4()),
            "message.received",
            "webhook_delivered",
            duplicate,
        )
        self.dispatcher.submit(WebhookJob(message, (plan,), url))
        return _json(InboundAccepted(InboundIds(message.id, plan.event_id)), 202)

    async def stats(self, request: Request) -> Response:
        stats = self.state.stats
        return _json(
            StatsBody(
                total=stats.total,
                by_destination=stats.by_destination,
                webhooks_sent=stats.webhooks_sent,
                webhooks_failed=stats.webhooks_failed,
                webhooks_pending=self.dispatcher.pending,
            )
        )

    async def reset(self, request: Request) -> Response:
        self.state.reset()
        return _json(ResetBody())

    async def config(self, request: Request) -> Response:
        if request.method == "POST":
            raw = await request.body()
            try:
                try:
                    patch = _patch_decoder.decode(raw) if raw.strip() else ConfigPatch()
                except msgspec.DecodeError as exc:
                    raise _decode_error(exc) from exc
                self.state.configure(patch)
            except SimulatorError as exc:
                # Config mistakes are always the caller's input: one status for all of them.
                return _error_response(SimulatorError(422, *exc.errors))
        return _json(self.state.config)

    async def public_key(self, request: Request) -> Response:
        return _json(PublicKeyBody(self.signer.public_key_b64))

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=WEBHOOK_CONNECTIONS)
        timeout = aiohttp.ClientTimeout(total=WEBHOOK_TIMEOUT_S)
        client = Http11Client(timeout_s=WEBHOOK_TIMEOUT_S, idle_per_origin=WEBHOOK_CONNECTIONS)
        async with (
            aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
            anyio.create_task_group() as tg,
        ):
            self._session = session
            await tg.start(self.dispatcher.run, client)
            await self._restore()
            try:
                yield
            finally:
                with anyio.CancelScope(shield=True):
                    # Receipts are the app's only word on what became of a text: send
                    # them now, latency or not, and keep whatever could not go.
                    self.dispatcher.hurry()
                    await self.dispatcher.drain(SHUTDOWN_DRAIN_S)
                    self._keep(self.dispatcher.unfinished())
                    await client.aclose()
                tg.cancel_scope.cancel()

    def _keep(self, pending: list[WebhookJob]) -> None:
        path = self.settings.state_file
        if not path:
            if pending:
                logger.error(
                    "simulator stopped with %d receipts unsent (no KOINONIA_SIM_STATE_FILE); "
                    "the app looks them up after KOINONIA_RECEIPT_TIMEOUT_S",
                    len(pending),
                )
            return
        kept = KeptState(pending=pending, sent=self.state.sent.snapshot())
        Path(path).write_bytes(_state_encoder.encode(kept))
        logger.info("simulator state kept: %d pending receipts", len(pending))

    async def _restore(self) -> None:
        path = Path(self.settings.state_file) if self.settings.state_file else None
        if path is None or not path.exists():
            return
        try:
            kept = _state_decoder.decode(path.read_bytes())
        except (msgspec.DecodeError, OSError):
            logger.exception("simulator state at %s unreadable; ignored", path)
            return
        for sent in kept.sent:
            self.state.sent.remember(sent)
        for job in kept.pending:
            await self.dispatcher.reserve()
            self.dispatcher.submit(job)
        path.unlink()
        logger.info("simulator state restored: %d pending receipts resent", len(kept.pending))


async def _http_error(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    if status == 405:
        failure = error(405, "10015", "Bad Request", "Method not allowed for this resource.")
    else:
        failure = error(
            status,
            "10005",
            "Resource not found",
            "The requested resource or URL could not be found.",
        )
    return _error_response(failure)


class _SimulatorApp(Starlette):
    """Sends (``POST /v2/messages``, one per text) straight to their handler: py-spy
    under bench/pipeline.py put Starlette's middleware and router at ~7 % of the
    simulator's CPU around a handler that needs neither (it answers every error
    itself; what it raises is a 500 either way)."""

    simulator: Simulator

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["path"] == "/v2/messages"
            and scope["method"] == "POST"
        ):
            scope["app"] = self
            response = await self.simulator.send_message(Request(scope, receive))
            await response(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def create_simulator_app(settings: SimulatorSettings) -> Starlette:
    """The simulator as an ASGI app; webhook senders run in its lifespan."""
    sim = Simulator(settings)
    app = _SimulatorApp(
        routes=[
            Route("/v2/messages", sim.send_message, methods=["POST"]),
            Route("/v2/messages/{id}", sim.get_message, methods=["GET"]),
            Route("/_sim/inbound", sim.inbound, methods=["POST"]),
            Route("/_sim/messages", sim.messages, methods=["GET"]),
            Route("/_sim/media/{token}", sim.media, methods=["GET"]),
            Route("/_sim/stats", sim.stats, methods=["GET"]),
            Route("/_sim/reset", sim.reset, methods=["POST"]),
            Route("/_sim/config", sim.config, methods=["GET", "POST"]),
            Route("/_sim/public-key", sim.public_key, methods=["GET"]),
        ],
        exception_handlers={404: _http_error, 405: _http_error},
        lifespan=sim.lifespan,
    )
    # For in-process callers (the dev runner, tests) that want the state without HTTP.
    app.state.simulator = app.simulator = sim
    return app
