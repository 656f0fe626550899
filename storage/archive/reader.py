"""Reading archived months through the same endpoints as live ones.

A month's rows are in Postgres until the archiver drops its partitions, then only
in its files (storage/pg/archive_index.py says when each is read), so every read
here asks the live tables first and the archive for what they no longer hold:
rows come back as the Structs the live reads return, with ``archived=True``.

Each web process keeps the files it read recently (``FileCache``): the first read
of a church's month fetches the file (at most a few MB), later reads of it only
decode the frames they need. Object keys carry the file's checksum, so what is
under a key never changes and a cached file is never stale.

Methods take the connection first, like the repository reads, so the API runs
them through ``api.listing.read`` (a replica or the primary): a read sees the
index and the live tables of one server, so a month is never read from both
places or from neither.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, time, timedelta
from typing import TypeVar, cast

import msgspec

from storage.archive.format import VerificationFailed, read_key, read_month
from storage.archive.schema import (
    ArchivedConversationMessage,
    ArchivedMessage,
    ArchivedRecipient,
    Table,
)
from storage.domain.errors import NotFound
from storage.domain.events import Counts, MediaItem
from storage.domain.ids import created_at_of
from storage.domain.statuses import ALL_STATUSES
from storage.objects.port import ObjectStore
from storage.pg.archive_index import (
    IndexedFile,
    archived_file,
    archived_files,
    erased_conversations,
)
from storage.pg.conversations import (
    ConversationMessage,
    get_conversation,
    list_conversation_messages,
)
from storage.pg.database import Conn
from storage.pg.freshness import stale_ok
from storage.pg.messages import Message, MessageFilter, Target, list_messages
from storage.pg.pagination import Cursor, Page, decode_cursor, page_of
from storage.pg.partitions import month_start, next_month
from storage.pg.recipients import Recipient

T = TypeVar("T")

AHEAD = 4
"""Archived months fetched at once by a page that runs through several."""
HASH_IN_THREAD = 1 << 20
"""Files this large are hashed off the event loop (hashlib releases the GIL), so a
20 MB file's 40 ms of hashing does not stall every other request of the process."""


class FileCache:
    """Archive files by object key, least recently used dropped first once their
    bytes pass ``capacity``; a file larger than the whole capacity is not kept.

    Concurrent first reads of one key share one fetch: a thundering herd on a
    church's month costs one GET. The fetch runs as its own task, so a caller that
    gives up (a client gone) does not fail the others waiting on it. A failed
    fetch is not remembered: the next read tries again.
    """

    def __init__(self, store: ObjectStore, capacity: int) -> None:
        self._store = store
        self._capacity = capacity
        self._files: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0
        self._loading: dict[str, asyncio.Task[bytes]] = {}

    @property
    def size(self) -> int:
        """Bytes held."""
        return self._bytes

    def __contains__(self, key: str) -> bool:
        return key in self._files

    async def get(self, file: IndexedFile) -> bytes:
        """The file's bytes, checked against the index's checksum and size when
        fetched (``VerificationFailed``: the object is not what was archived, and
        nothing of it is returned). ObjectStoreError when the store fails."""
        data = self._files.get(file.object_key)
        if data is not None:
            self._files.move_to_end(file.object_key)
            return data
        task = self._loading.get(file.object_key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._load(file))
            self._loading[file.object_key] = task
            task.add_done_callback(lambda _: self._loading.pop(file.object_key, None))
        return await asyncio.shield(task)

    async def _load(self, file: IndexedFile) -> bytes:
        data = await self._store.get(file.object_key)
        if len(data) >= HASH_IN_THREAD:
            digest = await asyncio.to_thread(_sha256, data)
        else:
            digest = _sha256(data)
        if digest != file.sha256.lower() or len(data) != file.bytes:
            raise VerificationFailed(
                f"{file.object_key}: {len(data)} bytes of checksum {digest}, the index has "
                f"{file.bytes} bytes of {file.sha256}"
            )
        self._keep(file.object_key, data)
        return data

    def _keep(self, key: str, data: bytes) -> None:
        if len(data) > self._capacity or key in self._files:
            return
        self._files[key] = data
        self._bytes += len(data)
        while self._bytes > self._capacity:
            _, dropped = self._files.popitem(last=False)
            self._bytes -= len(dropped)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _month_of(at: datetime) -> date:
    return month_start(at.astimezone(UTC).date())


def _starts(month: date) -> datetime:
    return datetime.combine(month, time(), UTC)


def _before(bound: Cursor | None, at: datetime, id_: uuid.UUID) -> bool:
    """The row sorts after the cursor in a newest-first list."""
    return bound is None or bound.at is None or (at, id_) < (bound.at, bound.id)


def _newer_than_bound(month: date, bound: Cursor | None) -> bool:
    """Every row of ``month`` is at or after the cursor: the month has no row of the page."""
    return bound is not None and bound.at is not None and _starts(month) > bound.at


async def _decoded(
    file: IndexedFile, data: bytes, kind: type[T], key: uuid.UUID | None = None
) -> list[T]:
    """The file's rows (or those of one key), decoded off the event loop: a month of
    a large church's recipients is tens of ms of decompression."""
    table: Table = file.table
    if key is None:
        rows = await asyncio.to_thread(read_month, data, table)
    else:
        rows = await asyncio.to_thread(read_key, data, table, key)
    # read_month/read_key check the header's table: the rows are that table's type.
    return cast(list[T], rows)


def _message(row: ArchivedMessage) -> Message:
    return Message(
        id=row.id,
        body=row.body,
        target=msgspec.convert(row.target, Target),
        status=row.status,
        recipient_count=row.recipient_count,
        segments=row.segments,
        encoding=row.encoding,
        from_number=row.from_number,
        send_at=row.send_at,
        created_at=row.created_at,
        completed_at=row.completed_at,
        template_id=row.template_id,
        recurring_id=row.recurring_id,
        canceled_at=row.canceled_at,
        media_ids=row.media_ids or [],
        archived=True,
    )


def _recipient(row: ArchivedRecipient) -> Recipient:
    return Recipient(
        id=row.id,
        member_id=row.member_id,
        status=row.status,
        provider_message_id=row.provider_message_id,
        error_code=row.error_code,
        attempts=row.attempts,
        segments=row.segments,
        updated_at=row.updated_at,
    )


def _thread_message(row: ArchivedConversationMessage, erased: bool) -> ConversationMessage:
    # The archiver stored the thread's view of an outbound text's status (its
    # recipient row's), so the row reads as the live thread did without a join.
    return ConversationMessage(
        id=row.id,
        conversation_id=row.conversation_id,
        direction=row.direction,
        body="" if erased else row.body,
        status=row.status,
        provider_message_id=row.provider_message_id,
        created_at=row.created_at,
        author_id=row.author_id,
        media=[] if erased else msgspec.convert(row.media or [], list[MediaItem]),
        archived=True,
    )


class ArchiveReader:
    """The archived side of the message, recipient and thread reads (module doc)."""

    def __init__(self, store: ObjectStore, cache_bytes: int) -> None:
        self.files = FileCache(store, cache_bytes)

    async def _rows(
        self, file: IndexedFile, kind: type[T], key: uuid.UUID | None = None
    ) -> list[T]:
        return await _decoded(file, await self.files.get(file), kind, key)

    async def _in_order(self, files: list[IndexedFile]) -> AsyncIterator[tuple[IndexedFile, bytes]]:
        """``files`` with their bytes, in order: the first alone (it often fills the
        page), then ``AHEAD`` at once, so a page that runs through months not cached
        yet waits for one round trip to the store per ``AHEAD`` months, not one per
        month. Files fetched but not reached stay cached for the next page."""
        start, size = 0, 1
        while start < len(files):
            batch = files[start : start + size]
            fetched = await asyncio.gather(*(self.files.get(f) for f in batch))
            for file, data in zip(batch, fetched, strict=True):
                yield file, data
            start, size = start + size, AHEAD

    async def _file(
        self, conn: Conn, church_id: uuid.UUID, message_id: uuid.UUID, table: Table
    ) -> IndexedFile:
        if message_id.version != 7:
            raise NotFound("message")
        month = _month_of(created_at_of(message_id))
        file = await archived_file(conn, church_id, month, table)
        if file is None:
            raise NotFound("message")
        return file

    @stale_ok
    async def get_message(self, conn: Conn, church_id: uuid.UUID, message_id: uuid.UUID) -> Message:
        """An archived broadcast (replies and answers are read in their threads, as
        live); NotFound when its month is not archived or it is not the church's."""
        file = await self._file(conn, church_id, message_id, "message")
        for row in await self._rows(file, ArchivedMessage, message_id):
            if row.kind == "broadcast":
                return _message(row)
        raise NotFound("message")

    @stale_ok
    async def message_counts(
        self, conn: Conn, church_id: uuid.UUID, message_id: uuid.UUID
    ) -> Counts:
        """An archived message's recipients by status, as ``message_counts``."""
        found: dict[str, int] = {}
        try:
            file = await self._file(conn, church_id, message_id, "message_recipient")
        except NotFound:
            return Counts()  # archived with no recipients (a broadcast to no one)
        for row in await self._rows(file, ArchivedRecipient, message_id):
            found[row.status] = found.get(row.status, 0) + 1
        return Counts(**{s.value: found.get(s.value, 0) for s in ALL_STATUSES})

    @stale_ok
    async def list_recipients(
        self,
        conn: Conn,
        church_id: uuid.UUID,
        message_id: uuid.UUID,
        *,
        limit: int,
        cursor: str | None,
        status: str | None = None,
    ) -> Page[Recipient]:
        """An archived message's recipients, as ``list_recipients``: id order, the
        same cursor, the same ``status`` filter."""
        after = decode_cursor(cursor).id if cursor else None
        try:
            file = await self._file(conn, church_id, message_id, "message_recipient")
        except NotFound:
            return Page(items=[], next_cursor=None)
        rows: list[Recipient] = []
        # read_key returns the message's rows in id order (the file's sort key).
        for row in await self._rows(file, ArchivedRecipient, message_id):
            if (after is None or row.id > after) and (status is None or row.status == status):
                rows.append(_recipient(row))
                if len(rows) > limit:
                    break
        return page_of(rows, limit, lambda r: (None, r.id))

    @stale_ok
    async def list_messages(
        self,
        conn: Conn,
        church_id: uuid.UUID,
        *,
        limit: int,
        cursor: str | None,
        where: MessageFilter | None = None,
    ) -> Page[Message]:
        """``list_messages`` continued into archived months (``?include_archived``):
        live rows first, then each archived month newest first, one cursor
        throughout (every archived row is older than every live one)."""
        page = await list_messages(conn, church_id, limit=limit, cursor=cursor, where=where)
        if page.next_cursor is not None:
            return page
        where = where or MessageFilter()
        bound = decode_cursor(cursor) if cursor else None
        rows = list(page.items)
        files = [
            f
            for f in await archived_files(conn, church_id, "message")
            if not _newer_than_bound(f.month, bound)
            and (where.until is None or _starts(f.month) < where.until)
            and (where.since is None or _starts(next_month(f.month)) > where.since)
        ]
        async for file, data in self._in_order(files):
            found = [
                r
                for r in await _decoded(file, data, ArchivedMessage)
                if r.kind == "broadcast"
                and (where.status is None or r.status == where.status)
                and (where.since is None or r.created_at >= where.since)
                and (where.until is None or r.created_at < where.until)
                and _before(bound, r.created_at, r.id)
            ]
            found.sort(key=lambda r: (r.created_at, r.id), reverse=True)
            rows += [_message(r) for r in found]
            if len(rows) > limit:
                break
        return page_of(rows, limit, lambda r: (r.created_at, r.id))

    @stale_ok
    async def list_conversation_messages(
        self,
        conn: Conn,
        church_id: uuid.UUID,
        conversation_id: uuid.UUID,
        *,
        limit: int,
        cursor: str | None,
    ) -> Page[ConversationMessage]:
        """``list_conversation_messages`` continued into archived months: newest
        first, one cursor throughout. An erased member's archived text reads blank
        until the archiver has rewritten the files without it."""
        page = await list_conversation_messages(
            conn, church_id, conversation_id, limit=limit, cursor=cursor
        )
        if page.next_cursor is not None:
            return page
        bound = decode_cursor(cursor) if cursor else None
        rows = list(page.items)
        # Months before the conversation began hold none of its texts (a day's margin:
        # its first text's id is made a moment before the row).
        began = (await get_conversation(conn, church_id, conversation_id)).created_at
        files = [
            f
            for f in await archived_files(conn, church_id, "conversation_message")
            if not _newer_than_bound(f.month, bound)
            and _starts(next_month(f.month)) > began - timedelta(days=1)
        ]
        if not files:
            return page
        erased = conversation_id in await erased_conversations(conn, church_id)
        async for file, data in self._in_order(files):
            found = [
                r
                for r in await _decoded(file, data, ArchivedConversationMessage, conversation_id)
                if _before(bound, r.created_at, r.id)
            ]
            rows += [_thread_message(r, erased) for r in reversed(found)]
            if len(rows) > limit:
                break
        return page_of(rows, limit, lambda r: (r.created_at, r.id))
