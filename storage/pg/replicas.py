"""Read replicas: which connection serves a read, and how each replica is doing.

``ReplicaSet.read(position, fn, ...)`` runs a repository read on a streaming
replica when all of these hold, else on the primary:

- ``fn`` is marked ``@stale_ok`` (storage/pg/freshness.py): the repository says a
  replica may serve it; nothing else decides, the SQL is never looked at;
- the caller knows the church's read position (``None``: it does not, so the read
  must be fresh): the replica has replayed at least that far, so the church's own
  answered writes and announced events are in it (read-your-writes, on every web
  node, since the position lives in Redis: storage/redis/read_positions.py);
- the replica is healthy by its last probe: reachable, still a standby, and no more
  than ``KOINONIA_REPLICA_MAX_LAG_MS`` behind.

Health is measured by one task per process, never per request: every
``KOINONIA_REPLICA_POLL_S`` it samples the primary's position, then asks each
replica how far it has replayed (all at once, each with its own timeout, so a dead
one delays nobody). Lag is time: how long ago the primary was where the replica is
now, read off the primary's recent samples (interpolated between two of them), 0
when the replica has everything the primary had at the last sample. A replica
found lagging or unreachable is skipped from that moment; the first good probe
after it recovers puts it back, a poll interval later.

A read that fails on a replica (refused, reset, shut down, a recovery conflict)
runs again on the primary: the client never sees a replica's trouble. A
connection error also marks the replica down until its next good probe, so the
requests behind this one do not try it. Replica pools never make a request wait:
when every connection of one is busy the read goes to the primary after
``REPLICA_WAIT_S``.

The task and the replica pools start with the process's first stale-tolerant read
(workers and the scheduler never make one, so they hold no replica connections).
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import itertools
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Concatenate, ParamSpec, TypeVar

import msgspec
import psycopg
from psycopg import AsyncConnection
from psycopg_pool import PoolTimeout

from storage.pg.database import Conn, Pool, open_pool
from storage.pg.freshness import POSITION_SQL, is_stale_ok, position_of
from storage.process.settings import DatabaseSettings
from storage.redis.read_positions import ReadPositions

log = logging.getLogger("koinonia.storage.replicas")

P = ParamSpec("P")
T = TypeVar("T")

REPLICA_WAIT_S = 0.05
"""Longest wait for a replica's pooled connection before the read goes to the primary."""
HISTORY_S = 30.0
"""Primary samples kept for measuring lag (at least 3 x the lag limit); a replica
behind all of them lags at least this long."""

_PROBE = "SELECT pg_is_in_recovery(), (pg_last_wal_replay_lsn() - '0/0')::bigint"
_PRIMARY_POSITION = f"SELECT {POSITION_SQL}"

OnLag = Callable[[str, float], None]


class ReplicaState(msgspec.Struct, frozen=True):
    """One replica as this process last saw it (``/health`` and the tests)."""

    name: str
    reachable: bool
    usable: bool
    replayed: int
    lag_s: float


class _Replica:
    def __init__(self, name: str, url: str) -> None:
        self.name = name
        self.url = url
        self.pool: Pool | None = None
        self.opening: asyncio.Task[None] | None = None
        self.open_failed = False
        self.probe: Conn | None = None
        self.reachable = False
        self.lagging = False
        self.replayed = 0
        self.lag_s = math.inf
        self.seen_at = -math.inf
        """time.monotonic() of the last good probe."""


class ReplicaSet:
    """This process's replicas (possibly none) and the primary they follow."""

    def __init__(
        self,
        primary: Pool,
        settings: DatabaseSettings,
        positions: ReadPositions,
        *,
        on_replica_query: Callable[[], None] | None = None,
        on_lag: OnLag | None = None,
    ) -> None:
        self._primary = primary
        self._settings = settings
        self._positions = positions
        self._on_replica_query = on_replica_query
        self._on_lag = on_lag
        self._replicas = [
            _Replica(f"replica-{n}", url) for n, url in enumerate(settings.replica_urls, 1)
        ]
        self._turn = itertools.count()
        self._max_lag_s = settings.replica_max_lag_ms / 1000
        self._poll_s = max(0.01, settings.replica_poll_s)
        self._probe_timeout_s = max(1.0, 2 * self._poll_s)
        # A probe older than this (the task stalled) no longer vouches for a replica.
        self._trust_s = self._probe_timeout_s + 2 * self._poll_s
        window = max(HISTORY_S, 3 * self._max_lag_s)
        self._history: collections.deque[tuple[float, int]] = collections.deque(
            maxlen=min(100_000, math.ceil(window / self._poll_s) + 1)
        )
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        self._primary_failed = False

    @property
    def replicated(self) -> bool:
        """Replicas are configured: reads may leave the primary, and writes must
        record their church's position."""
        return bool(self._replicas)

    # -- reads -----------------------------------------------------------------------

    async def read(
        self,
        position: int | None,
        fn: Callable[Concatenate[Conn, P], Awaitable[T]],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """``fn(conn, *args, **kwargs)`` on a replica that may serve it (module doc),
        else on the primary. ``position``: the church's read position (0: none
        recorded), None when unknown (the read is then fresh)."""
        if position is not None and self._replicas and is_stale_ok(fn):
            if self._task is None:
                self.start()
            replica = self._choose(position)
            if replica is not None and replica.pool is not None:
                try:
                    async with replica.pool.connection(timeout=REPLICA_WAIT_S) as conn:
                        return await fn(conn, *args, **kwargs)
                except psycopg.OperationalError as exc:
                    self._failed(replica, exc)
        async with self._primary.connection() as conn:
            return await fn(conn, *args, **kwargs)

    def _choose(self, position: int) -> _Replica | None:
        """A usable replica that has replayed ``position``, taking turns."""
        now = time.monotonic()
        count = len(self._replicas)
        start = next(self._turn)
        for i in range(count):
            replica = self._replicas[(start + i) % count]
            if replica.replayed >= position and self._usable(replica, now):
                return replica
        return None

    def _usable(self, replica: _Replica, now: float) -> bool:
        return (
            replica.reachable
            and replica.pool is not None
            and replica.lag_s <= self._max_lag_s
            and now - replica.seen_at <= self._trust_s
        )

    def _failed(self, replica: _Replica, exc: psycopg.OperationalError) -> None:
        # A busy pool or a query cancelled by a recovery conflict says nothing about
        # the replica's health; anything else is its connection failing.
        if isinstance(exc, PoolTimeout) or (exc.sqlstate or "").startswith("40"):
            log.info("replica read ran on the primary", extra={"replica": replica.name})
            return
        if replica.reachable:
            log.warning(
                "replica failed a read; skipped until it answers a probe",
                extra={"replica": replica.name, "error": type(exc).__name__},
            )
        replica.reachable = False

    # -- writes ------------------------------------------------------------------------

    async def remember_write(self, church_id: uuid.UUID) -> None:
        """Record, after a church's write committed, the position a replica must
        reach before serving that church again. Nothing to do without replicas."""
        if not self._replicas:
            return
        async with self._primary.connection() as conn:
            cur = await conn.execute(_PRIMARY_POSITION)
            row = await cur.fetchone()
        if row is not None:
            await self._positions.record(church_id, position_of(int(row[0])))

    # -- health ------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None and self._replicas and not self._stopped:
            self._task = asyncio.get_running_loop().create_task(
                self._watch(), name="replica-health"
            )

    async def stop(self) -> None:
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for replica in self._replicas:
            replica.reachable = False  # reads during shutdown go to the primary
            if replica.opening is not None:
                replica.opening.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await replica.opening
            if replica.probe is not None:
                with contextlib.suppress(Exception):
                    await replica.probe.close()
            if replica.pool is not None:
                await replica.pool.close()

    def states(self) -> list[ReplicaState]:
        now = time.monotonic()
        return [
            ReplicaState(
                name=r.name,
                reachable=r.reachable,
                usable=self._usable(r, now),
                replayed=r.replayed,
                lag_s=r.lag_s,
            )
            for r in self._replicas
        ]

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            began = loop.time()
            try:
                await self.poll()
            except Exception:
                log.warning("replica health poll failed", exc_info=True)
            await asyncio.sleep(max(0.0, self._poll_s - (loop.time() - began)))

    async def poll(self) -> None:
        """One round: the primary's position, then every replica at once."""
        try:
            async with asyncio.timeout(self._probe_timeout_s):
                async with self._primary.connection(timeout=self._probe_timeout_s) as conn:
                    cur = await conn.execute(_PRIMARY_POSITION)
                    row = await cur.fetchone()
            if row is not None:
                self._history.append((time.monotonic(), position_of(int(row[0]))))
            self._primary_failed = False
        except (psycopg.Error, OSError, TimeoutError):
            # No sample this round: lags are measured against the older ones.
            if not self._primary_failed:
                log.warning("replica health: primary position unavailable", exc_info=True)
            self._primary_failed = True
        await asyncio.gather(*(self._probe(r) for r in self._replicas))

    async def _probe(self, replica: _Replica) -> None:
        try:
            async with asyncio.timeout(self._probe_timeout_s):
                if replica.probe is None or replica.probe.closed:
                    replica.probe = await AsyncConnection.connect(
                        replica.url,
                        autocommit=True,
                        prepare_threshold=None,
                        connect_timeout=max(1, round(self._probe_timeout_s)),
                    )
                cur = await replica.probe.execute(_PROBE)
                row = await cur.fetchone()
        except (psycopg.Error, OSError, TimeoutError) as exc:
            self._down(replica, f"unreachable ({type(exc).__name__})")
            if replica.probe is not None:
                with contextlib.suppress(Exception):
                    await replica.probe.close()
                replica.probe = None
            return
        if row is None or not row[0] or row[1] is None:
            # Promoted, or not a standby at all: its data may fork from the primary's.
            self._down(replica, "not a streaming standby")
            return
        now = time.monotonic()
        replayed = int(row[1])
        if replica.pool is None:
            if replica.opening is None or replica.opening.done():
                replica.opening = asyncio.get_running_loop().create_task(
                    self._open(replica), name=f"replica-pool-{replica.name}"
                )
            return
        if not replica.reachable:
            # Connections made before it went away are broken: replace them before
            # any request gets one.
            try:
                async with asyncio.timeout(self._probe_timeout_s):
                    await replica.pool.check()
                    # check() replaces broken connections in the background, and a
                    # read waits only REPLICA_WAIT_S for one before going to the
                    # primary: back in use once the first new one is ready.
                    while self._settings.pool_min and not _available(replica.pool):  # noqa: ASYNC110 (pool state: no event to wait on)
                        await asyncio.sleep(0.01)
            except (psycopg.Error, OSError, TimeoutError):
                return
            log.info("replica back in use", extra={"replica": replica.name})
        replica.replayed = replayed
        replica.lag_s = self._lag(replayed, now)
        replica.seen_at = now
        replica.reachable = True
        lagging = replica.lag_s > self._max_lag_s
        if lagging != replica.lagging:
            replica.lagging = lagging
            log.log(
                logging.WARNING if lagging else logging.INFO,
                "replica lags beyond the limit; skipped" if lagging else "replica caught up",
                extra={"replica": replica.name, "lag_ms": round(replica.lag_s * 1000)},
            )
        if self._on_lag is not None:
            self._on_lag(replica.name, replica.lag_s)

    async def _open(self, replica: _Replica) -> None:
        settings = msgspec.structs.replace(
            self._settings, url=replica.url, timeout_s=REPLICA_WAIT_S, replica_urls=()
        )
        try:
            replica.pool = await open_pool(
                settings, name=f"koinonia-{replica.name}", on_query=self._on_replica_query
            )
        except (psycopg.Error, OSError):
            # Tried again at the next good probe; said once.
            if not replica.open_failed:
                log.warning(
                    "replica pool not opened", extra={"replica": replica.name}, exc_info=True
                )
            replica.open_failed = True

    def _down(self, replica: _Replica, why: str) -> None:
        if replica.reachable:
            log.warning("replica skipped: " + why, extra={"replica": replica.name})
        replica.reachable = False
        if math.isfinite(replica.seen_at):
            # Its last known position keeps measuring how far behind it falls.
            replica.lag_s = self._lag(replica.replayed, time.monotonic())
            if self._on_lag is not None:
                self._on_lag(replica.name, replica.lag_s)

    def _lag(self, replayed: int, now: float) -> float:
        """How long ago the primary was at ``replayed`` (0: at or past the last sample)."""
        history = self._history
        if not history or replayed >= history[-1][1]:
            return 0.0
        positions = [p for _, p in history]
        after = bisect.bisect_right(positions, replayed)
        t1, p1 = history[after]
        if after == 0:
            return now - t1
        t0, p0 = history[after - 1]
        passed = t0 + (t1 - t0) * (replayed - p0) / (p1 - p0)
        return max(0.0, now - passed)


def _available(pool: Pool) -> bool:
    """Whether the pool holds an idle connection now."""
    return pool.get_stats().get("pool_available", 0) > 0
