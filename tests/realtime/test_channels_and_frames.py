"""Channel names and frame decoding: pure."""

from __future__ import annotations

import uuid

import msgspec
import pytest

from realtime.channels import parse
from realtime.errors import UnknownChannel
from realtime.frames import (
    BadFrame,
    Error,
    Ping,
    Subscribe,
    Subscribed,
    Typing,
    decode_client,
    encode_text,
)

ID = "0190E7F5-3C2E-7D4B-9A1C-5F0E6D7C8B9A"


def test_church_wide_channels() -> None:
    assert parse("inbox").name == "inbox"
    assert parse("dashboard").id is None


def test_per_row_channels_are_canonicalised() -> None:
    ref = parse(f"message:{ID}")
    assert ref.kind == "message"
    assert ref.id == uuid.UUID(ID)
    assert ref.name == f"message:{ID.lower()}"
    assert parse(f"conversation:{ID.lower()}").kind == "conversation"


@pytest.mark.parametrize(
    "name",
    [
        "",
        "Inbox",
        "inbox:1",
        "message",
        "message:",
        "message:not-a-uuid",
        f"message:{ID.replace('-', '')}",
        f"message:{{{ID}}}",
        f"member:{ID}",
        "x" * 500,
    ],
)
def test_malformed_names_are_unknown(name: str) -> None:
    with pytest.raises(UnknownChannel):
        parse(name)


def test_client_frames_decode_into_the_tagged_union() -> None:
    frame = decode_client(
        '{"type":"subscribe","id":"r1","channel":"inbox","since":{"offset":"1-0","epoch":"e"}}'
    )
    assert isinstance(frame, Subscribe)
    assert frame.since is not None
    assert frame.since.offset == "1-0"
    assert decode_client(b'{"type":"ping","id":"r3"}') == Ping(id="r3")
    typing = decode_client(f'{{"type":"typing","conversation_id":"{ID}"}}')
    assert isinstance(typing, Typing)


@pytest.mark.parametrize(
    "raw",
    [
        "not json",
        "[]",
        '{"type":"shout"}',
        '{"channel":"inbox"}',
        '{"type":"subscribe"}',
        '{"type":"ping","id":"r1","extra":1}',
        '{"type":"subscribe","channel":"inbox","since":{"offset":"1-0"}}',
        '{"type":"typing","conversation_id":"nope"}',
    ],
)
def test_bad_frames(raw: str) -> None:
    with pytest.raises(BadFrame):
        decode_client(raw)


def test_server_frames() -> None:
    subscribed = msgspec.json.decode(
        encode_text(Subscribed(channel="inbox", offset="0-0", epoch="e", recovered=False))
    )
    assert subscribed == {
        "type": "subscribed",
        "channel": "inbox",
        "offset": "0-0",
        "epoch": "e",
        "recovered": False,
    }
    error = msgspec.json.decode(encode_text(Error(id="r1", code="forbidden", message="no")))
    assert error == {"type": "error", "id": "r1", "code": "forbidden", "message": "no"}
