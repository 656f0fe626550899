"""Telnyx v2 Messaging wire shapes for the provider simulator, and the pure functions that
build them: segment counting, send validation, message and webhook event records.

The shapes follow Telnyx's v2 Messaging API (``OutboundMessagePayload`` in the
official SDKs, the ``message.sent`` / ``message.finalized`` /
``message.received`` callback examples in the API reference). Field order
mirrors Telnyx's documentation so captured bodies read the same.

``SimulatorError`` carries the HTTP status and Telnyx error objects of a
refused request; only the routes in ``delivery.simulator`` turn it into a
response.
"""

from __future__ import annotations

import base64
import random
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Annotated, Final, Literal

import msgspec
from msgspec import UNSET, UnsetType

from storage.domain.segments import Encoding, count_segments

# -- Telnyx wire shapes ---------------------------------------------------------------------

MAX_MEDIA_URLS: Final = 10
"""Telnyx takes up to 10 media URLs per MMS (and carriers deliver up to 10 files)."""
MAX_URL_LENGTH: Final = 2000
"""Telnyx error 10003: "URLs can be a maximum of 2000 characters"."""
MAX_INBOUND_FILE_BYTES: Final = 5 << 20
"""What a member may send through /_sim/inbound: more than carriers pass on (1 MiB), so
the app's own limit can be tested."""

LineType = Literal["Wireline", "Wireless", "VoWiFi", "VoIP", "Pre-Paid Wireless", ""]
RecipientStatus = Literal[
    "queued",
    "sending",
    "sent",
    "delivered",
    "sending_failed",
    "delivery_failed",
    "delivery_unconfirmed",
    "webhook_delivered",
]
Outcome = Literal["delivered", "sending_failed", "delivery_failed", "delivery_unconfirmed"]
EventType = Literal["message.sent", "message.finalized", "message.received"]


class ErrorSource(msgspec.Struct, frozen=True, omit_defaults=True):
    pointer: str | None = None
    parameter: str | None = None


class TelnyxError(msgspec.Struct, frozen=True, omit_defaults=True):
    """One entry of Telnyx's ``errors`` array; codes are strings, as Telnyx sends them."""

    code: str
    title: str
    detail: str | None = None
    source: ErrorSource | None = None


class ErrorBody(msgspec.Struct, frozen=True):
    errors: tuple[TelnyxError, ...]


class Sender(msgspec.Struct, frozen=True):
    phone_number: str
    carrier: str
    line_type: LineType


class Recipient(msgspec.Struct, frozen=True):
    phone_number: str
    status: RecipientStatus
    carrier: str
    line_type: LineType


class Media(msgspec.Struct, frozen=True):
    """One entry of a message's ``media``. Telnyx names the hash ``sha256`` on outbound
    records and ``hash_sha256`` on inbound ones; the name a record does not use stays
    ``UNSET`` and is left out of the JSON. (One struct, not two: a union of structs
    could not be decoded back from the state file.)"""

    url: str
    content_type: str | None = None
    sha256: str | UnsetType | None = None
    size: int | None = None
    hash_sha256: str | UnsetType = UNSET


class Cost(msgspec.Struct, frozen=True):
    amount: str
    currency: str = "USD"


class Message(msgspec.Struct, frozen=True, kw_only=True):
    """Telnyx's message record, as answered by ``POST /v2/messages`` and carried in webhooks."""

    record_type: Literal["message"] = "message"
    direction: Literal["outbound", "inbound"]
    id: str
    type: Literal["SMS", "MMS"]
    messaging_profile_id: str | None
    organization_id: str
    from_: Sender = msgspec.field(name="from")
    to: tuple[Recipient, ...]
    cc: tuple[Recipient, ...] = ()
    text: str
    subject: str | None
    media: tuple[Media, ...]
    webhook_url: str | None
    webhook_failover_url: str | None
    encoding: Encoding
    parts: int
    tags: tuple[str, ...] = ()
    cost: Cost | None = None
    received_at: str
    sent_at: str | None = None
    completed_at: str | None = None
    valid_until: str | None = None
    errors: tuple[TelnyxError, ...] = ()


class MessageResponse(msgspec.Struct, frozen=True):
    data: Message


class EventData(msgspec.Struct, frozen=True):
    event_type: EventType
    id: str
    occurred_at: str
    payload: Message
    record_type: Literal["event"] = "event"


class EventMeta(msgspec.Struct, frozen=True):
    attempt: int
    delivered_to: str


class WebhookEnvelope(msgspec.Struct, frozen=True):
    data: EventData
    meta: EventMeta


class SendRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Body of ``POST /v2/messages``.

    Every field is optional at decode time so that a missing ``to`` or ``from``
    gets Telnyx's own error code rather than a generic decode error. Unknown
    fields are rejected (Telnyx ignores them) so an adapter typo such as
    ``body`` for ``text`` fails loudly in development.
    """

    from_: str | None = msgspec.field(default=None, name="from")
    to: str | None = None
    text: str | None = None
    subject: str | None = None
    media_urls: tuple[str, ...] = ()
    messaging_profile_id: str | None = None
    webhook_url: str | None = None
    webhook_failover_url: str | None = None
    use_profile_webhooks: bool = True
    type: Literal["SMS", "MMS"] | None = None
    auto_detect: bool = False
    send_at: str | None = None


class InboundFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One file a member sends with ``POST /_sim/inbound``; the simulator serves it."""

    content_type: Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
    data_base64: str


class InboundRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Body of ``POST /_sim/inbound``: a member's reply to a church number, with files
    (an MMS) or without (an SMS); ``text`` may be left out only when there are files."""

    from_: str = msgspec.field(name="from")
    to: str
    text: str | None = None
    media: Annotated[tuple[InboundFile, ...], msgspec.Meta(max_length=MAX_MEDIA_URLS)] = ()


# -- errors -----------------------------------------------------------------------------------


class SimulatorError(Exception):
    """A request the simulator refuses; ``status`` and ``errors`` are what Telnyx would answer."""

    def __init__(
        self, status: int, *errors: TelnyxError, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(errors[0].detail if errors else str(status))
        self.status = status
        self.errors = errors
        self.headers = headers or {}


def error(
    status: int, code: str, title: str, detail: str, pointer: str | None = None
) -> SimulatorError:
    source = ErrorSource(pointer=pointer) if pointer else None
    return SimulatorError(status, TelnyxError(code=code, title=title, detail=detail, source=source))


def bad_request(detail: str, pointer: str | None = None, status: int = 422) -> SimulatorError:
    return error(status, "10015", "Bad Request", detail, pointer)


# -- segments ---------------------------------------------------------------------------------


def segment(text: str) -> tuple[Encoding, int]:
    """Encoding and number of SMS parts Telnyx reports for ``text``: the app's own
    counter (storage/domain/segments.py), so the two can never disagree."""
    info = count_segments(text)
    return info.encoding, info.segments


# -- messages and events ----------------------------------------------------------------------

E164: Final = re.compile(r"\+[1-9][0-9]{1,14}")
SENDER_CARRIER: Final = Sender(phone_number="", carrier="TELNYX LLC", line_type="VoIP")
MEMBER_CARRIER: Final = ("T-MOBILE USA, INC.", "Wireless")
PRICE_PER_PART: Final = 0.004
VALIDITY: Final = timedelta(hours=4)
# The sending number when a send names only a messaging profile (a Telnyx number pool).
POOL_SENDER: Final = "+18005550100"

FAILURES: Final[dict[str, TelnyxError]] = {
    "sending_failed": TelnyxError(
        code="40001",
        title="Not routable",
        detail="The destination number is not routable (landline or non-routable number).",
    ),
    "delivery_failed": TelnyxError(
        code="40008",
        title="Undeliverable",
        detail="The message could not be delivered to the handset.",
    ),
}


def iso(moment: datetime) -> str:
    """Telnyx's timestamp style: ISO 8601, milliseconds, explicit UTC offset."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")


def is_e164(number: str) -> bool:
    return E164.fullmatch(number) is not None


def validate_send(req: SendRequest) -> tuple[str, str, str]:
    """The ``(from, to, text)`` of a send, or the ``SimulatorError`` Telnyx would answer."""
    if req.to is None or req.to == "":
        raise error(400, "10004", "Missing required parameter", "'to' is required.", "/to")
    if not is_e164(req.to):
        raise error(
            400,
            "40310",
            "Invalid 'to' address",
            "The 'to' address must be a +E.164 formatted phone number.",
            "/to",
        )
    sender = req.from_
    if not sender:
        if not req.messaging_profile_id:
            raise error(
                400,
                "10004",
                "Missing required parameter",
                "'from' is required unless a messaging_profile_id is given.",
                "/from",
            )
        sender = POOL_SENDER
    text = req.text or ""
    if not text and not req.media_urls:
        raise error(
            400, "10004", "Missing required parameter", "'text' is required for SMS.", "/text"
        )
    if len(text) > 1600:
        raise bad_request("'text' exceeds the maximum of 1600 characters.", "/text")
    urls = {"webhook_url": req.webhook_url, "webhook_failover_url": req.webhook_failover_url}
    for name, url in urls.items():
        if url is not None and not url.startswith(("http://", "https://")):
            raise error(
                400, "10003", "Invalid URL", f"'{name}' must be an http(s) URL.", f"/{name}"
            )
    if len(req.media_urls) > MAX_MEDIA_URLS:
        raise bad_request(f"'media_urls' may hold at most {MAX_MEDIA_URLS} URLs.", "/media_urls")
    for index, url in enumerate(req.media_urls):
        if not url.startswith(("http://", "https://")) or len(url) > MAX_URL_LENGTH:
            raise error(
                400,
                "10003",
                "Invalid URL",
                f"media URLs must be absolute http(s) URLs of at most {MAX_URL_LENGTH} characters.",
                f"/media_urls/{index}",
            )
    return sender, req.to, text


def validate_inbound(req: InboundRequest) -> list[bytes]:
    """The files of a member's text, decoded, or the ``SimulatorError`` naming what is
    wrong with it."""
    for field, number in (("from", req.from_), ("to", req.to)):
        if not is_e164(number):
            raise error(
                422,
                "10016",
                "Phone number must be in +E.164 format",
                f"'{field}' must be a +E.164 formatted phone number.",
                f"/{field}",
            )
    if req.text is None and not req.media:
        raise error(
            422,
            "10004",
            "Missing required parameter",
            "'text' is required unless 'media' is given.",
            "/text",
        )
    files = []
    for index, file in enumerate(req.media):
        try:
            data = base64.b64decode(file.data_base64, validate=True)
        except ValueError as exc:
            raise bad_request("'data_base64' is not base64.", f"/media/{index}") from exc
        if not data or len(data) > MAX_INBOUND_FILE_BYTES:
            raise bad_request(
                f"a file must hold 1 to {MAX_INBOUND_FILE_BYTES} bytes.", f"/media/{index}"
            )
        files.append(data)
    return files


class Identity(msgspec.Struct, frozen=True):
    """The simulated account: fixed ids so captured payloads stay comparable across runs."""

    organization_id: str = str(uuid.uuid5(uuid.NAMESPACE_URL, "koinonia-simulator/org"))
    messaging_profile_id: str = str(uuid.uuid5(uuid.NAMESPACE_URL, "koinonia-simulator/profile"))


def outbound_message(
    req: SendRequest,
    sender: str,
    to: str,
    text: str,
    webhook_url: str | None,
    identity: Identity,
    message_id: uuid.UUID,
    received_at_ms: int,
) -> Message:
    """The message record for an accepted send. Deterministic in its arguments, so an
    idempotent replay rebuilds the first answer byte for byte."""
    encoding, parts = segment(text)
    is_mms = bool(req.media_urls) or req.type == "MMS"
    now = datetime.fromtimestamp(received_at_ms / 1000, UTC)
    return Message(
        direction="outbound",
        id=str(message_id),
        type="MMS" if is_mms else "SMS",
        messaging_profile_id=req.messaging_profile_id or identity.messaging_profile_id,
        organization_id=identity.organization_id,
        from_=msgspec.structs.replace(SENDER_CARRIER, phone_number=sender),
        to=(Recipient(to, "queued", *MEMBER_CARRIER),),
        text=text,
        subject=req.subject,
        media=tuple(Media(url=url) for url in req.media_urls),
        webhook_url=webhook_url,
        webhook_failover_url=req.webhook_failover_url,
        encoding=encoding,
        parts=1 if is_mms else parts,
        received_at=iso(now),
        valid_until=iso(now + VALIDITY),
    )


def inbound_message(
    req: InboundRequest,
    webhook_url: str,
    identity: Identity,
    now: datetime,
    media: tuple[Media, ...] = (),
) -> Message:
    """The ``message.received`` payload of a member's text; ``media`` are the links the
    simulator serves the member's files at, which makes it an MMS."""
    text = req.text or ""
    encoding, parts = segment(text)
    parts = 1 if media else parts  # an MMS is one message whatever its length
    return Message(
        direction="inbound",
        id=str(uuid.uuid4()),
        type="MMS" if media else "SMS",
        messaging_profile_id=identity.messaging_profile_id,
        organization_id=identity.organization_id,
        from_=Sender(req.from_, *MEMBER_CARRIER),
        to=(Recipient(req.to, "webhook_delivered", "TELNYX LLC", "VoIP"),),
        text=text,
        subject=None,
        media=media,
        webhook_url=webhook_url,
        webhook_failover_url=None,
        encoding=encoding,
        parts=parts,
        cost=Cost(amount=f"{PRICE_PER_PART * parts:.4f}"),
        received_at=iso(now),
    )


class EventPlan(msgspec.Struct, frozen=True):
    """One webhook a message will produce: decided when the send is accepted, rendered (with
    real timestamps) when it is delivered."""

    event_id: str
    event_type: EventType
    status: RecipientStatus
    duplicate: bool = False


def plan_events(
    outcome: Outcome, rng: random.Random, duplicate_p: float, reorder: bool
) -> tuple[EventPlan, ...]:
    plans: list[EventPlan] = []
    if outcome != "sending_failed":
        plans.append(EventPlan(str(uuid.uuid4()), "message.sent", "sent"))
    plans.append(EventPlan(str(uuid.uuid4()), "message.finalized", outcome))
    plans = [
        msgspec.structs.replace(p, duplicate=rng.random() < duplicate_p) if duplicate_p else p
        for p in plans
    ]
    if reorder and rng.random() < 0.5:
        plans.reverse()
    return tuple(plans)


def render_event(message: Message, plan: EventPlan, sent_at: datetime) -> EventData:
    """The webhook ``data`` for ``plan``; ``sent_at`` is when the carrier took the message and
    the finalized event completes at that same instant."""
    if plan.event_type == "message.received":
        return EventData(plan.event_type, plan.event_id, message.received_at, message)
    stamp = iso(sent_at)
    failed = plan.status == "sending_failed"
    failure = FAILURES.get(plan.status)
    payload = msgspec.structs.replace(
        message,
        to=tuple(msgspec.structs.replace(r, status=plan.status) for r in message.to),
        sent_at=None if failed else stamp,
        completed_at=stamp if plan.event_type == "message.finalized" else None,
        # Telnyx nulls valid_until once the message has left its queue.
        valid_until=None,
        cost=None if failed else Cost(amount=f"{PRICE_PER_PART * message.parts:.4f}"),
        errors=(failure,) if failure else (),
    )
    return EventData(plan.event_type, plan.event_id, stamp, payload)
