"""Who is here: staff presence and conversation viewers (docs/protocol.md "The inbox").

Every web node keeps, in memory, its own connections per church: which staff user
each belongs to and the conversation it views (``viewing`` frames). Redis holds
every node's (``storage.redis.presence``); a node writes its share there with one
task of its own:

- soon after a change (a connection opened, closed, or viewed another
  conversation), the changed churches' state is written, several churches in one
  round trip; writes are never concurrent, so a node's later state always lands
  after its earlier one;
- every ``heartbeat_s`` every church the node serves is written again, which keeps
  its entries alive (they expire ``ttl_s`` after the last write) and sweeps the
  entries of nodes that died. Churches whose connections here are all API keys
  are swept too: their clients follow ``staff.presence`` as well.

A node killed without a word is thus gone from every church within ``ttl_s`` plus
one heartbeat of another node (40 + 15 s by default, under the contract's 60 s);
``GET /v1/presence`` sweeps on read as well. Redis computes and publishes the
events (``staff.presence`` on ``inbox``, ``conversation.viewers`` on
``conversation:<id>`` and ``inbox``) in the same script that applies a write.

The task runs only while the node has connections (or a change to write) and ends
by itself after the last one; ``stop`` ends it at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import uuid
from typing import Any

from redis.exceptions import RedisError

from storage.redis.presence import Connection, PresenceStore, timestamp

log = logging.getLogger("koinonia.realtime.presence")

HEARTBEAT_S = 15.0
"""How often a node rewrites its connections (KOINONIA_PRESENCE_HEARTBEAT_S)."""
TTL_S = 40.0
"""How long an entry outlives its node's last write (KOINONIA_PRESENCE_TTL_S)."""
_CHUNK = 256
"""Churches written per round trip."""
_BACKOFF_MAX_S = 2.0


class _Staff:
    """One staff connection of this node."""

    __slots__ = ("conversation_id", "since", "user_id")

    def __init__(self, user_id: uuid.UUID) -> None:
        self.user_id = user_id
        self.conversation_id: uuid.UUID | None = None
        self.since = ""


class Presence:
    """This node's share of who is here, written to Redis by one task."""

    def __init__(
        self,
        store: PresenceStore,
        *,
        heartbeat_s: float = HEARTBEAT_S,
        ttl_s: float = TTL_S,
        node: str | None = None,
    ) -> None:
        self._store = store
        self.heartbeat_s = heartbeat_s
        self.ttl_ms = int(ttl_s * 1000)
        self.node = node or secrets.token_hex(8)
        """This process's name in the entries it writes."""
        # Per church, this node's staff connections by connection id.
        self._staff: dict[uuid.UUID, dict[str, _Staff]] = {}
        # Per church, how many connections (staff or API keys) this node serves.
        self._served: dict[uuid.UUID, int] = {}
        # Churches whose state here changed since it was last written.
        self._dirty: set[uuid.UUID] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    # -- what the endpoints call -------------------------------------------------

    def open(self, church_id: uuid.UUID, connection_id: str, user_id: uuid.UUID | None) -> None:
        """A connection opened; ``user_id`` None for an API key (not present, but its
        church is swept by this node while it lasts)."""
        self._served[church_id] = self._served.get(church_id, 0) + 1
        if user_id is not None:
            self._staff.setdefault(church_id, {})[connection_id] = _Staff(user_id)
            self._changed(church_id)
        else:
            self._ensure_task()

    def view(
        self, church_id: uuid.UUID, connection_id: str, conversation_id: uuid.UUID | None
    ) -> None:
        """The staff connection now views ``conversation_id`` (None: none)."""
        staff = self._staff.get(church_id, {}).get(connection_id)
        if staff is None or staff.conversation_id == conversation_id:
            return
        staff.conversation_id = conversation_id
        staff.since = timestamp() if conversation_id is not None else ""
        self._changed(church_id)

    def close(self, church_id: uuid.UUID, connection_id: str) -> None:
        left = self._served.get(church_id, 0) - 1
        if left > 0:
            self._served[church_id] = left
        else:
            self._served.pop(church_id, None)
            if not self._served:
                self._wake.set()  # the task has nothing left to keep alive: it ends now
        staff = self._staff.get(church_id)
        if staff is not None and staff.pop(connection_id, None) is not None:
            if not staff:
                del self._staff[church_id]
            self._changed(church_id)

    async def stop(self) -> None:
        """End the task (shutdown): the entries left expire by themselves."""
        self._stopped = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- the writer ----------------------------------------------------------------

    def _changed(self, church_id: uuid.UUID) -> None:
        self._dirty.add(church_id)
        self._wake.set()
        self._ensure_task()

    def _ensure_task(self) -> None:
        if not self._stopped and (self._task is None or self._task.done()):
            self._task = asyncio.create_task(self._run(), name="realtime-presence")

    def _connections(self, church_id: uuid.UUID) -> list[Connection]:
        return [
            Connection(
                id=connection_id,
                user_id=staff.user_id,
                conversation_id=staff.conversation_id,
                since=staff.since,
            )
            for connection_id, staff in self._staff.get(church_id, {}).items()
        ]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_beat = loop.time() + self.heartbeat_s
        delay = 0.05
        # Ends once nothing is served and nothing is left to write (checked with no
        # await in between, so a connection opening meanwhile starts a new task).
        while self._served or self._dirty:
            wait = next_beat - loop.time()
            if not self._dirty and wait > 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._wake.wait()
                continue
            churches = set(self._dirty)
            if loop.time() >= next_beat:
                churches.update(self._served)
                next_beat = loop.time() + self.heartbeat_s
            self._dirty.clear()
            try:
                await self._write(churches)
                delay = 0.05
            except Exception as exc:
                # Written again once Redis answers; meanwhile entries may expire and
                # come back, which clients see as a short offline.
                if isinstance(exc, RedisError | OSError):
                    log.warning("presence not written (%s); retrying in %.2fs", exc, delay)
                else:
                    log.exception("presence write failed; retrying in %.2fs", delay)
                self._dirty.update(churches)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _BACKOFF_MAX_S)

    async def _write(self, churches: set[uuid.UUID]) -> None:
        store, node, ttl_ms = self._store, self.node, self.ttl_ms
        calls = [
            store.sync_call(church_id, node, self._connections(church_id), ttl_ms)
            for church_id in churches
        ]
        for start in range(0, len(calls), _CHUNK):
            await store.run(calls[start : start + _CHUNK])


def presence_of(state: Any) -> Presence:
    """The app's ``Presence`` (``app.state.presence``), made on first use with the
    settings' intervals when the assembly did not make one."""
    found: Presence | None = getattr(state, "presence", None)
    if found is None:
        services = state.services
        realtime = services.settings.realtime
        found = Presence(
            PresenceStore(services.publisher),
            heartbeat_s=realtime.presence_heartbeat_s,
            ttl_s=realtime.presence_ttl_s,
        )
        state.presence = found
    return found
