"""Keywords that join groups: /v1/keywords (docs/protocol.md "Keywords that join groups")."""

from __future__ import annotations

from api.operation import Operation


def keyword_operations() -> list[Operation]:
    return []
