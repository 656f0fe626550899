"""Scheduler jobs against the real Postgres of the session's stack."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from delivery.scheduler import Scheduler
from deploy.stack import Stack
from storage.process.services import Services
from storage.process.settings import Settings


@pytest.fixture
async def services(stack: Stack) -> AsyncIterator[Services]:
    opened = await Services.open(Settings.from_env(stack.env))
    yield opened
    await opened.close()


@pytest.mark.anyio
async def test_old_provider_events_are_pruned_and_recent_ones_kept(services: Services) -> None:
    old, recent = f"old-{uuid.uuid4()}", f"new-{uuid.uuid4()}"
    async with services.pool.connection() as conn:
        await conn.execute(
            "INSERT INTO provider_event (church_id, event_id, event_type, received_at) VALUES "
            "(%s, %s, 'message.sent', now() - interval '8 days'), "
            "(%s, %s, 'message.sent', now())",
            (uuid.uuid4(), old, uuid.uuid4(), recent),
        )
    scheduler = Scheduler(services)
    assert await scheduler.prune_provider_events() >= 1
    async with services.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT event_id FROM provider_event WHERE event_id = ANY(%s)", ([old, recent],)
        )
        left = {r[0] for r in await cur.fetchall()}
    assert left == {recent}


@pytest.mark.anyio
async def test_partition_premake_is_idempotent(services: Services) -> None:
    scheduler = Scheduler(services)
    await scheduler.premake_partitions()
    assert await scheduler.premake_partitions() == []
