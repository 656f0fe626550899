"""Signed webhook delivery for the provider simulator.

Sends are answered at once; their webhooks are queued here and delivered by a
fixed pool of sender tasks sharing one keep-alive HTTP client, so a burst
of thousands of sends per second never spawns a task per webhook.

The client is delivery/http11.py's, neither httpx's nor aiohttp's: httpcore's pool
re-examines every pooled connection for every request in flight
(encode/httpcore#1035) and, without ``sniffio`` installed, retries a failing
``import sniffio`` several times per request (on a 2-core box ~1.8 ms of CPU per
webhook at 8 concurrent requests); aiohttp spent ~0.12 ms, still a third of the
simulator's CPU under bench/pipeline.py (py-spy, issue 18). The lean client writes
the request itself and parses the answer with httptools.

    route ──reserve()──► slot ──submit(job, delay)──► heap (latency) ──► ready queue
                                                                            │
                                        worker x N ◄────────────────────────┘
                                        (one job = every event of one message, in order)

A job carries all events of one message and one worker delivers them in
sequence, which is what keeps ``message.sent`` ahead of ``message.finalized``
at zero latency. Capacity is a semaphore of ``max_pending`` slots taken by the
route before it commits a send and released when the job's last webhook is
done: when the receiver falls behind, sends slow down instead of memory
growing.

Signatures follow Telnyx: Ed25519 over ``f"{telnyx-timestamp}|{raw body}"``,
base64 in ``telnyx-signature-ed25519``.

An aiohttp session fetches a send's ``media_urls`` (``fetch_media``): the other
request the simulator, as a carrier, makes of the app (redirects followed, bodies
streamed: rare, so not worth a lean path).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import heapq
import itertools
import logging
import math
import time
from datetime import UTC, datetime
from typing import Final

import aiohttp
import anyio
import msgspec
from anyio.abc import TaskStatus
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from httptools import HttpParserError

from delivery.http11 import Closed, Http11Client
from delivery.simulator_state import Stats
from delivery.simulator_wire import (
    EventData,
    EventMeta,
    EventPlan,
    Media,
    Message,
    WebhookEnvelope,
    render_event,
)
from storage.domain.media_types import MAX_MEDIA_BYTES, sniff

logger = logging.getLogger(__name__)

_encoder: Final = msgspec.json.Encoder()


def decode_seed(seed_b64: str) -> bytes:
    seed = base64.b64decode(seed_b64, validate=True)
    if len(seed) != 32:
        raise ValueError("an Ed25519 signing seed must be base64 of exactly 32 bytes")
    return seed


# A send's media are fetched before it is answered, all at once: this bounds the wait, and
# stays under the 10 s the app's Telnyx client waits for an answer.
MEDIA_FETCH_TIMEOUT_S: Final = 5.0
MEDIA_MAX_REDIRECTS: Final = 3


class _FetchFailed(Exception):
    pass


async def fetch_media(session: aiohttp.ClientSession, urls: tuple[str, ...]) -> tuple[Media, ...]:
    """Every file of a send, fetched at once, in ``urls`` order."""
    return tuple(await asyncio.gather(*(_fetch_one(session, url) for url in urls)))


async def _fetch_one(session: aiohttp.ClientSession, url: str) -> Media:
    """One file as a carrier fetches it; ``size`` None when it could not be had."""
    timeout = aiohttp.ClientTimeout(total=MEDIA_FETCH_TIMEOUT_S)
    data = bytearray()
    try:
        async with session.get(url, timeout=timeout, max_redirects=MEDIA_MAX_REDIRECTS) as response:
            if not 200 <= response.status < 300:
                raise _FetchFailed(f"HTTP {response.status}")
            async for chunk in response.content.iter_chunked(65_536):
                data += chunk
                if len(data) > MAX_MEDIA_BYTES:
                    raise _FetchFailed(f"larger than {MAX_MEDIA_BYTES} bytes")
            declared = response.headers.get("content-type", "")
    except (aiohttp.ClientError, TimeoutError, _FetchFailed) as exc:
        reason = str(exc) if isinstance(exc, _FetchFailed) else type(exc).__name__
        logger.warning("media fetch failed; sent without it: %s (%s)", url[:200], reason)
        return Media(url=url)
    if not data:
        logger.warning("media fetch failed; sent without it: %s (empty)", url[:200])
        return Media(url=url)
    # Telnyx takes the declared type, and guesses from the bytes when it is octet-stream.
    content_type = declared.partition(";")[0].strip().lower()
    if content_type in ("", "application/octet-stream"):
        content_type = sniff(bytes(data)) or "application/octet-stream"
    return Media(
        url=url, content_type=content_type, sha256=hashlib.sha256(data).hexdigest(), size=len(data)
    )


class Signer:
    """Signs webhook bodies the way Telnyx does."""

    def __init__(self, seed: bytes) -> None:
        self._key = Ed25519PrivateKey.from_private_bytes(seed)
        raw = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.public_key_b64 = base64.b64encode(raw).decode()

    def headers(self, body: bytes, timestamp: int) -> dict[str, str]:
        return dict(self.header_list(body, timestamp))

    def header_list(self, body: bytes, timestamp: int) -> list[tuple[str, str]]:
        """``headers`` as the lean client takes them."""
        stamp = str(timestamp)
        signature = self._key.sign(stamp.encode() + b"|" + body)
        return [
            ("content-type", "application/json"),
            ("telnyx-signature-ed25519", base64.b64encode(signature).decode()),
            ("telnyx-timestamp", stamp),
        ]


class WebhookJob(msgspec.Struct, frozen=True):
    """Every webhook of one message, delivered in ``plans`` order by one worker."""

    message: Message
    plans: tuple[EventPlan, ...]
    url: str
    failover_url: str | None = None


class WebhookDispatcher:
    """Bounded webhook delivery: a latency heap, a ready queue and ``workers`` senders."""

    def __init__(
        self,
        signer: Signer,
        stats: Stats,
        *,
        workers: int = 32,
        max_pending: int = 50_000,
        attempts_per_url: int = 3,
        backoff_s: tuple[float, ...] = (0.1, 0.3),
    ) -> None:
        self.signer = signer
        # Shared with SimulatorState and cleared in place by a reset, so counts stay live.
        self.stats = stats
        self.workers = workers
        # Telnyx tries each URL up to three times, then the failover URL.
        self.attempts_per_url = attempts_per_url
        self.backoff_s = backoff_s
        # Every job holds a slot from reserve() until its last webhook is done; the queue
        # can hold them all, so handing a reserved job over never blocks. (asyncio's queue:
        # aiohttp ties delivery to asyncio anyway, and it needs no closing.)
        self._slots = anyio.Semaphore(max_pending)
        self._ready: asyncio.Queue[WebhookJob] = asyncio.Queue(max_pending)
        # Jobs waiting out their simulated latency: (due loop time, tie-breaker, job).
        self._delayed: list[tuple[float, int, WebhookJob]] = []
        self._sequence = itertools.count()
        # Set when a job due earlier than everything in the heap arrives.
        self._wakeup = anyio.Event()
        self.pending = 0
        self._last_warning = -math.inf
        self._unlogged_failures = 0
        # Set whenever nothing is pending; drain() waits on it.
        self._idle = anyio.Event()
        self._idle.set()
        # Submitted jobs whose webhooks have not all been tried yet, by identity: what
        # a shutdown must send or keep.
        self._unfinished: dict[int, WebhookJob] = {}

    async def reserve(self) -> None:
        """Wait for room for one more job; the caller then must submit() or release()."""
        await self._slots.acquire()
        if self._idle.is_set():
            self._idle = anyio.Event()
        self.pending += 1

    def release(self) -> None:
        """Give back a reservation that will not be used, or a finished job's slot."""
        self.pending -= 1
        self._slots.release()
        if self.pending == 0:
            self._idle.set()

    def submit(self, job: WebhookJob, delay_s: float = 0.0) -> None:
        """Queue a job under a reservation; its webhooks start after ``delay_s`` seconds."""
        self._unfinished[id(job)] = job
        if delay_s <= 0:
            self._ready.put_nowait(job)
            return
        entry = (anyio.current_time() + delay_s, next(self._sequence), job)
        heapq.heappush(self._delayed, entry)
        if self._delayed[0] is entry:
            self._wakeup.set()

    async def run(
        self,
        client: Http11Client,
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Deliver until cancelled (the app lifespan owns this task)."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._release_due)
            for _ in range(self.workers):
                tg.start_soon(self._work, client)
            task_status.started()

    def hurry(self) -> None:
        """Shutting down: every job waiting out its latency is due now."""
        while self._delayed:
            self._ready.put_nowait(heapq.heappop(self._delayed)[2])
        self._wakeup.set()

    def unfinished(self) -> list[WebhookJob]:
        """Jobs not yet (completely) delivered, oldest first."""
        return list(self._unfinished.values())

    async def drain(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for queued webhooks to go out; whether they all did."""
        with anyio.move_on_after(timeout_s):
            while self.pending:
                await self._idle.wait()
        return self.pending == 0

    async def _release_due(self) -> None:
        while True:
            self._wakeup = anyio.Event()
            now = anyio.current_time()
            delayed = self._delayed
            while delayed and delayed[0][0] <= now:
                self._ready.put_nowait(heapq.heappop(delayed)[2])
            with anyio.move_on_after(delayed[0][0] - now if delayed else None):
                await self._wakeup.wait()

    async def _work(self, client: Http11Client) -> None:
        while True:
            job = await self._ready.get()
            try:
                await self._deliver_job(client, job)
            except Exception:
                logger.exception("simulator webhook job for message %s crashed", job.message.id)
            finally:
                self._unfinished.pop(id(job), None)
                self.release()

    async def _deliver_job(self, client: Http11Client, job: WebhookJob) -> None:
        sent_at = datetime.now(UTC)
        for plan in job.plans:
            data = render_event(job.message, plan, sent_at)
            for _ in range(2 if plan.duplicate else 1):
                await self._deliver_event(client, data, job)

    async def _deliver_event(self, client: Http11Client, data: EventData, job: WebhookJob) -> bool:
        targets = [job.url]
        if job.failover_url and job.failover_url != job.url:
            targets.append(job.failover_url)
        attempt = 0
        reason = ""
        for target in targets:
            for try_number in range(self.attempts_per_url):
                attempt += 1
                envelope = WebhookEnvelope(data, EventMeta(attempt, target))
                body = _encoder.encode(envelope)
                headers = self.signer.header_list(body, int(time.time()))
                try:
                    status, _ = await client.post(target, body, headers)
                except (OSError, Closed, HttpParserError, TimeoutError, ValueError) as exc:
                    reason = f"{type(exc).__name__}: {exc}"
                else:
                    if 200 <= status < 300:
                        self.stats.webhooks_sent += 1
                        return True
                    reason = f"HTTP {status}"
                logger.debug("webhook attempt %d to %s failed: %s", attempt, target, reason)
                if try_number + 1 < self.attempts_per_url:
                    await anyio.sleep(self.backoff_s[min(try_number, len(self.backoff_s) - 1)])
        self.stats.webhooks_failed += 1
        self._warn_given_up(job.message.id, attempt, reason)
        return False

    def _warn_given_up(self, message_id: str, attempts: int, reason: str) -> None:
        # A dead receiver fails thousands of webhooks a second: one line a second is enough.
        now = time.monotonic()
        if now - self._last_warning < 1.0:
            self._unlogged_failures += 1
            return
        logger.warning(
            "gave up on webhook for message %s after %d attempts: %s (%d more since last report)",
            message_id,
            attempts,
            reason,
            self._unlogged_failures,
        )
        self._last_warning = now
        self._unlogged_failures = 0
