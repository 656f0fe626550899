"""Errors raised inside the realtime package.

The tree::

    RealtimeError
    ├── ChannelError          a channel a caller asked for cannot be served (carries ``code``)
    │   ├── UnknownChannel    the name is malformed or of no known kind   (code ``unknown_channel``)
    │   └── ForbiddenChannel  not the caller's to read, or does not exist (code ``forbidden``)
    └── HubStopped            a subscription was asked of a hub that is not running

They carry data and no transport knowledge: the WebSocket endpoint turns a
``ChannelError`` into an ``error`` frame, the SSE endpoint into a 403 envelope.
"""

from __future__ import annotations


class RealtimeError(Exception):
    pass


class ChannelError(RealtimeError):
    code = "channel_error"

    def __init__(self, channel: str, message: str) -> None:
        super().__init__(message)
        self.channel = channel
        self.message = message


class UnknownChannel(ChannelError):
    code = "unknown_channel"


class ForbiddenChannel(ChannelError):
    code = "forbidden"


class HubStopped(RealtimeError):
    pass
