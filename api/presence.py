"""Who is here: GET /v1/presence (docs/protocol.md "The inbox")."""

from __future__ import annotations

from api.operation import Operation


def presence_operations() -> list[Operation]:
    return []
