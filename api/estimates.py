"""Send estimates: POST /v1/messages/estimate (docs/protocol.md "Send estimates")."""

from __future__ import annotations

from api.operation import Operation


def estimate_operations() -> list[Operation]:
    return []
