"""SMS segment counting, the one counter the app and the provider simulator share.

GSM-7 (3GPP TS 23.038 default alphabet) fits 160 septets in a single part and 153
in each part of a concatenated message (the user-data header takes the rest);
UCS-2 fits 70 UTF-16 code units, 67 per part. An extension-table character costs
two septets (the escape and the character) and a character outside the Basic
Multilingual Plane two UTF-16 units (a surrogate pair); neither may straddle two
parts, because a handset cannot reassemble half of one, so a part that has one
septet (or unit) left for a two-wide character closes early. That is why
``'a'*152 + '€' + 'a'*152`` is 3 parts, not ``ceil(306 / 153) = 2``.

``tests/vectors/segments.json`` holds the cases every counter must pass: this one,
and any other written later (a composer counting in the browser must pass them too).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final, Literal

import msgspec

Encoding = Literal["GSM-7", "UCS-2"]

GSM7_BASIC: Final = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
"""The default alphabet without the escape code itself (127 characters): a literal
ESC in a text is not representable, so it makes the text UCS-2."""
GSM7_EXTENSION: Final = frozenset("\f^{}\\[]~|€")
"""Characters of the extension table: an escape plus the character, two septets."""

GSM7_SINGLE, GSM7_PART = 160, 153
UCS2_SINGLE, UCS2_PART = 70, 67


class SegmentInfo(msgspec.Struct, frozen=True):
    encoding: Encoding
    segments: int
    units: int
    """Septets (GSM-7) or UTF-16 code units (UCS-2) the body takes."""


def count_segments(body: str) -> SegmentInfo:
    """Encoding and parts of ``body`` as a carrier splits it (an empty body is one part)."""
    if all(ch in GSM7_BASIC or ch in GSM7_EXTENSION for ch in body):
        widths = [2 if ch in GSM7_EXTENSION else 1 for ch in body]
        return SegmentInfo("GSM-7", _parts(widths, GSM7_SINGLE, GSM7_PART), sum(widths))
    widths = [2 if ord(ch) > 0xFFFF else 1 for ch in body]
    return SegmentInfo("UCS-2", _parts(widths, UCS2_SINGLE, UCS2_PART), sum(widths))


def _parts(widths: Iterable[int], single: int, multi: int) -> int:
    """Parts needed for characters of these widths, none split across two parts."""
    widths = list(widths)
    if sum(widths) <= single:
        return 1
    parts, used = 1, 0
    for width in widths:
        if used + width > multi:
            parts += 1
            used = 0
        used += width
    return parts
