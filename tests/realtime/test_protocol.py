"""The lean stand-ins realtime.protocol gives uvicorn's wsproto protocol (the endpoint
tests run the whole protocol: test_endpoints.py, test_limits.py)."""

from __future__ import annotations

import asyncio

import anyio
import pytest

from realtime.protocol import Inbox, Writable

pytestmark = pytest.mark.anyio


async def test_inbox_is_a_fifo_that_wakes_its_reader() -> None:
    inbox = Inbox()
    assert inbox.empty()
    inbox.put_nowait(1)
    inbox.put_nowait(2)
    assert (inbox.qsize(), await inbox.get(), await inbox.get()) == (2, 1, 2)
    assert inbox.empty()
    reader = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0)
    assert not reader.done()
    inbox.put_nowait(3)
    with anyio.fail_after(1):
        assert await reader == 3
    # A reader cancelled while waiting leaves the inbox usable.
    cancelled = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0)
    cancelled.cancel()
    await asyncio.sleep(0)
    inbox.put_nowait(4)
    assert await inbox.get() == 4


async def test_writable_blocks_writers_only_while_paused() -> None:
    writable = Writable()
    assert writable.is_set()
    await writable.wait()
    writable.clear()
    writers = [asyncio.ensure_future(writable.wait()) for _ in range(2)]
    await asyncio.sleep(0)
    writers[0].cancel()  # one writer giving up does not release the others
    await asyncio.sleep(0)
    assert not writers[1].done()
    writable.set()
    with anyio.fail_after(1):
        assert await writers[1] is True


def test_pending_is_the_fifo_wsproto_expects_of_its_deque() -> None:
    from realtime.protocol import _Pending

    pending = _Pending()
    assert not pending
    assert len(pending) == 0
    pending.append("a")
    pending.append("b")
    assert pending
    assert len(pending) == 2
    assert [pending.popleft(), pending.popleft()] == ["a", "b"]
    assert not pending
    with pytest.raises(IndexError):
        pending.popleft()
