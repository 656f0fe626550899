"""Credentials revoked or expired during a connection: close it with 4001.

The storage functions that end credentials early (logout, staff removal,
password reset or change, API key revoke and rotate) publish a revocation on
``key_names.CREDENTIAL_REVOCATIONS`` (format in ``storage.credentials``). Every web
node's hub listens to that channel on its one pub/sub connection and hands
each message to its ``Revocations``, which closes the node's connections
(WebSocket and SSE alike) that authenticated with those credentials:

- a session connection is known by ``session <hash>`` and by its user
  (``user <church> <user>``, which ends every session of the user); a
  connection opened with a ticket is known by the session or key the ticket
  stands for, never by the ticket;
- an API key connection by ``api_key <id>`` (revoked or rotated).

Expiry needs no polling: a session connection gets one timer at the handshake,
from the session's remaining TTL (sessions have a fixed lifetime; a role
change rewrites them with KEEPTTL).

Two races are closed here. A handshake that authenticated just before a
revocation but registers just after its message arrived is caught by the
revocations remembered for ``REMEMBER_S`` (longer than a ticket lives). A
revocation published while the node's pub/sub connection was down is caught by
``recheck`` after the hub reconnects: sessions by EXISTS on their keys, API
keys by their row (a key rotated during the outage is not seen: its id stays
valid; the outage and the rotation must coincide, and the client's next
handshake fails anyway).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

from storage.pg.credentials import (
    API_KEY_REVOKED,
    ROLE_CHANGED,
    SESSION_REVOKED,
    Principal,
    revocation_names,
    revoked_names,
    unrevoked_api_key_ids,
)
from storage.pg.database import Pool
from storage.redis import key_names
from storage.redis.connection import Redis

log = logging.getLogger("koinonia.realtime.revocation")

REMEMBER_S = 90.0
"""How long a revocation is remembered for handshakes that raced it: more than a
ticket's 30 s plus the time a handshake may take."""
_RECHECK_CHUNK = 500


class RevocationListener(Protocol):
    def listening(self) -> None:
        """From now on every message reaches ``forget`` (called on joining)."""

    def forget(self, data: bytes | str) -> None: ...

    def forget_all(self) -> None: ...


class _Listeners(list[RevocationListener]):
    """Tells a listener it is heard as it joins: a principal cache keeps nothing
    until revocations reach it (storage/process/principal_cache.py)."""

    def append(self, listener: RevocationListener) -> None:
        super().append(listener)
        listener.listening()


class Revocable(Protocol):
    def revoke(self) -> None:
        """Close with 4001, dropping whatever is still queued."""


def names_of(principal: Principal) -> list[str]:
    """The revocation names a connection of this principal answers to."""
    return revocation_names(principal)


class Revocations:
    """A node's live connections by credential, closed when those are revoked."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        # Revocation name → the connections answering to it (insertion-ordered set).
        self._watching: dict[str, dict[Revocable, None]] = {}
        # Session connections' expiry timers.
        self._timers: dict[Revocable, asyncio.TimerHandle] = {}
        # Revocation name → when it arrived, oldest first.
        self._recent: dict[str, float] = {}
        self.listeners: list[RevocationListener] = _Listeners()
        """Told of every revocation message (``forget``), and of every reconnection
        (``forget_all``, from ``recheck``)."""
        self.pool: Pool | None = None
        """Postgres for ``recheck`` of API keys; set by the endpoints (the hub has none)."""

    def __len__(self) -> int:
        return len({c for bucket in self._watching.values() for c in bucket})

    def watch(self, principal: Principal, conn: Revocable, *, expires_in: float | None) -> bool:
        """Follow a new connection; False (and it is revoked) when its credentials
        were revoked moments ago. ``expires_in``: seconds its session has left."""
        names = names_of(principal)
        self._forget_old()
        if any(name in self._recent for name in names):
            conn.revoke()
            return False
        for name in names:
            bucket = self._watching.get(name)
            if bucket is None:
                bucket = self._watching[name] = {}
            bucket[conn] = None
        if expires_in is not None:
            loop = asyncio.get_running_loop()
            self._timers[conn] = loop.call_later(max(expires_in, 0.0), conn.revoke)
        return True

    def unwatch(self, principal: Principal, conn: Revocable) -> None:
        for name in names_of(principal):
            bucket = self._watching.get(name)
            if bucket is not None:
                bucket.pop(conn, None)
                if not bucket:
                    del self._watching[name]
        timer = self._timers.pop(conn, None)
        if timer is not None:
            timer.cancel()

    def revoke(self, data: bytes | str) -> int:
        """Apply one revocation message; returns how many connections it closed."""
        for listener in self.listeners:
            # A listener's bug must not keep revoked connections open.
            try:
                listener.forget(data)
            except Exception:
                log.exception("revocation listener failed; dropping all it holds")
                listener.forget_all()
        kind, names = revoked_names(data)
        if kind == ROLE_CHANGED:
            return 0  # for the listeners' caches; connections stay open
        if not kind:
            log.error("malformed revocation %r", data[:200])
            return 0
        now = self._clock()
        closed = 0
        for name in names:
            self._recent.pop(name, None)
            self._recent[name] = now
            for conn in list(self._watching.pop(name, ())):
                conn.revoke()
                closed += 1
        self._forget_old()
        return closed

    def _forget_old(self) -> None:
        recent = self._recent
        if not recent:
            return
        horizon = self._clock() - REMEMBER_S
        while recent:
            name = next(iter(recent))
            if recent[name] > horizon:
                return
            del recent[name]

    async def recheck(self, redis: Redis) -> int:
        """After the pub/sub connection was lost: revoke the connections whose
        session or API key ended meanwhile. Returns how many were revoked."""
        for listener in self.listeners:
            listener.forget_all()
        sessions = [n for n in self._watching if n.startswith(SESSION_REVOKED + " ")]
        api_keys = [n for n in self._watching if n.startswith(API_KEY_REVOKED + " ")]
        gone: list[str] = []
        for i in range(0, len(sessions), _RECHECK_CHUNK):
            chunk = sessions[i : i + _RECHECK_CHUNK]
            async with redis.pipeline(transaction=False) as pipe:
                for name in chunk:
                    pipe.exists(key_names.session(name.partition(" ")[2]))
                found = await pipe.execute()
            gone += [n for n, exists in zip(chunk, found, strict=True) if not exists]
        if api_keys and self.pool is not None:
            ids = [n.partition(" ")[2] for n in api_keys]
            async with self.pool.connection() as db:
                live = await unrevoked_api_key_ids(db, ids)
            gone += [f"{API_KEY_REVOKED} {i}" for i in ids if i not in live]
        closed = 0
        for name in gone:
            for conn in list(self._watching.pop(name, ())):
                conn.revoke()
                closed += 1
        if closed:
            log.info("%d connections closed: credentials ended while pub/sub was down", closed)
        return closed
