"""WebSocket frames (docs/protocol.md "Realtime over WebSocket"), as msgspec tagged unions.

Client frames are decoded by one module-level decoder into
``ClientFrame = Subscribe | Unsubscribe | Ping | Typing | Viewing`` and dispatched with
``match``; unknown types and unknown fields are rejected (the endpoint answers
``bad_frame``). Server frames other than ``event`` are encoded here; ``event``
frames arrive already encoded from Redis and are never re-encoded.

Schema evolution: new fields get defaults, field types never change.
"""

from __future__ import annotations

import uuid
from typing import Annotated

import msgspec

RequestId = Annotated[str, msgspec.Meta(max_length=128)]


class _ClientFrame(
    msgspec.Struct, tag_field="type", forbid_unknown_fields=True, frozen=True, kw_only=True
):
    pass


class Since(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    offset: Annotated[str, msgspec.Meta(max_length=64)]
    epoch: Annotated[str, msgspec.Meta(max_length=64)]


class Subscribe(_ClientFrame, tag="subscribe", frozen=True, kw_only=True):
    channel: Annotated[str, msgspec.Meta(max_length=200)]
    id: RequestId | None = None
    since: Since | None = None


class Unsubscribe(_ClientFrame, tag="unsubscribe", frozen=True, kw_only=True):
    channel: Annotated[str, msgspec.Meta(max_length=200)]
    id: RequestId | None = None


class Ping(_ClientFrame, tag="ping", frozen=True, kw_only=True):
    id: RequestId | None = None


class Typing(_ClientFrame, tag="typing", frozen=True, kw_only=True):
    conversation_id: uuid.UUID


class Viewing(_ClientFrame, tag="viewing", frozen=True, kw_only=True):
    conversation_id: uuid.UUID | None
    """The conversation the connection now views; null when it left it. Required:
    a frame without it is malformed, not a way to leave."""


ClientFrame = Subscribe | Unsubscribe | Ping | Typing | Viewing

_client_decoder: msgspec.json.Decoder[ClientFrame] = msgspec.json.Decoder(ClientFrame)


class BadFrame(Exception):
    """A client frame that is not JSON or not one of ClientFrame; message says why."""


def decode_client(data: str | bytes) -> ClientFrame:
    try:
        return _client_decoder.decode(data)
    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError subclass
        raise BadFrame(str(exc)) from None


class _ServerFrame(msgspec.Struct, tag_field="type", omit_defaults=True, frozen=True, kw_only=True):
    pass


class Welcome(_ServerFrame, tag="welcome", frozen=True, kw_only=True):
    connection_id: str
    heartbeat_s: int


class Subscribed(_ServerFrame, tag="subscribed", frozen=True, kw_only=True):
    id: str | None = None
    channel: str
    offset: str
    epoch: str
    recovered: bool


class Unsubscribed(_ServerFrame, tag="unsubscribed", frozen=True, kw_only=True):
    id: str | None = None
    channel: str


class Error(_ServerFrame, tag="error", frozen=True, kw_only=True):
    id: str | None = None
    code: str
    message: str


class Pong(_ServerFrame, tag="pong", frozen=True, kw_only=True):
    id: str | None = None


ServerFrame = Welcome | Subscribed | Unsubscribed | Error | Pong

_server_encoder = msgspec.json.Encoder()


def encode_text(frame: ServerFrame) -> str:
    """A server frame as the text an ASGI ``websocket.send`` carries."""
    return _server_encoder.encode(frame).decode()
