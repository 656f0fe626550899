"""SMS segment counting: GSM-7 160/153 per part, UCS-2 70/67.

GSM-7 extension characters take two septets (an escape plus the character).
UCS-2 counts UTF-16 code units, so a character outside the BMP (most emoji)
takes two.
"""

from __future__ import annotations

import msgspec

_GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞ\x1bÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
_GSM7_EXTENSION = frozenset("^{}\\[~]|€\f")


class SegmentInfo(msgspec.Struct, frozen=True):
    encoding: str
    """``GSM-7`` or ``UCS-2``."""
    segments: int
    units: int
    """Septets (GSM-7) or UTF-16 code units (UCS-2) the body takes."""


def count_segments(body: str) -> SegmentInfo:
    septets = 0
    for ch in body:
        if ch in _GSM7_BASIC:
            septets += 1
        elif ch in _GSM7_EXTENSION:
            septets += 2
        else:
            units = len(body.encode("utf-16-le")) // 2
            return SegmentInfo("UCS-2", _parts(units, 70, 67), units)
    return SegmentInfo("GSM-7", _parts(septets, 160, 153), septets)


def _parts(units: int, single: int, multi: int) -> int:
    if units <= single:
        return 1
    return -(-units // multi)
