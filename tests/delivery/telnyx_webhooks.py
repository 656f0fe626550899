"""Telnyx status webhooks as the provider sends them, signed, for the inbound tests."""

from __future__ import annotations

import base64
import time

import msgspec
import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from deploy.stack import Stack


def sim_signer(stack: Stack) -> Ed25519PrivateKey:
    """The key the stack's simulator signs with (the app holds its public half)."""
    seed = base64.b64decode(stack.env["KOINONIA_SIM_SIGNING_SEED"])
    return Ed25519PrivateKey.from_private_bytes(seed)


def status_event(
    event_id: str, provider_id: str, status: str, event_type: str = "message.finalized"
) -> bytes:
    """A message status webhook's body for one outbound text."""
    return msgspec.json.encode(
        {
            "data": {
                "event_type": event_type,
                "id": event_id,
                "occurred_at": "2026-11-22T10:00:00.000+00:00",
                "record_type": "event",
                "payload": {
                    "id": provider_id,
                    "record_type": "message",
                    "direction": "outbound",
                    "to": [{"phone_number": "+12015550123", "status": status}],
                    "errors": [],
                },
            },
            "meta": {"attempt": 1, "delivered_to": "x"},
        }
    )


def signed_headers(
    key: Ed25519PrivateKey | None, body: bytes, stamp: int | None = None
) -> dict[str, str]:
    """Telnyx's signature headers for ``body``; with no key, a stranger's signature."""
    ts = str(stamp if stamp is not None else int(time.time()))
    signer = key or Ed25519PrivateKey.generate()
    return {
        "telnyx-timestamp": ts,
        "telnyx-signature-ed25519": base64.b64encode(
            signer.sign(ts.encode() + b"|" + body)
        ).decode(),
        "content-type": "application/json",
    }


def provider_events_seen(stack: Stack, event_id: str) -> int:
    """How many times Postgres recorded the provider event ``event_id`` (0 or 1)."""
    with psycopg.connect(stack.env["DATABASE_URL"]) as conn:
        row = conn.execute(
            "SELECT count(*) FROM provider_event WHERE event_id = %s", (event_id,)
        ).fetchone()
    return int(row[0]) if row else 0
