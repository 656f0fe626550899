"""Inbound provider webhooks: ``POST /v1/provider/telnyx/webhooks``.

Order of work, so that a bad request changes nothing and a good one is applied
exactly once: size limit → signature (before any parsing or write) → decode →
one transaction that records the event id (dedupe) and applies it → publish
events after commit. A duplicate event id answers 200 and does nothing.

An inbound text that is a keyword (storage/pg/keywords.py: STOP, START, HELP and
their synonyms) is stored in the conversation like any other, so staff see it,
and acts in the same transaction: consent, webhook event, audit row. Its answer,
if any, is accepted in that transaction as a one-recipient message
(storage/pg/conversations.py ``accept_reply``) and enqueued after the commit: the
one send pipeline every text takes. The conversation keeps its unread count.

A text that is none of those but names one of the church's group keywords
(storage/pg/group_keywords.py: the word, or ``JOIN <word>``) adds its sender to the
group in that same transaction, and its answer takes the same path, checked for
consent like any text (only the HELP and START answers are exempt). The dedupe record
is written in that transaction too, so a redelivered webhook joins and answers
nothing twice.

An inbound MMS lists files at the provider's links, which expire: each is copied
into our object store (storage/media/library.py ``keep``) and listed on the
conversation message, hence in ``conversation.message.created``. The copies are
fetched before any transaction (no connection is held across the network), after a
rolled-back probe of the dedupe record, so a redelivered webhook fetches nothing;
they are kept (object, then row) inside the one transaction, after the dedupe
record, so a redelivery that races the first delivery waits on that record and
keeps no second copy. What happens to a file that cannot be had:

- the provider's link failed for a moment (a connection error, a timeout, a 5xx
  or 429): ``503`` before anything is written, so the provider redelivers and
  nothing is lost; on the provider's third attempt (``meta.attempt``, the last to
  the primary URL) the text is kept without that file, rather than risk losing
  the text with it;
- it never will be had (any other 4xx, as an expired link answers), or it is a
  type carriers do not take (judged by content), larger than 1 MiB, or past the
  tenth: the text is kept, the file skipped and logged.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl

import httpx
import msgspec
import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from delivery.errors import SignatureRejected
from delivery.progress import ProgressTracker
from delivery.receipts import ReceiptBatcher
from delivery.telnyx_signatures import load_public_key, verify_telnyx
from storage.domain.envelope import success_bytes
from storage.domain.errors import InvalidInput
from storage.domain.events import MediaItem
from storage.domain.media_links import content_url
from storage.domain.media_types import MAX_MEDIA_BYTES, MAX_MEDIA_PER_MESSAGE
from storage.domain.phones import normalize
from storage.domain.statuses import UNCONFIRMED, RecipientStatus, from_telnyx
from storage.media import library
from storage.objects import ObjectStoreError
from storage.pg.churches import church_by_number
from storage.pg.conversations import AcceptedReply, ReplyKind, accept_reply, record_inbound
from storage.pg.database import Conn
from storage.pg.group_keywords import JoinOutcome, apply_group_keyword
from storage.pg.groups import CACHE_TOPIC as GROUPS
from storage.pg.keywords import Kind, apply_keyword
from storage.pg.members import create_inbound_member, member_by_phone_hash
from storage.pg.provider_events import NO_CHURCH, record_provider_event
from storage.pg.recipients import ProviderStatus, locate_by_provider_id
from storage.process import tracing
from storage.process.services import Services
from storage.redis.queue import hand_over
from storage.responses import BodyTooLarge, fail, known_failure, ok, read_body

log = logging.getLogger("koinonia.delivery.inbound")

WEBHOOK_PATH = "/v1/provider/telnyx/webhooks"


class _Party(msgspec.Struct):
    phone_number: str
    status: str | None = None


class _Error(msgspec.Struct):
    code: str | int | None = None


class _Media(msgspec.Struct):
    url: str
    content_type: str | None = None
    size: int | None = None


class _Payload(msgspec.Struct):
    id: str
    to: list[_Party] = []
    text: str | None = None
    errors: list[_Error] = []
    direction: str | None = None
    from_: _Party | None = msgspec.field(default=None, name="from")
    sent_at: str | None = None
    """When the carrier took the text (ISO 8601): the start of a delivered
    receipt's latency."""
    media: list[_Media] = []


class _Data(msgspec.Struct):
    event_type: str
    id: str
    payload: _Payload
    occurred_at: str | None = None
    record_type: str | None = None


class TelnyxWebhook(msgspec.Struct):
    data: _Data
    meta: dict[str, Any] | None = None


_decoder = msgspec.json.Decoder(TelnyxWebhook)


MEDIA_FETCH_TIMEOUT_S = 1.5
"""The files of one text are fetched at once, all within this long: the webhook is
answered within 2 s (docs/protocol.md), and a file not had by then counts as failed
for a moment (the provider redelivers)."""
LAST_PRIMARY_ATTEMPT = 3
"""Telnyx tries a webhook URL three times (then the failover URL): from this attempt on,
a file that failed for a moment is given up and the text kept without it."""


class MediaUnavailable(Exception):
    """A provider link failed in a way a later attempt may not (the provider should
    redeliver)."""


class _Skipped(Exception):
    """A file that will never be kept: its reason is logged, the text kept."""


async def _fetch(client: httpx.AsyncClient, url: str) -> bytes:
    """One file from the provider, at most MAX_MEDIA_BYTES; ``_Skipped`` when it never
    will be had, ``MediaUnavailable`` when it may be later."""
    if not url.startswith(("https://", "http://")):
        raise _Skipped("not an http(s) link")
    try:
        async with client.stream("GET", url) as response:
            status = response.status_code
            if status == 429 or status >= 500:
                raise MediaUnavailable(f"HTTP {status}")
            if not 200 <= status < 300:
                raise _Skipped(f"HTTP {status}")
            data = bytearray()
            async for chunk in response.aiter_bytes():
                data += chunk
                if len(data) > MAX_MEDIA_BYTES:
                    raise _Skipped(f"larger than {MAX_MEDIA_BYTES} bytes")
            return bytes(data)
    except (MediaUnavailable, _Skipped):
        raise
    except httpx.HTTPError as exc:
        raise MediaUnavailable(type(exc).__name__) from exc
    except Exception as exc:
        # Not an httpx error (an invalid URL, a port out of range surfacing from the
        # socket layer): a link no attempt will ever open. Skipped, so the text is
        # kept rather than refused on every redelivery.
        raise _Skipped(f"unusable link ({type(exc).__name__})") from exc


async def fetch_media(links: list[_Media], *, give_up_on_failures: bool) -> list[bytes]:
    """The files of an inbound MMS that can be kept, in the provider's order, each
    judged by content (``library.check``); skipped ones are logged. ``MediaUnavailable``
    when one failed for a moment, unless ``give_up_on_failures``."""
    if len(links) > MAX_MEDIA_PER_MESSAGE:
        log.warning(
            "inbound media skipped",
            extra={"reason": f"past file {MAX_MEDIA_PER_MESSAGE}", "count": len(links)},
        )
    kept_links = links[:MAX_MEDIA_PER_MESSAGE]
    timeout = httpx.Timeout(MEDIA_FETCH_TIMEOUT_S)
    async with httpx.AsyncClient(timeout=timeout, follow_redirects=True) as client:
        tasks = [asyncio.ensure_future(_fetch(client, link.url)) for link in kept_links]
        # One budget for the whole text (httpx's timeout is per step: a server trickling
        # bytes or redirecting would otherwise hold the webhook's answer).
        _, late = await asyncio.wait(tasks, timeout=MEDIA_FETCH_TIMEOUT_S) if tasks else ((), ())
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
    results: list[bytes | BaseException] = [
        MediaUnavailable(f"no answer within {MEDIA_FETCH_TIMEOUT_S} s")
        if task in late
        else (task.exception() or task.result())
        for task in tasks
    ]
    files: list[bytes] = []
    for result in results:
        if isinstance(result, MediaUnavailable) and not give_up_on_failures:
            raise result
        if isinstance(result, BaseException):
            if not isinstance(result, (MediaUnavailable, _Skipped)):
                raise result
            log.warning("inbound media skipped", extra={"reason": str(result)})
            continue
        try:
            library.check(result)
        except (library.UnsupportedMedia, library.MediaTooLarge) as exc:
            log.warning("inbound media skipped", extra={"reason": str(exc)})
            continue
        files.append(result)
    return files


def _epoch(stamp: str | None) -> float | None:
    """An ISO 8601 time as epoch seconds; None when absent or unreadable."""
    if not stamp:
        return None
    try:
        return datetime.fromisoformat(stamp).timestamp()
    except ValueError:
        return None


class InboundHandler:
    """Applies verified Telnyx events; one per process, built at start-up."""

    def __init__(
        self, services: Services, progress: ProgressTracker, receipts: ReceiptBatcher
    ) -> None:
        self.services = services
        self.progress = progress
        self.receipts = receipts
        key = services.settings.provider.public_key
        self._key: Ed25519PublicKey | None = load_public_key(key) if key else None

    async def handle(self, request: Request) -> Response:
        """The route through Starlette's stack (with tracing on)."""
        try:
            body = await read_body(request, self.services.settings.http.max_body_bytes)
        except BodyTooLarge:
            return fail("payload_too_large", "webhook body too large")
        response = await self.answer(
            body,
            request.headers.get("telnyx-timestamp"),
            request.headers.get("telnyx-signature-ed25519"),
            request.query_params.get("ref"),
        )
        return _accepted() if response is _OK else response

    async def serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The lean route (``inbound_lean_routes``): the same answers as ``handle``
        behind Starlette's router and exception handlers, for a fraction of the CPU
        (py-spy under bench/pipeline.py: the stack around the endpoint was ~20 % of the
        web process, two webhooks per text)."""
        try:
            body = await _read_body(receive, self.services.settings.http.max_body_bytes)
        except BodyTooLarge:
            response = fail("payload_too_large", "webhook body too large")
        except _Disconnected:
            return  # nobody to answer, and nothing was read to apply
        else:
            timestamp = signature = None
            for name, value in scope["headers"]:
                # Starlette's ``headers.get``: the first of a repeated header.
                if name == b"telnyx-timestamp" and timestamp is None:
                    timestamp = value.decode("latin-1")
                elif name == b"telnyx-signature-ed25519" and signature is None:
                    signature = value.decode("latin-1")
            ref = _query_ref(scope.get("query_string", b""))
            try:
                response = await self.answer(body, timestamp, signature, ref)
            except Exception as exc:
                refused = known_failure(exc)
                if refused is None:
                    raise  # RequestContext answers the 500 and logs it
                response = refused
        if response is _OK:
            data = success_bytes(_RECEIVED)
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-length", str(len(data)).encode()), _JSON],
                }
            )
            await send({"type": "http.response.body", "body": data})
            return
        await send(
            {
                "type": "http.response.start",
                "status": response.status_code,
                "headers": response.raw_headers,
            }
        )
        await send({"type": "http.response.body", "body": response.body})

    async def answer(
        self, body: bytes, timestamp: str | None, signature: str | None, ref: str | None
    ) -> Response:
        """Verify, decode and apply one webhook; what to answer. Raises what a store
        raised (a store that is down: the caller's 503)."""
        settings = self.services.settings
        if self._key is None:
            return fail("unavailable", "no provider public key is configured")
        try:
            verify_telnyx(
                self._key,
                body,
                timestamp,
                signature,
                now=time.time(),
                tolerance_s=settings.provider.webhook_tolerance_s,
            )
        except SignatureRejected as exc:
            log.warning("webhook rejected", extra={"reason": exc.reason})
            return fail("unauthorized", f"invalid webhook signature: {exc.reason}")
        try:
            if not body.isascii():
                body.decode()
            hook = _decoder.decode(body)
        except msgspec.ValidationError as exc:
            return fail("validation_error", str(exc))
        except (msgspec.DecodeError, UnicodeDecodeError):
            return fail("bad_request", "body is not UTF-8 JSON")
        data = hook.data
        if tracing.enabled():
            tracing.annotate({"telnyx.event_type": data.event_type, "telnyx.event_id": data.id})
        if data.event_type in ("message.sent", "message.finalized"):
            try:
                await self._status(data, ref)
            except InvalidInput as exc:
                log.warning("receipt refused", extra={"reason": exc.message})
                return fail("validation_error", f"receipt refused: {exc.field} {exc.message}")
        elif data.event_type == "message.received":
            try:
                await self._received(data, _attempt(hook.meta))
            except MediaUnavailable as exc:
                log.warning(
                    "inbound media unavailable; asking for redelivery", extra={"reason": str(exc)}
                )
                return fail("unavailable", "a media file could not be fetched; retry later")
        return _OK

    async def _status(self, data: _Data, ref: str | None) -> None:
        """Apply a receipt to the recipient our reference names (``InvalidInput``, and
        nothing written, for a reference we did not make or a receipt whose message id
        is not that recipient's)."""
        where = self.services.refs.parse(ref) if ref else None
        party = data.payload.to[0] if data.payload.to else None
        status = from_telnyx(party.status) if party and party.status else None
        if status is None:
            await self._dedupe_only(data, where[0] if where else NO_CHURCH)
            return
        error = data.payload.errors[0].code if data.payload.errors else None
        if party is not None and party.status == UNCONFIRMED:
            error = UNCONFIRMED  # the marker that makes this ``sent`` final
        if where is None:
            async with self.services.pool.connection() as conn:
                where = await locate_by_provider_id(conn, data.payload.id)
        if where is None:
            log.info("status for an unknown message", extra={"provider_id": data.payload.id})
            await self._dedupe_only(data, NO_CHURCH)
            return
        church_id, message_id, recipient_id = where
        applied = await self.receipts.submit(
            ProviderStatus(
                event_id=data.id,
                event_type=data.event_type,
                church_id=church_id,
                message_id=message_id,
                recipient_id=recipient_id,
                target=status,
                provider_message_id=data.payload.id,
                error_code=None if error is None else str(error),
            ),
            sent_at=_epoch(data.payload.sent_at) if status == RecipientStatus.DELIVERED else None,
        )
        if not applied:
            raise InvalidInput("payload.id", "is not the provider message id of that recipient")

    async def _received(self, data: _Data, attempt: int) -> None:
        payload = data.payload
        if payload.from_ is None or not payload.to:
            await self._dedupe_only(data, NO_CHURCH)
            return
        files: list[bytes] = []
        if payload.media and await self._worth_fetching(data):
            files = await fetch_media(
                payload.media, give_up_on_failures=attempt >= LAST_PRIMARY_ATTEMPT
            )
        vault = self.services.vault
        settings = self.services.settings
        async with self.services.pool.connection() as conn, conn.transaction():
            # The church first: the dedupe record is keyed by it.
            church = await church_by_number(conn, payload.to[0].phone_number)
            if not await _first_time(conn, church.id if church else NO_CHURCH, data):
                return
            if church is None:
                log.info("inbound text to an unknown number")
                return
            media: list[MediaItem] = []
            for file in files:
                try:
                    kept = await library.keep(
                        self.services.objects, conn, church.id, file, source="inbound"
                    )
                except ObjectStoreError:
                    # The provider's last try: the text is kept without the file rather
                    # than lost with it (before that, the 503 asks for redelivery).
                    if attempt < LAST_PRIMARY_ATTEMPT:
                        raise
                    log.warning(
                        "inbound media skipped", extra={"reason": "object store unavailable"}
                    )
                    continue
                url = content_url(settings.public_url, kept.id)
                media.append(MediaItem(kept.id, kept.content_type, kept.size, url))
            try:
                phone = normalize(payload.from_.phone_number, church.country)
            except Exception:
                phone = payload.from_.phone_number
            found = await member_by_phone_hash(conn, church.id, vault.lookup_hash(phone))
            if found is None:
                member_id = await create_inbound_member(conn, vault, church.id, phone)
            else:
                member_id = found[0]
            conversation, _, _ = await record_inbound(
                conn,
                church.id,
                member_id,
                body=payload.text or "",
                provider_message_id=payload.id,
                media=media,
            )
            reply: AcceptedReply | None = None
            text = payload.text or ""
            outcome = await apply_keyword(conn, church.id, member_id, text)
            joined: JoinOutcome | None = None
            if outcome is None:
                joined = await apply_group_keyword(conn, church.id, member_id, text)
            answer = outcome.reply if outcome is not None else joined.reply if joined else None
            if answer is not None:
                # HELP answers and START confirmations go whatever the opt-in state
                # (carriers require them); the worker checks consent for anything else.
                reply = await accept_reply(
                    conn,
                    church.id,
                    conversation.id,
                    body=answer,
                    sent_by=None,
                    kind=ReplyKind.ANSWER,
                    consent_exempt=outcome is not None and outcome.kind in (Kind.HELP, Kind.OPT_IN),
                    max_attempts=self.services.settings.delivery.max_attempts,
                    traceparent=tracing.current_traceparent(),
                )
        if outcome is not None:
            log.info(
                "keyword",
                extra={
                    "keyword": outcome.keyword,
                    "changed": outcome.changed,
                    "replied": reply is not None,
                },
            )
        if joined is not None:
            log.info(
                "group keyword",
                extra={
                    "keyword_id": str(joined.keyword_id),
                    "joined": joined.joined,
                    "changed": joined.opted_in,
                    "replied": reply is not None,
                },
            )
        self.services.relay.kick()
        if reply is not None:
            await hand_over(self.services.redis, [reply.batch], settings.delivery.shards)
        if joined is not None and joined.joined:
            await self._groups_changed(church.id)

    async def _groups_changed(self, church_id: uuid.UUID) -> None:
        """Bump the cached group counts. Redis down leaves them stale until their entry
        expires, which must not fail a webhook whose change has committed."""
        try:
            await self.services.cache.invalidate(church_id, GROUPS)
        except RedisError as exc:
            log.warning("group cache not invalidated", extra={"error": type(exc).__name__})

    async def _worth_fetching(self, data: _Data) -> bool:
        """Whether an MMS is new to a church of ours, probed by writing its dedupe
        record and rolling that back: a redelivered webhook then fetches nothing. (The
        transaction that keeps the files writes the record for real.)"""
        new = False
        async with self.services.pool.connection() as conn, conn.transaction():
            church = await church_by_number(conn, data.payload.to[0].phone_number)
            if church is not None:
                new = await _first_time(conn, church.id, data)
            raise psycopg.Rollback()  # ends this transaction only, rolled back
        return new

    async def _dedupe_only(self, data: _Data, church_id: uuid.UUID) -> None:
        async with self.services.pool.connection() as conn:
            await _first_time(conn, church_id, data)


def _attempt(meta: dict[str, Any] | None) -> int:
    """Which delivery of this webhook the provider says it is (1 when it does not say)."""
    attempt = (meta or {}).get("attempt")
    return attempt if isinstance(attempt, int) else 1


async def _first_time(conn: Conn, church_id: uuid.UUID, data: _Data) -> bool:
    return await record_provider_event(conn, church_id, data.id, data.event_type)


def inbound_routes() -> list[BaseRoute]:
    async def endpoint(request: Request) -> Response:
        handler: InboundHandler = request.app.state.inbound
        return await handler.handle(request)

    return [Route(WEBHOOK_PATH, endpoint, methods=["POST"])]


def inbound_lean_routes() -> list[tuple[str, str, ASGIApp]]:
    """Provider webhooks served before the middleware stack (``deploy/app.py FrontDoor``)."""

    async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
        handler: InboundHandler = scope["app"].state.inbound
        await handler.serve(scope, receive, send)

    return [("POST", WEBHOOK_PATH, endpoint)]


_RECEIVED = {"received": True}
_OK = ok(_RECEIVED)
"""Stands for an accepted webhook's answer (``answer`` returns it); the body is made
per request, since the envelope carries the request's id."""
_JSON = (b"content-type", b"application/json")


def _accepted() -> Response:
    return ok(_RECEIVED)


class _Disconnected(Exception):
    pass


async def _read_body(receive: Receive, limit: int) -> bytes:
    """The request body from ASGI messages, refusing more than ``limit`` bytes
    (``read_body``'s rule without a Request; RequestContext has already refused a
    larger declared length)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise _Disconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _query_ref(query: bytes) -> str | None:
    """``ref`` of the query string, read as Starlette's ``query_params.get`` does (the
    last one when repeated, blank values kept)."""
    if not query:
        return None
    found = None
    for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
        if name == "ref":
            found = value
    return found
