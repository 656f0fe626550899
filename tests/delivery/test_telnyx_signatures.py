from __future__ import annotations

import base64
import time

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from delivery.errors import SignatureRejected
from delivery.telnyx import interpret
from delivery.telnyx_signatures import load_public_key, verify_telnyx

BODY = b'{"data":{"event_type":"message.sent","id":"e1","payload":{"id":"m1"}}}'


def _keys() -> tuple[Ed25519PrivateKey, str]:
    private = Ed25519PrivateKey.generate()
    public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return private, base64.b64encode(public).decode()


def _sign(private: Ed25519PrivateKey, ts: str, body: bytes) -> str:
    return base64.b64encode(private.sign(ts.encode() + b"|" + body)).decode()


def test_valid_signature_passes() -> None:
    private, public = _keys()
    now = time.time()
    ts = str(int(now))
    verify_telnyx(
        load_public_key(public), BODY, ts, _sign(private, ts, BODY), now=now, tolerance_s=300
    )


def test_tampered_body_is_rejected() -> None:
    private, public = _keys()
    now = time.time()
    ts = str(int(now))
    with pytest.raises(SignatureRejected, match="does not verify"):
        verify_telnyx(
            load_public_key(public),
            BODY + b" ",
            ts,
            _sign(private, ts, BODY),
            now=now,
            tolerance_s=300,
        )


def test_stale_timestamp_is_rejected() -> None:
    private, public = _keys()
    now = time.time()
    ts = str(int(now) - 301)
    with pytest.raises(SignatureRejected, match="tolerance"):
        verify_telnyx(
            load_public_key(public), BODY, ts, _sign(private, ts, BODY), now=now, tolerance_s=300
        )


def test_other_key_and_missing_headers_are_rejected() -> None:
    private, _ = _keys()
    _, other_public = _keys()
    now = time.time()
    ts = str(int(now))
    with pytest.raises(SignatureRejected):
        verify_telnyx(
            load_public_key(other_public),
            BODY,
            ts,
            _sign(private, ts, BODY),
            now=now,
            tolerance_s=300,
        )
    with pytest.raises(SignatureRejected, match="missing"):
        verify_telnyx(load_public_key(other_public), BODY, None, None, now=now, tolerance_s=300)
    with pytest.raises(SignatureRejected):
        verify_telnyx(load_public_key(other_public), BODY, ts, "%%%", now=now, tolerance_s=300)


def test_provider_answers_are_interpreted() -> None:
    ok = interpret(200, b'{"data":{"id":"abc","record_type":"message"}}', httpx.Headers())
    assert ok.ok
    assert ok.provider_message_id == "abc"
    limited = interpret(429, b'{"errors":[{"code":"10011"}]}', httpx.Headers({"Retry-After": "3"}))
    assert limited.retryable
    assert limited.retry_after_s == 3.0
    assert limited.error_code == "10011"
    outage = interpret(503, b"", httpx.Headers())
    assert outage.retryable
    assert outage.error_code == "http_503"
    blocked = interpret(400, b'{"errors":[{"code":"40300","title":"Blocked"}]}', httpx.Headers())
    assert not blocked.ok
    assert not blocked.retryable
    assert blocked.error_code == "40300"
