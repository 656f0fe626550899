"""Every WebSocket close code the server sends, in one place (docs/protocol.md "close
code" table; tests/realtime/test_close_codes.py keeps the two equal)."""

from __future__ import annotations

from enum import IntEnum


class CloseCode(IntEnum):
    DRAINING = 1001
    """The server is shutting down (realtime/websocket.py ``Sessions.drain``)."""
    PROTOCOL_ERROR = 1002
    """A protocol violation (reserved opcode, RSV bit): wsproto's code, echoed by
    realtime/protocol.py ``LeanWSProtocol.handle_close``."""
    INVALID_DATA = 1007
    """Invalid UTF-8 in a text frame: wsproto's code, echoed the same way."""
    POLICY = 1008
    """Repeated malformed frames."""
    REFUSED = 1008
    """A refused handshake, only when the server cannot answer it with HTTP 401
    (an alias of ``POLICY``: the same code on the wire)."""
    TOO_BIG = 1009
    """A frame over ``Limits.max_frame_bytes``."""
    REVOKED = 4001
    """Credentials expired or revoked during the connection."""
    SLOW_CONSUMER = 4008
    """The send queue overflowed: the client reads slower than its events arrive."""
    TOO_MANY = 4029
    """Too many connections (per node, per church), or frames kept coming far past the
    rate limit."""
