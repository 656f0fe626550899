"""The provider port: what the delivery core needs from an SMS provider.

``send(batch) -> results`` and ``lookup(id)`` (a receipt that never came); one
adapter per module (delivery/telnyx.py speaks
Telnyx v2 over HTTP, and the simulator answers in the same wire format, so the
core never knows which one it talks to).
"""

from __future__ import annotations

from typing import Protocol

import msgspec


class SendRequest(msgspec.Struct, frozen=True):
    from_number: str
    to: str
    text: str
    webhook_url: str | None
    idempotency_key: str
    """Stable for every attempt at one recipient, so a repeat never texts twice."""
    media_urls: list[str] = []
    """MMS files as absolute, expiring links the provider fetches without our
    credentials (storage/domain/media_links.py); empty for an SMS."""


class SendResult(msgspec.Struct, frozen=True):
    ok: bool
    provider_message_id: str | None = None
    retryable: bool = False
    """A failure worth another attempt (429, 5xx, timeout, connection error)."""
    error_code: str | None = None
    retry_after_s: float | None = None
    throttled: bool = False
    """The provider refused for its rate (429): wait ``retry_after_s`` and send again;
    it says nothing about this recipient, so it never uses up an attempt."""
    unavailable: bool = False
    """The provider did not serve the request (5xx, 408, timeout, connection error):
    counted by the circuit breaker; an attempt only while the circuit stays closed."""


class Lookup(msgspec.Struct, frozen=True):
    """What the provider says of one sent message now (``GET /v2/messages/{id}``)."""

    status: str
    """The provider's own word for the recipient (Telnyx ``to[].status``)."""
    error_code: str | None = None


class Provider(Protocol):
    async def send(self, batch: list[SendRequest]) -> list[SendResult]: ...

    async def lookup(self, provider_message_id: str) -> Lookup | None:
        """The message's status at the provider; None when it does not know it or
        cannot say now (the caller asks again later)."""
        ...

    async def aclose(self) -> None: ...
