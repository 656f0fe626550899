"""Media (MMS): POST /v1/media and reading files back (docs/protocol.md "Media (MMS)")."""

from __future__ import annotations

from api.operation import Operation


def media_operations() -> list[Operation]:
    return []
