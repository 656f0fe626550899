"""Revocations: the registry alone, then across two hubs on a real Redis with the
storage functions that end credentials (no web server: see test_credentials.py)."""

from __future__ import annotations

import asyncio
import uuid

import anyio
import pytest

from realtime.hub import Hub
from realtime.revocation import REMEMBER_S, Revocations
from storage.pg import credentials
from storage.pg.credentials import Principal
from storage.process.settings import RedisSettings
from storage.redis import key_names
from storage.redis.connection import Redis
from storage.redis.publisher import EventPublisher


class Conn:
    """A revocable connection that records its revocations."""

    def __init__(self) -> None:
        self.revoked = 0
        self.event = asyncio.Event()

    def revoke(self) -> None:
        self.revoked += 1
        self.event.set()

    async def wait(self, within: float = 2.0) -> None:
        with anyio.fail_after(within):
            await self.event.wait()


CHURCH = uuid.uuid4()


def session(user: uuid.UUID | None = None, token_hash: str = "h1") -> Principal:
    return Principal(
        church_id=CHURCH,
        kind="session",
        scopes=frozenset({"read", "write"}),
        user_id=user or uuid.uuid4(),
        session_hash=token_hash,
    )


def api_key(key_id: uuid.UUID | None = None) -> Principal:
    return Principal(
        church_id=CHURCH,
        kind="api_key",
        scopes=frozenset({"read"}),
        api_key_id=key_id or uuid.uuid4(),
    )


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.anyio
async def test_revocations_close_the_connections_of_those_credentials() -> None:
    registry = Revocations()
    user = uuid.uuid4()
    a, b, c, d = Conn(), Conn(), Conn(), Conn()
    pa, pb = session(user, "ha"), session(user, "hb")
    pc, pd = api_key(), api_key()
    for principal, conn in ((pa, a), (pb, b), (pc, c), (pd, d)):
        assert registry.watch(principal, conn, expires_in=None)
    assert registry.revoke(b"session ha") == 1
    assert (a.revoked, b.revoked) == (1, 0)
    assert registry.revoke(f"api_key {pc.api_key_id}".encode()) == 1
    assert (c.revoked, d.revoked) == (1, 0)
    # Every session of the user; a's second revocation is harmless (close is idempotent).
    assert registry.revoke(f"user {CHURCH} {user}") >= 1
    assert b.revoked == 1
    assert registry.revoke(b"nonsense") == 0
    for principal, conn in ((pa, a), (pb, b), (pc, c), (pd, d)):
        registry.unwatch(principal, conn)
    assert len(registry) == 0


@pytest.mark.anyio
async def test_a_handshake_that_raced_a_revocation_is_closed_on_arrival() -> None:
    clock = Clock()
    registry = Revocations(clock=clock)
    registry.revoke(b"session late")
    late = Conn()
    assert not registry.watch(session(token_hash="late"), late, expires_in=None)
    assert late.revoked == 1
    clock.now += REMEMBER_S + 1
    later = Conn()
    assert registry.watch(session(token_hash="late"), later, expires_in=None)
    assert later.revoked == 0


@pytest.mark.anyio
async def test_a_session_connection_expires_with_its_session() -> None:
    registry = Revocations()
    soon, never, gone = Conn(), Conn(), Conn()
    registry.watch(session(token_hash="soon"), soon, expires_in=0.05)
    registry.watch(api_key(), never, expires_in=None)
    principal = session(token_hash="gone")
    registry.watch(principal, gone, expires_in=0.05)
    registry.unwatch(principal, gone)  # ended before: its timer goes with it
    await soon.wait()
    await asyncio.sleep(0.1)
    assert (soon.revoked, never.revoked, gone.revoked) == (1, 0, 0)


@pytest.mark.anyio
async def test_storage_revocations_reach_every_node(
    redis_url: str, redis: Redis, publisher: EventPublisher
) -> None:
    nodes = [Hub(RedisSettings(url=redis_url), publisher, redis) for _ in range(2)]
    for node in nodes:
        await node.start()
    try:
        church, user = uuid.uuid4(), uuid.uuid4()
        tokens = []
        for _ in range(3):
            token, _csrf = await credentials.create_session(
                redis, church_id=church, user_id=user, role="owner", ttl_s=60
            )
            tokens.append(token)
        principals = [await credentials.principal_for_session(redis, t) for t in tokens]
        conns = [[Conn() for _ in tokens] for _ in nodes]
        for node, row in zip(nodes, conns, strict=True):
            for principal, conn in zip(principals, row, strict=True):
                assert principal is not None
                node.revocations.watch(principal, conn, expires_in=60)
        await asyncio.sleep(0.1)  # both hubs confirmed their subscriptions

        # A role change rewrites sessions in place: not a revocation.
        assert await credentials.set_user_sessions_role(redis, church, user, "admin") == 3
        # Logout of one session: that session's connections, on both nodes.
        await credentials.delete_session(redis, tokens[0])
        for row in conns:
            await row[0].wait()
        # A password change keeps its own session and ends the others.
        await credentials.delete_user_sessions(redis, church, user, keep=tokens[2])
        for row in conns:
            await row[1].wait()
        await asyncio.sleep(0.1)
        assert [[c.revoked for c in row] for row in conns] == [[1, 1, 0], [1, 1, 0]]
        # Removal (or a password reset) ends every session of the user.
        await credentials.delete_user_sessions(redis, church, user)
        for row in conns:
            await row[2].wait()
    finally:
        for node in nodes:
            await node.stop()


@pytest.mark.anyio
async def test_sessions_ended_while_pub_sub_was_down_are_found_after_reconnecting(
    hub: Hub, redis: Redis
) -> None:
    church, user = uuid.uuid4(), uuid.uuid4()
    live, ended = [
        (
            await credentials.create_session(
                redis, church_id=church, user_id=user, role="owner", ttl_s=60
            )
        )[0]
        for _ in range(2)
    ]
    conns = {}
    for token in (live, ended):
        principal = await credentials.principal_for_session(redis, token)
        assert principal is not None
        conns[token] = Conn()
        hub.revocations.watch(principal, conns[token], expires_in=60)
    # Deleted behind the hub's back (its revocation message never sent), then the
    # hub's pub/sub connection drops: the reconnection rechecks every session.
    await redis.delete(key_names.session(credentials.session_hash(ended)))
    await redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")  # type: ignore[no-untyped-call]
    await conns[ended].wait(5.0)
    assert conns[live].revoked == 0
