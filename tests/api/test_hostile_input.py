"""Bad input gets a clear error and changes nothing, on every JSON route.

Walks the operation registry: each route that takes a JSON body is sent invalid
UTF-8, JSON under other content types (what a page on another site may send without
a CORS preflight), and hostile shapes. Every answer is a 4xx in the one envelope,
and not a row of the church, nor any new church or staff user, is written.
"""

from __future__ import annotations

import asyncio
import os
import struct
import uuid
from typing import Any

import psycopg
import pytest

from api.routes import operations
from deploy.stack import Stack
from storage.domain.envelope import STATUS
from tests.conftest import Church

_TABLES = (
    "staff_user",
    "api_key",
    "branch",
    "member_group",
    "member",
    "group_membership",
    "message",
    "conversation",
    "conversation_message",
    "canned_reply",
    "group_keyword",
    "webhook_endpoint",
    "audit_log",
    "staff_invitation",
    "message_template",
    "recurring_message",
)

_BAD_BODIES: list[tuple[str, bytes, str, str | None]] = [
    ("invalid UTF-8", b'{"name": "\xff\xfe"}', "application/json", "bad_request"),
    ("lone surrogate bytes", b'{"body": "\xed\xa0\x80"}', "application/json", "bad_request"),
    ("JSON as text/plain", b'{"name": "x"}', "text/plain", "unsupported_media_type"),
    (
        "JSON as a form",
        b'{"name": "x"}',
        "application/x-www-form-urlencoded",
        "unsupported_media_type",
    ),
    ("JSON with no type", b'{"name": "x"}', "", "unsupported_media_type"),
    ("not JSON", b"{name: x}", "application/json", "bad_request"),
    ("deep nesting", b"[" * 20_000 + b"]" * 20_000, "application/json", None),
    ("an array", b"[1, 2, 3]", "application/json", None),
    ("a string", b'"hello"', "application/json", None),
    ("a huge number", b'{"limit": 1e999999}', "application/json", None),
    ("NUL in text", b'{"name": "a\\u0000b", "body": "a\\u0000b"}', "application/json", None),
    ("operator injection", b'{"name": {"$gt": ""}, "body": {"$ne": 1}}', "application/json", None),
    ("unknown fields", b'{"zzz_unknown": 1}', "application/json", None),
]


def _rows(stack: Stack, church_id: str) -> dict[str, int]:
    with psycopg.connect(stack.env["DATABASE_URL"], autocommit=True) as conn:
        counts = {
            table: int(
                conn.execute(
                    f"SELECT count(*) FROM {table} WHERE church_id = %s", (uuid.UUID(church_id),)
                ).fetchone()[0]  # type: ignore[index]
            )
            for table in _TABLES
        }
        for table in ("church", "staff_user"):
            row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
            counts[f"all {table}"] = int(row[0]) if row else 0
    return counts


def test_every_json_route_refuses_hostile_bodies_and_writes_nothing(
    church: Church, stack: Stack
) -> None:
    routes = [
        op for op in operations() if op.body is not None and op.body_media_type.endswith("json")
    ]
    assert len(routes) > 20, "the registry lists the JSON routes"
    before = _rows(stack, church.id)
    failures: list[str] = []
    for op in routes:
        path = op.path
        for name in op.path_params:
            path = path.replace("{" + name + "}", str(uuid.uuid4()))
        client = church.session if op.session_only or op.scope is None else church.api
        for label, body, content_type, code in _BAD_BODIES:
            headers = {"Content-Type": content_type} if content_type else {}
            answer = client.request(op.method, path, content=body, headers=headers)
            where = f"{op.method} {op.path} ({label})"
            if not 400 <= answer.status_code < 500:
                failures.append(f"{where}: {answer.status_code}")
                continue
            envelope: dict[str, Any] = answer.json()
            if envelope.get("success") is not False or envelope["error"]["code"] not in STATUS:
                failures.append(f"{where}: not the error envelope: {answer.text[:120]}")
                continue
            if code is not None and not op.path_params and envelope["error"]["code"] != code:
                failures.append(f"{where}: {envelope['error']['code']}, expected {code}")
    assert not failures, "\n".join(failures[:40])
    assert _rows(stack, church.id) == before


def test_a_json_body_under_a_json_suffix_type_is_read(church: Church) -> None:
    """``application/<x>+json`` is JSON too; a charset parameter changes nothing."""
    for content_type in ("application/merge-patch+json", "application/json; charset=utf-8"):
        answer = church.api.post(
            "/v1/groups", content=b'{"name": "Ushers"}', headers={"Content-Type": content_type}
        )
        assert answer.status_code == 201, answer.text


# -- WebSocket protocol violations ----------------------------------------------------------


def _frame(opcode: int, payload: bytes, *, rsv: int = 0) -> bytes:
    """One masked client frame (RFC 6455 section 5.2)."""
    mask = os.urandom(4)
    head = bytes([0x80 | rsv << 4 | opcode])
    length = len(payload)
    if length < 126:
        head += bytes([0x80 | length])
    else:
        head += bytes([0x80 | 126]) + struct.pack("!H", length)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def _close_code_after(port: int, key: str, frame: bytes) -> int | None:
    """Open a WebSocket by hand, send ``frame``, return the close code the server sends
    (None when it drops the connection without a close frame)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            (
                "GET /v1/realtime HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {key}\r\n\r\n"
            ).encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101"), head
        writer.write(frame)
        await writer.drain()
        while True:
            first = await asyncio.wait_for(reader.readexactly(2), 5)
            length = first[1] & 0x7F
            if length == 126:
                length = struct.unpack("!H", await reader.readexactly(2))[0]
            payload = await reader.readexactly(length)
            if first[0] & 0x0F == 0x8:
                return int(struct.unpack("!H", payload[:2])[0]) if len(payload) >= 2 else None
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("label", "frame", "code"),
    [
        ("invalid UTF-8 in a text frame", _frame(0x1, b'{"type":"ping","id":"\xff"}'), 1007),
        ("a reserved opcode", _frame(0x3, b"x"), 1002),
        ("an RSV bit without an extension", _frame(0x1, b"{}", rsv=0b100), 1002),
    ],
)
def test_websocket_protocol_violations_close_with_the_rfc_code(
    church: Church, stack: Stack, label: str, frame: bytes, code: int
) -> None:
    got = asyncio.run(_close_code_after(stack.http_port, church.key, frame))
    assert got == code, f"{label}: close code {got}"


def test_the_hand_made_client_speaks_valid_websocket(church: Church, stack: Stack) -> None:
    """The helper above is a real client: a well-formed close gets its echo (1000)."""
    close = _frame(0x8, struct.pack("!H", 1000))
    assert asyncio.run(_close_code_after(stack.http_port, church.key, close)) == 1000
