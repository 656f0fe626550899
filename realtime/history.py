"""Channel history: offsets, and recovering what a client missed.

Offsets are Redis stream ids ``<ms>-<seq>``. Clients treat them as opaque
strings; inside we compare them as ``(ms, seq)`` integer tuples, because string
order is wrong (``"9-0" > "10-0"``).

Recovery (``since``) is possible when the channel's epoch is the one the client
holds and nothing after its offset has been removed. Trimming removes the
oldest entries first, so while the oldest entry kept (XINFO STREAM
``first-entry``) is at or before the client's offset, everything after it is
still there; ``entries-added`` minus ``length`` counts what was removed. XTRIM
does not move ``max-deleted-entry-id`` (only XDEL does), so that field only
guards against deletions in the middle. The check and the read run in one
MULTI so a trim cannot slip between them.
"""

from __future__ import annotations

import uuid
from typing import Any

import msgspec

from storage.redis import key_names
from storage.redis.connection import Redis, riding_slot_moves
from storage.redis.publisher import EventPublisher

Position = tuple[int, int]
ZERO: Position = (0, 0)


def position(offset: str | bytes) -> Position:
    """``"1700000000000-3"`` as ``(1700000000000, 3)``; ValueError when malformed."""
    text = offset.decode() if isinstance(offset, bytes) else offset
    ms, sep, seq = text.partition("-")
    if not sep or not ms.isdigit() or not seq.isdigit():
        raise ValueError(f"malformed offset {text!r}")
    return int(ms), int(seq)


class Entry(msgspec.Struct, frozen=True, gc=False):
    """One history entry: its offset, event type and event JSON."""

    offset: str
    type: str
    event_json: bytes


class Replay(msgspec.Struct, frozen=True):
    """Where a new subscription starts, and what to send before going live."""

    epoch: str
    offset: str
    """The channel's latest offset: the last replayed entry, or the head."""
    recovered: bool
    entries: list[Entry]

    @property
    def position(self) -> Position:
        return position(self.offset)


def entry_from_stream(entry_id: bytes | str, fields: dict[bytes, bytes]) -> Entry:
    offset = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return Entry(offset=offset, type=fields[b"t"].decode(), event_json=fields[b"e"])


async def recover(
    redis: Redis,
    publisher: EventPublisher,
    church_id: uuid.UUID,
    channel: str,
    since: tuple[str, str] | None,
) -> Replay:
    """The replay for a subscription; ``since`` is the client's (offset, epoch).

    Call it after the hub confirmed the subscription, so that nothing published
    meanwhile falls between the replay and live delivery.
    """
    head = await publisher.head(church_id, channel)
    fresh = Replay(epoch=head.epoch, offset=head.offset, recovered=False, entries=[])
    if since is None:
        return fresh
    since_offset, since_epoch = since
    if since_epoch != head.epoch:
        return fresh
    try:
        start = position(since_offset)
    except ValueError:
        return fresh
    history = key_names.channel_history(church_id, channel)

    async def read() -> list[Any]:
        async with redis.pipeline(transaction=True) as pipe:
            pipe.get(key_names.channel_epoch(church_id, channel))
            pipe.xinfo_stream(history)
            pipe.xrange(history, f"({start[0]}-{start[1]}", "+")
            return list(await pipe.execute(raise_on_error=False))

    # A transaction met by a slot migration ran nothing: read again.
    epoch, info, raw_entries = await riding_slot_moves(read)
    if isinstance(epoch, bytes):
        epoch = epoch.decode()
    if epoch != since_epoch or isinstance(raw_entries, Exception):
        return fresh
    if not recoverable(start, info):
        return fresh
    entries = [entry_from_stream(entry_id, fields) for entry_id, fields in raw_entries]
    offset = entries[-1].offset if entries else f"{start[0]}-{start[1]}"
    return Replay(epoch=since_epoch, offset=offset, recovered=True, entries=entries)


def recoverable(start: Position, info: Any) -> bool:
    """Whether a stream (``info``: its XINFO STREAM, or the error for a missing one)
    still holds every entry after ``start``."""
    if isinstance(info, Exception):
        # No stream under a live epoch: the channel has had no event in this epoch.
        return start == ZERO
    last_generated = position(info["last-generated-id"])
    if start > last_generated:
        return False  # an offset this epoch never issued
    max_deleted = info.get("max-deleted-entry-id")
    if max_deleted is not None and position(max_deleted) > start:
        return False  # an entry after the client's was deleted
    added, length = info.get("entries-added"), info.get("length")
    removed = None if added is None or length is None else added - length
    if removed is not None and removed <= 0:
        return True  # nothing was ever removed
    first = info.get("first-entry")
    if first is None:
        return start == last_generated  # all removed: only a client that had them all
    if position(first[0]) <= start:
        return True  # the client's entry, or an older one, is still kept
    # The client's own entry was trimmed. Every offset of this epoch is at or after
    # the stream's first entry, so if that was the only one removed, it was the
    # client's (an empty channel's placeholder, say) and nothing after it went.
    return removed == 1
