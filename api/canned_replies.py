"""Canned replies: /v1/canned-replies (docs/protocol.md "The inbox")."""

from __future__ import annotations

from api.operation import Operation


def canned_reply_operations() -> list[Operation]:
    return []
