"""Provider receipts applied in batches across concurrent webhook requests.

Every recipient costs two signed webhooks (``message.sent`` and
``message.finalized``). Applied one by one, each paid a statement, a commit and
a Redis round trip. Here concurrent requests hand their receipt to a batcher
and wait: a few runners each take what has queued up (at most ``max_batch``),
apply it in one statement and one commit, and answer every waiting request at
once; the events go out in one Redis pipeline per broadcast. A webhook is
answered 200 only after its receipt is committed and its events published.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import defaultdict

from delivery.progress import ProgressTracker
from storage.database import Pool
from storage.recipients import ProviderStatus, Transition, apply_provider_statuses

log = logging.getLogger("koinonia.delivery.receipts")


def rounds(updates: list[ProviderStatus]) -> list[list[ProviderStatus]]:
    """Split so that no recipient appears twice in one round, keeping arrival order
    per recipient (a ``sent`` before the ``finalized`` that followed it)."""
    out: list[list[ProviderStatus]] = []
    depth: dict[uuid.UUID, int] = {}
    for update in updates:
        level = depth.get(update.recipient_id, 0)
        depth[update.recipient_id] = level + 1
        if level == len(out):
            out.append([])
        out[level].append(update)
    return out


class ReceiptBatcher:
    def __init__(
        self,
        pool: Pool,
        progress: ProgressTracker,
        *,
        runners: int = 4,
        max_batch: int = 256,
    ) -> None:
        self._pool = pool
        self._progress = progress
        self._runners = runners
        self._max_batch = max_batch
        self._queue: asyncio.Queue[tuple[ProviderStatus, asyncio.Future[None]]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._run()) for _ in range(self._runners)]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def submit(self, update: ProviderStatus) -> None:
        """Return once the receipt is committed (raises what the commit raised)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((update, done))
        await done

    async def _run(self) -> None:
        while True:
            first = await self._queue.get()
            batch = [first]
            while len(batch) < self._max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            await self._apply(batch)

    async def _apply(self, batch: list[tuple[ProviderStatus, asyncio.Future[None]]]) -> None:
        changes: list[tuple[uuid.UUID, uuid.UUID, Transition]] = []
        try:
            async with self._pool.connection() as conn:
                for part in rounds([u for u, _ in batch]):
                    changes += await apply_provider_statuses(conn, part)
        except Exception as exc:
            log.exception("receipt batch failed", extra={"receipts": len(batch)})
            for _, done in batch:
                if not done.done():
                    done.set_exception(exc)
            return
        # Published before the webhooks are answered: the provider sends a
        # recipient's next receipt only after this answer, so a recipient's
        # events reach the channel in the order of its transitions.
        if changes:
            await self._publish(changes)
        for _, done in batch:
            if not done.done():
                done.set_result(None)

    async def _publish(self, changes: list[tuple[uuid.UUID, uuid.UUID, Transition]]) -> None:
        by_message: dict[tuple[uuid.UUID, uuid.UUID], list[Transition]] = defaultdict(list)
        for church_id, message_id, change in changes:
            by_message[(church_id, message_id)].append(change)
        for (church_id, message_id), items in by_message.items():
            try:
                await self._progress.record(church_id, message_id, items)
            except Exception:
                log.exception("publishing receipts failed", extra={"message_id": str(message_id)})
