"""Provider receipts applied in batches across concurrent webhook requests.

Every recipient costs two signed webhooks (``message.sent`` and
``message.finalized``). Applied one by one, each paid a statement, a commit and
a Redis round trip. Here concurrent requests hand their receipt to a batcher
and wait: a few runners each take what has queued up (at most ``max_batch``),
apply it in one statement and one commit, and answer every waiting request at
once. Each batch's events are logged in that same transaction (storage/pg/event_log.py),
so a webhook is answered 200 only once its receipt and its events are committed;
the relay takes them from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

from delivery.progress import ProgressTracker
from storage.pg.database import Pool
from storage.pg.recipients import ProviderStatus, Transition, apply_provider_statuses

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
        self._queue: asyncio.Queue[tuple[ProviderStatus, asyncio.Future[bool]]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._run()) for _ in range(self._runners)]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def submit(self, update: ProviderStatus) -> bool:
        """Return once the receipt is committed (raises what the commit raised): False
        when it was refused (its provider id is not its recipient's), True otherwise."""
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((update, done))
        return await done

    async def _run(self) -> None:
        while True:
            first = await self._queue.get()
            batch = [first]
            while len(batch) < self._max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            await self._apply(batch)

    async def _apply(self, batch: list[tuple[ProviderStatus, asyncio.Future[bool]]]) -> None:
        changes: list[tuple[uuid.UUID, uuid.UUID, Transition]] = []
        refused: set[str] = set()
        try:
            async with self._pool.connection() as conn:
                for part in rounds([u for u, _ in batch]):
                    # The receipts and their events commit together.
                    async with conn.transaction():
                        applied = await apply_provider_statuses(conn, part)
                        await self._progress.log(conn, applied.changes)
                    changes += applied.changes
                    refused |= applied.refused
        except Exception as exc:
            log.exception("receipt batch failed", extra={"receipts": len(batch)})
            for _, done in batch:
                if not done.done():
                    done.set_exception(exc)
            return
        # The events are in the log before the webhooks are answered, and the
        # provider sends a recipient's next receipt only after this answer, so a
        # recipient's events leave the log in the order of its transitions.
        if changes:
            try:
                await self._progress.record_many(changes)
            except Exception:
                log.exception("progress after receipts failed", extra={"receipts": len(batch)})
        for update, done in batch:
            if not done.done():
                done.set_result(update.event_id not in refused)
