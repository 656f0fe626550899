"""Principals cached in the web process, dropped by credential revocations.

Authenticating a request costs a Redis round trip (the API key's cached principal,
or the session record); the limiter then costs another. A web process keeps the
principals it resolved lately, so the hot path makes one round trip, not two.

What keeps that correct:

- every revocation message (``key_names.CREDENTIAL_REVOCATIONS``, format in
  storage/pg/credentials.py) drops exactly the entries it names: an API key's by
  its id, a session's by its hash, a user's sessions by church and user. Role
  changes publish a ``role`` message (not a revocation: connections stay) that
  drops that user's sessions, so the new role applies to the next request;
- the process that ends a credential drops its own entries before answering
  (``forget`` right after the store changed), so its very next request is refused
  without waiting for its own message to come back through Redis;
- ``forget_all`` when the hub's subscription to the channel is re-established:
  messages published while it was down were never heard;
- a short TTL (``KOINONIA_PRINCIPAL_CACHE_S``) as a second guard, and a session's
  entry never outlives the session itself;
- a lookup that raced a revocation does not store what it read (``generation``).

Only a process whose revocations reach the cache may keep entries: the cache stays
off until ``listening()`` (called when it joins a hub's revocation listeners, in
web processes). Anything else that authenticates (no hub) reads the stores every time.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from storage.pg.credentials import Principal, revocation_names, revoked_names

DEFAULT_TTL_S = 5.0
DEFAULT_SIZE = 10_000


def _names(principal: Principal) -> list[str]:
    """The messages' names this principal's entry answers to (as a connection's,
    plus the ``role`` change of a session's user)."""
    return revocation_names(principal, role=True)


class PrincipalCache:
    def __init__(
        self,
        *,
        ttl_s: float = DEFAULT_TTL_S,
        size: int = DEFAULT_SIZE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self.size = size
        self._clock = clock
        self._live = False
        # Credential key → (principal, monotonic expiry), oldest insertion first.
        self._entries: dict[bytes, tuple[Principal, float]] = {}
        # Revocation name → the credential keys it drops.
        self._by_name: dict[str, set[bytes]] = {}
        self.generation = 0
        """Bumped by every forget: a lookup that began before one does not store."""

    @property
    def enabled(self) -> bool:
        return self._live and self.ttl_s > 0 and self.size > 0

    def listening(self) -> None:
        """Revocations now reach this cache (a hub's listener): entries may be kept."""
        self._live = True

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> Principal | None:
        found = self._entries.get(key)
        if found is None:
            return None
        if found[1] <= self._clock():
            self._drop(key)
            return None
        return found[0]

    def put(
        self, key: bytes, principal: Principal, generation: int, *, at_most_s: float | None = None
    ) -> None:
        """Keep ``principal`` for the TTL (or ``at_most_s`` when shorter: a session's
        remaining life), unless a revocation arrived since ``generation`` was read."""
        if not self.enabled or generation != self.generation:
            return
        ttl = self.ttl_s if at_most_s is None else min(self.ttl_s, at_most_s)
        if ttl <= 0:
            return
        if key in self._entries:
            self._drop(key)
        while len(self._entries) >= self.size:
            self._drop(next(iter(self._entries)))
        self._entries[key] = (principal, self._clock() + ttl)
        for name in _names(principal):
            bucket = self._by_name.get(name)
            if bucket is None:
                bucket = self._by_name[name] = set()
            bucket.add(key)

    def _drop(self, key: bytes) -> None:
        found = self._entries.pop(key, None)
        if found is None:
            return
        for name in _names(found[0]):
            bucket = self._by_name.get(name)
            if bucket is not None:
                bucket.discard(key)
                if not bucket:
                    del self._by_name[name]

    def forget(self, data: bytes | str) -> None:
        """Drop the entries one revocation (or role change) message names."""
        self.generation += 1
        kind, names = revoked_names(data)
        if not kind:
            # Not understood: drop everything rather than guess.
            self.forget_all()
            return
        for name in names:
            for key in list(self._by_name.get(name, ())):
                self._drop(key)

    def forget_all(self) -> None:
        self.generation += 1
        self._entries.clear()
        self._by_name.clear()


def api_key_entry(digest: bytes) -> bytes:
    """The cache key of an API key: its secret's SHA-256 (never the secret itself)."""
    return b"k" + digest


def session_entry(token_hash: str) -> bytes:
    return b"s" + token_hash.encode()
