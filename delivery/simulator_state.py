"""The provider simulator's mutable state and rules, in process memory, with no I/O.

Configuration, the rate-limit token bucket, idempotency keys, STOP blocks and
counters. Time comes in as arguments so every rule is testable without
sockets or sleeps; ``delivery.simulator`` pumps this from its HTTP routes.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
import secrets
from collections import OrderedDict, deque
from typing import Annotated, Final, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from delivery.simulator_wire import (
    FAILURES,
    EventPlan,
    Identity,
    InboundFile,
    InboundRequest,
    Media,
    Message,
    Outcome,
    RecipientStatus,
    bad_request,
    plan_events,
)

# -- configuration ----------------------------------------------------------------------------

NonNegative = Annotated[float, Meta(ge=0)]
Probability = Annotated[float, Meta(ge=0, le=1)]
Millis = Annotated[int, Meta(ge=0, le=600_000)]


class Outcomes(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Relative weights of final outcomes; weights left out of a config update count as 0."""

    delivered: NonNegative = 0.0
    sending_failed: NonNegative = 0.0
    delivery_failed: NonNegative = 0.0
    delivery_unconfirmed: NonNegative = 0.0


DEFAULT_OUTCOMES: Final = Outcomes(delivered=1.0)


class SimConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    latency_ms: tuple[Millis, Millis] = (0, 0)
    outcomes: Outcomes = DEFAULT_OUTCOMES
    rate_limit_per_s: Annotated[float, Meta(gt=0)] | None = None
    outage: bool = False
    duplicate_webhooks: Probability = 0.0
    reorder_webhooks: bool = False
    drop_webhooks: Probability = 0.0
    """The share of sends whose receipt webhooks are never sent (lost callbacks); the
    carrier's outcome still stands and ``GET /v2/messages/{id}`` reports it."""


class ConfigPatch(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``POST /_sim/config``: any subset of ``SimConfig``; ``null`` clears the rate limit."""

    latency_ms: tuple[Millis, Millis] | UnsetType = UNSET
    outcomes: Outcomes | UnsetType = UNSET
    rate_limit_per_s: Annotated[float, Meta(gt=0)] | UnsetType | None = UNSET
    outage: bool | UnsetType = UNSET
    duplicate_webhooks: Probability | UnsetType = UNSET
    reorder_webhooks: bool | UnsetType = UNSET
    drop_webhooks: Probability | UnsetType = UNSET


def apply_patch(config: SimConfig, patch: ConfigPatch) -> SimConfig:
    changes = {
        name: value
        for name in ConfigPatch.__struct_fields__
        if (value := getattr(patch, name)) is not UNSET
    }
    updated = msgspec.structs.replace(config, **changes)
    low, high = updated.latency_ms
    if low > high:
        raise bad_request("latency_ms must be [min, max] with min <= max", "/latency_ms")
    if sum(msgspec.structs.astuple(updated.outcomes)) <= 0:
        raise bad_request("outcomes must have at least one positive weight", "/outcomes")
    return updated


# -- rate limiting ----------------------------------------------------------------------------


class RateDecision(msgspec.Struct, frozen=True):
    allowed: bool
    limit: float
    remaining: int
    retry_after_s: int
    reset_s: int

    def headers(self) -> dict[str, str]:
        limit = str(int(self.limit)) if self.limit == int(self.limit) else str(self.limit)
        headers = {
            "x-ratelimit-limit": limit,
            "x-ratelimit-remaining": str(self.remaining),
            "x-ratelimit-reset": str(self.reset_s),
        }
        if not self.allowed:
            headers["Retry-After"] = str(self.retry_after_s)
        return headers


class TokenBucket:
    """Allows ``rate`` requests per second with a burst of one second's worth (at least one)."""

    def __init__(self, rate: float, now: float) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate)
        self.tokens = self.capacity
        self.updated = now

    def take(self, now: float) -> RateDecision:
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        allowed = self.tokens >= 1.0
        if allowed:
            self.tokens -= 1.0
        retry_after = 0 if allowed else max(1, math.ceil((1.0 - self.tokens) / self.rate))
        return RateDecision(
            allowed=allowed,
            limit=self.rate,
            remaining=int(self.tokens),
            retry_after_s=retry_after,
            reset_s=math.ceil((self.capacity - self.tokens) / self.rate),
        )


# -- idempotency ------------------------------------------------------------------------------

IDEMPOTENCY_KEY: Final = re.compile(r"[A-Za-z0-9_:-]{1,255}")


class StoredSend(msgspec.Struct, frozen=True, gc=False):
    """What a replay needs. Not the answer itself: a replay carries the byte-identical body,
    so the answer is rebuilt from it with the first send's id and time, at a fraction of
    the ~1 KB an encoded answer would hold for 24 hours."""

    fingerprint: bytes
    message_id: bytes
    received_at_ms: int
    stored_at: float


class IdempotencyStore:
    """Successful sends by ``Idempotency-Key`` for ``ttl_s`` seconds.

    Insertion order is expiry order, so expired keys are dropped from the front
    in O(1) each. ``max_entries`` (about 330 bytes each) bounds memory during
    long benchmarks; the oldest keys go first, which only matters for a retry
    older than the newest ``max_entries`` sends.
    """

    def __init__(self, ttl_s: float = 24 * 3600, max_entries: int = 1_000_000) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: dict[str, StoredSend] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def _expire(self, now: float) -> None:
        entries = self._entries
        while entries:
            oldest = next(iter(entries))
            if now - entries[oldest].stored_at < self.ttl_s and len(entries) <= self.max_entries:
                return
            del entries[oldest]

    def lookup(self, key: str, now: float) -> StoredSend | None:
        self._expire(now)
        return self._entries.get(key)

    def remember(self, key: str, stored: StoredSend) -> None:
        self._entries[key] = stored
        self._expire(stored.stored_at)

    def clear(self) -> None:
        self._entries.clear()


# -- opt-out keywords -------------------------------------------------------------------------

STOP_KEYWORDS: Final = frozenset(
    {"STOP", "STOPALL", "STOP ALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "REVOKE", "OPTOUT"}
)
START_KEYWORDS: Final = frozenset({"START", "UNSTOP", "YES"})


def keyword(text: str) -> Literal["stop", "start"] | None:
    """Whether a whole inbound message is an opt-out or opt-in keyword (case, spacing and
    trailing punctuation ignored, as carriers do: "Stop." still opts out)."""
    normalized = " ".join(text.strip().rstrip(".!").split()).upper()
    if normalized in STOP_KEYWORDS:
        return "stop"
    if normalized in START_KEYWORDS:
        return "start"
    return None


# -- stats ------------------------------------------------------------------------------------


class Stats:
    """Counters served by ``GET /_sim/stats``; cleared in place so holders keep a live view."""

    def __init__(self) -> None:
        self.total = 0
        self.by_destination: dict[str, int] = {}
        self.webhooks_sent = 0
        self.webhooks_failed = 0

    def count_send(self, destination: str) -> None:
        self.total += 1
        self.by_destination[destination] = self.by_destination.get(destination, 0) + 1

    def clear(self) -> None:
        self.total = 0
        self.by_destination.clear()
        self.webhooks_sent = 0
        self.webhooks_failed = 0


def pick_outcome(outcomes: Outcomes, rng: random.Random) -> Outcome:
    names: tuple[Outcome, ...] = (
        "delivered",
        "sending_failed",
        "delivery_failed",
        "delivery_unconfirmed",
    )
    weights = [getattr(outcomes, name) for name in names]
    return rng.choices(names, weights)[0]


# -- what was accepted, for GET /_sim/messages -------------------------------------------------


class AcceptedSend(msgspec.Struct, frozen=True):
    """One accepted send as ``GET /_sim/messages`` lists it. ``media_sizes[i]`` is the
    size of the file fetched from ``media_urls[i]``, or ``None`` when that fetch failed
    (the text still went out, as Telnyx sends it without the file)."""

    from_: str = msgspec.field(name="from")
    to: str
    text: str
    media_urls: tuple[str, ...]
    media_sizes: tuple[int | None, ...]


class AcceptedLog:
    """The newest ``per_destination`` accepted sends of each destination, oldest first.

    Destinations are kept in the order they were last written to, so when more than
    ``max_sends`` sends are held the destination written to longest ago goes first:
    a benchmark's 20,000 recipients fit, a week of them does not grow without limit.
    """

    def __init__(self, per_destination: int = 50, max_sends: int = 200_000) -> None:
        self.per_destination = per_destination
        self.max_sends = max_sends
        self._by_destination: OrderedDict[str, deque[AcceptedSend]] = OrderedDict()
        self._count = 0

    def remember(self, send: AcceptedSend) -> None:
        kept = self._by_destination.get(send.to)
        if kept is None:
            kept = self._by_destination[send.to] = deque(maxlen=self.per_destination)
        else:
            self._by_destination.move_to_end(send.to)
        if len(kept) == self.per_destination:
            self._count -= 1
        kept.append(send)
        self._count += 1
        while self._count > self.max_sends:
            _, dropped = self._by_destination.popitem(last=False)
            self._count -= len(dropped)

    def for_destination(self, to: str) -> list[AcceptedSend]:
        return list(self._by_destination.get(to, ()))

    def clear(self) -> None:
        self._by_destination.clear()
        self._count = 0


# -- files members send, served at /_sim/media/{token} ------------------------------------------

INBOUND_MEDIA_TTL_S: Final = 3600.0
"""How long the simulator serves a member's file: a provider's links to received media are
short-lived, which is why the app copies each file into its own store at once."""


class ServedFile(msgspec.Struct, frozen=True):
    content_type: str
    data: bytes
    expires_at: float


class InboundMediaStore:
    """Files of inbound MMS by unguessable token until they expire (``ttl_s``), holding at
    most ``max_bytes`` (the oldest go first). Insertion order is expiry order."""

    def __init__(self, ttl_s: float = INBOUND_MEDIA_TTL_S, max_bytes: int = 64 << 20) -> None:
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self._files: dict[str, ServedFile] = {}
        self._bytes = 0

    def _expire(self, now: float) -> None:
        files = self._files
        while files:
            oldest = next(iter(files))
            if files[oldest].expires_at > now and self._bytes <= self.max_bytes:
                return
            self._bytes -= len(files.pop(oldest).data)

    def add(self, token: str, content_type: str, data: bytes, now: float) -> None:
        self._files[token] = ServedFile(content_type, data, now + self.ttl_s)
        self._bytes += len(data)
        self._expire(now)

    def serve(
        self, base_url: str, files: tuple[InboundFile, ...], data: list[bytes], now: float
    ) -> tuple[Media, ...]:
        """Keep a member's files under fresh tokens; their entries for ``message.received``
        (``base_url``/token, in Telnyx's inbound shape)."""
        served = []
        for file, content in zip(files, data, strict=True):
            token = secrets.token_urlsafe(24)
            self.add(token, file.content_type, content, now)
            served.append(
                Media(
                    url=f"{base_url}/{token}",
                    content_type=file.content_type,
                    sha256=UNSET,
                    size=len(content),
                    hash_sha256=hashlib.sha256(content).hexdigest(),
                )
            )
        return tuple(served)

    def get(self, token: str, now: float) -> ServedFile | None:
        self._expire(now)
        found = self._files.get(token)
        return found if found is not None and found.expires_at > now else None


# -- the whole state --------------------------------------------------------------------------


class SentMessage(msgspec.Struct, frozen=True, array_like=True):
    message: Message
    final_status: RecipientStatus
    """The carrier's outcome, decided when the send was accepted."""
    final_at: float
    """Wall-clock time (s) from which the outcome is known (after the latency)."""


class SentMessages:
    """Accepted sends, for ``GET /v2/messages/{id}`` (Telnyx keeps them; we keep the
    newest ``limit``)."""

    def __init__(self, limit: int = 500_000) -> None:
        self._items: OrderedDict[str, SentMessage] = OrderedDict()
        self._limit = limit

    def remember(self, sent: SentMessage) -> None:
        self._items[sent.message.id] = sent
        if len(self._items) > self._limit:
            self._items.popitem(last=False)

    def lookup(self, message_id: str, now: float) -> Message | None:
        """The message as Telnyx reports it now: its final status once known."""
        found = self._items.get(message_id)
        if found is None:
            return None
        status: RecipientStatus = found.final_status if now >= found.final_at else "queued"
        failure = FAILURES.get(status)
        return msgspec.structs.replace(
            found.message,
            to=tuple(msgspec.structs.replace(r, status=status) for r in found.message.to),
            errors=(failure,) if failure else (),
        )

    def snapshot(self) -> list[SentMessage]:
        return list(self._items.values())


class SimulatorState:
    """Everything the simulator remembers, in process memory; one per app, used only from the
    event loop, so no locks. Time comes in as arguments so the rules stay testable."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self.identity = Identity()
        self.config = SimConfig()
        self.stats = Stats()
        self.idempotency = IdempotencyStore()
        # (church number, member number) pairs a member has opted out of with STOP.
        self.blocks: set[tuple[str, str]] = set()
        self.rng = rng or random.Random()
        self._bucket: TokenBucket | None = None
        self.sent = SentMessages()
        self.accepted = AcceptedLog()
        self.inbound_media = InboundMediaStore()

    def configure(self, patch: ConfigPatch) -> SimConfig:
        updated = apply_patch(self.config, patch)
        if updated.rate_limit_per_s != self.config.rate_limit_per_s:
            self._bucket = None
        self.config = updated
        return updated

    def reset(self) -> None:
        """Back to a fresh simulator. Webhooks already queued still go out: they belong to
        sends that were answered, and dropping them would strand the app's recipients."""
        self.config = SimConfig()
        self.stats.clear()
        self.idempotency.clear()
        self.blocks.clear()
        self.accepted.clear()
        self._bucket = None

    def admit(self, now: float) -> RateDecision | None:
        """Spend a rate-limit token; ``None`` when no limit is configured."""
        rate = self.config.rate_limit_per_s
        if rate is None:
            return None
        if self._bucket is None:
            self._bucket = TokenBucket(rate, now)
        return self._bucket.take(now)

    def record_inbound(self, req: InboundRequest) -> None:
        match keyword(req.text or ""):
            case "stop":
                self.blocks.add((req.to, req.from_))
            case "start":
                self.blocks.discard((req.to, req.from_))
            case None:
                pass

    def is_blocked(self, sender: str, to: str) -> bool:
        return (sender, to) in self.blocks

    def latency_s(self) -> float:
        low, high = self.config.latency_ms
        return self.rng.uniform(low, high) / 1000 if high else 0.0

    def plan(self) -> tuple[EventPlan, ...]:
        config = self.config
        outcome = pick_outcome(config.outcomes, self.rng)
        return plan_events(outcome, self.rng, config.duplicate_webhooks, config.reorder_webhooks)
