"""What a file is, judged by its first bytes, never by its name or declared type.

Carriers take JPEG, PNG, GIF, MP4, MP3, vCard and PDF on MMS (docs/protocol.md
"Media (MMS)"); anything else is refused before it is stored. A declared
``Content-Type`` is a claim by the uploader (or by a carrier's link) and is not
trusted: a script named ``flyer.jpg`` is still a script.
"""

from __future__ import annotations

MAX_MEDIA_BYTES = 1_048_576
"""Carriers' limit for one MMS file."""

MAX_MEDIA_PER_MESSAGE = 10

ALLOWED = (
    "image/jpeg",
    "image/png",
    "image/gif",
    "video/mp4",
    "audio/mpeg",
    "text/vcard",
    "application/pdf",
)


def sniff(data: bytes) -> str | None:
    """The content type of ``data`` when it is one carriers take, else None."""
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data.startswith(b"%PDF-"):
        return "application/pdf"
    if len(data) >= 12 and data[4:8] == b"ftyp" and _is_mp4_brand(data[8:12]):
        return "video/mp4"
    if data.startswith(b"ID3") or _is_mpeg_audio_frame(data):
        return "audio/mpeg"
    if _is_vcard(data):
        return "text/vcard"
    return None


_MP4_BRANDS = (
    b"isom",
    b"iso2",
    b"iso4",
    b"iso5",
    b"iso6",
    b"mp41",
    b"mp42",
    b"avc1",
    b"M4V ",
    b"M4A ",
    b"MSNV",
    b"dash",
    b"3gp4",
    b"3gp5",
    b"3gp6",
    b"qt  ",
)


def _is_mp4_brand(brand: bytes) -> bool:
    return brand in _MP4_BRANDS


def _is_mpeg_audio_frame(data: bytes) -> bool:
    """An MPEG-1/2 Layer III frame header: 11 sync bits, layer III, a bitrate index
    that is neither free (0) nor bad (15), a sampling rate index that is not 3."""
    if len(data) < 4 or data[0] != 0xFF or (data[1] & 0xE0) != 0xE0:
        return False
    layer = (data[1] >> 1) & 0x03
    version = (data[1] >> 3) & 0x03
    bitrate = data[2] >> 4
    rate = (data[2] >> 2) & 0x03
    return layer == 0b01 and version != 0b01 and bitrate not in (0, 15) and rate != 3


def _is_vcard(data: bytes) -> bool:
    head = data[:64].removeprefix(b"\xef\xbb\xbf").lstrip(b" \t\r\n")
    return head[:11].upper() == b"BEGIN:VCARD" and b"END:VCARD" in data[-64:].upper()


EXTENSIONS = {
    "image/jpeg": "jpg",
    "image/png": "png",
    "image/gif": "gif",
    "video/mp4": "mp4",
    "audio/mpeg": "mp3",
    "text/vcard": "vcf",
    "application/pdf": "pdf",
}
