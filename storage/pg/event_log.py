"""The event log: every event is committed with the change it describes, then relayed.

Producers ``append`` events inside the transaction of their change: one row per
transaction and church, holding each event once, encoded as the JSON every consumer needs,
with the church and the realtime channels it goes to. Nothing is published before
the commit, so an event can never describe a change that did not happen, and
nothing committed can be lost: the row stays until it has been relayed.

The ``EventRelay`` (a task in every process that opens ``Services``: web, worker,
scheduler, and the operator commands while they run) moves rows to their
consumers, oldest first:

- webhooks: a copy for every endpoint of the church whose filters match
  (storage/pg/webhook_outbox.py ``record_encoded``), in the relay's transaction, with the
  event's own id (so the ``webhook-id`` an integrator sees is the event id a
  realtime client sees);
- realtime: each event appended to its channels' history streams and published on
  pub/sub (storage/domain/events.py), all of one drain in one Redis round trip; on a
  Redis Cluster that round trip ends with ``WAIT`` for a replica of every master
  written (storage/redis/publisher.py ``run_replicated``, which names its narrow
  limits), so a failover does not lose an event whose row is deleted.

Then the rows are deleted, in the same transaction. Redis down: the webhooks are
recorded and the rows marked ``hooked``, the transaction commits, and the relay
tries Redis again with backoff; events keep their log order when it returns. A
relay that dies after publishing and before its commit publishes those events
again (same ids): delivery is at least once, never zero.

One drain runs at a time across every process (a transaction-level advisory lock),
so events leave in log order. A producer kicks the relay of its own process after
its commit; the relays of the other processes look every ``POLL_S`` as well, so a
row whose own process died right after the commit still leaves within that time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from collections.abc import Iterable, Sequence

import msgspec
from redis.exceptions import RedisError

from storage.domain.events import WEBHOOK_EVENT_TYPES, AnyEvent, encode
from storage.pg.database import Conn, Pool
from storage.pg.freshness import POSITION_SQL, position_of
from storage.pg.webhook_outbox import matches, record_encoded
from storage.redis.publisher import EventPublisher, NotReplicated

log = logging.getLogger("koinonia.storage.event_log")

POLL_S = 0.5
"""How often an idle relay looks for rows another process left."""
COALESCE_S = 0.01
"""After a kick, wait this long so one drain takes the commits of many transactions
(a busy pipeline kicks hundreds of times a second); realtime events gain at most
this much latency, far less than the 100 ms progress gate."""
BATCH_ROWS = 200
"""Log rows one drain step takes (each row is one producer transaction's events of one
church)."""
_LOCK_DRAIN = 7_311_020_210
_BUSY_RETRY_S = 0.02
_BUSY_TRIES = 3


class LoggedEvent(msgspec.Struct, frozen=True, array_like=True):
    channels: tuple[str, ...]
    """Realtime channels of the church (``inbox``, ``message:<id>``, ...); empty for
    an event only webhooks receive (``member.*``)."""
    type: str
    """The event's type, so relaying needs no JSON decoding."""
    event: bytes
    """The whole event as JSON: ``{"type","id","occurred_at","data"}``."""


class LogRow(msgspec.Struct, frozen=True, array_like=True):
    church_id: uuid.UUID
    events: list[LoggedEvent]


class _Envelope(msgspec.Struct, frozen=True):
    """An event (storage/domain/events.py ``AnyEvent``) read only as far as a webhook
    copy needs: its ``data`` stays the bytes it was encoded to."""

    id: str
    type: str
    occurred_at: str
    data: msgspec.Raw


def _decode(items: bytes) -> list[tuple[uuid.UUID, LoggedEvent]]:
    return [(row.church_id, logged) for row in _row_decoder.decode(items) for logged in row.events]


_row_encoder = msgspec.msgpack.Encoder()
_row_decoder = msgspec.msgpack.Decoder(list[LogRow])
_envelope_decoder = msgspec.json.Decoder(_Envelope)

Emission = tuple[uuid.UUID, Sequence[str], AnyEvent]
"""(church, channels, event): one event to log."""


async def append(conn: Conn, emissions: Iterable[Emission]) -> bool:
    """Log events in the caller's transaction (call it inside the one that makes the
    change). Returns whether anything was logged; kick the relay after the commit."""
    by_church: dict[uuid.UUID, list[LoggedEvent]] = {}
    for church_id, channels, event in emissions:
        by_church.setdefault(church_id, []).append(
            LoggedEvent(channels=tuple(channels), type=event.type, event=encode(event))
        )
    if not by_church:
        return False
    # One log row per church (almost always one per transaction): a row is placed by
    # its church under Citus (deploy/citus.sql), beside the change it describes.
    churches = list(by_church)
    await conn.execute(
        "INSERT INTO event_log (church_id, items) SELECT * FROM unnest(%s::uuid[], %s::bytea[])",
        (
            churches,
            [_row_encoder.encode([LogRow(church_id=c, events=by_church[c])]) for c in churches],
        ),
    )
    return True


class EventRelay:
    """Moves committed events to realtime and webhooks in log order (see module doc)."""

    def __init__(self, pool: Pool, publisher: EventPublisher) -> None:
        self._pool = pool
        self._publisher = publisher
        self._kick = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._redis_down_until = 0.0
        self._backoff_s = 0.0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="event-relay")

    async def stop(self) -> None:
        """Stop, relaying what is left first (briefly: other processes' relays would
        find it too)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.drain(), 2.0)

    def kick(self) -> None:
        """Something was appended and committed in this process: relay it now."""
        self._kick.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), POLL_S)
                await asyncio.sleep(COALESCE_S)
            self._kick.clear()
            wait = self._redis_down_until - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            try:
                await self.drain()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("event relay step failed; retrying", exc_info=True)
                await asyncio.sleep(0.5)

    async def drain(self) -> int:
        """Relay until the log is empty, another process is draining, or Redis fails;
        returns how many events reached realtime."""
        published = 0
        for _ in range(_BUSY_TRIES):
            step = await self._step()
            if step is None:  # another process holds the drain: look again shortly
                await asyncio.sleep(_BUSY_RETRY_S)
                continue
            if step <= 0:
                return published
            published += step
        return published

    async def _step(self) -> int | None:
        """One batch: None when another drain runs, -1 when Redis failed, else the
        events published (0: the log was empty)."""
        async with self._pool.connection() as conn, conn.transaction():
            cur = await conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (_LOCK_DRAIN,))
            row = await cur.fetchone()
            if not row or not row[0]:
                return None
            # The position is read by the statement that sees the rows, so it is past
            # the commit of every transaction that logged them (read-your-writes).
            cur = await conn.execute(
                f"SELECT seq, items, hooked, {POSITION_SQL} FROM event_log "
                "WHERE NOT unreadable ORDER BY seq LIMIT %s",
                (BATCH_ROWS,),
            )
            found = await cur.fetchall()
            if not found:
                return 0
            seqs: list[int] = []
            fresh: list[tuple[uuid.UUID, LoggedEvent]] = []
            every: list[tuple[uuid.UUID, LoggedEvent]] = []
            position = position_of(max(row[3] for row in found))
            for seq, items, hooked, _ in found:
                try:
                    decoded = _decode(items)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    # Kept, not lost: a version of this code that reads it can relay it.
                    log.error("event log row unreadable; set aside", extra={"seq": seq})
                    await conn.execute(
                        "UPDATE event_log SET unreadable = true WHERE seq = %s", (seq,)
                    )
                    continue
                seqs.append(seq)
                every += decoded
                if not hooked:
                    fresh += decoded
            await self._to_webhooks(conn, fresh)
            try:
                published = await self._publish(every, position)
            except (RedisError, OSError) as exc:
                await conn.execute(
                    "UPDATE event_log SET hooked = true WHERE seq = ANY(%s)", (seqs,)
                )
                self._note_redis_down(exc)
                return -1
            await conn.execute("DELETE FROM event_log WHERE seq = ANY(%s)", (seqs,))
        self._backoff_s = 0.0
        return published

    async def _to_webhooks(self, conn: Conn, events: list[tuple[uuid.UUID, LoggedEvent]]) -> None:
        """Webhook copies for the endpoints that want them. Who wants what is read from
        Postgres now, not from a per-process cache: an endpoint made a moment ago gets
        every event logged after it. Only wanted events are decoded and sent."""
        churches = list({church_id for church_id, _ in events})
        if not churches:
            return
        cur = await conn.execute(
            "SELECT church_id, events FROM webhook_endpoint WHERE church_id = ANY(%s) AND enabled",
            (churches,),
        )
        filters: dict[uuid.UUID, set[str]] = {}
        for church_id, wanted in await cur.fetchall():
            filters.setdefault(church_id, set()).update(wanted)
        if not filters:
            return
        by_church: dict[uuid.UUID, list[tuple[str, str, str, str]]] = {}
        for church_id, logged in events:
            wanted = filters.get(church_id)
            if (
                wanted is None
                or logged.type not in WEBHOOK_EVENT_TYPES
                or not matches(wanted, logged.type)
            ):
                continue
            envelope = _envelope_decoder.decode(logged.event)
            by_church.setdefault(church_id, []).append(
                (envelope.id, envelope.type, bytes(envelope.data).decode(), envelope.occurred_at)
            )
        for church_id, hooks in by_church.items():
            await record_encoded(conn, church_id, hooks)

    async def _publish(self, events: list[tuple[uuid.UUID, LoggedEvent]], position: int) -> int:
        """Publish, and record the churches' read positions first in the same round
        trip: whoever sees an event and reads will find what it announced."""
        calls = [
            self._publisher.publish_encoded_call(church_id, channel, logged.type, logged.event)
            for church_id, logged in events
            for channel in logged.channels
        ]
        churches = dict.fromkeys(church_id for church_id, _ in events)
        positions = [self._publisher.positions.record_call(c, position) for c in churches]
        if calls:
            # On a cluster, only once a replica holds them: a failover must not drop
            # published events from history behind an epoch that survives it.
            await self._publisher.run_replicated([*positions, *calls])
        elif positions:
            # Webhook-only events never needed Redis: its absence must not hold them.
            try:
                await self._publisher.scripts.run(positions)
            except (RedisError, OSError):
                log.warning("read positions not recorded: redis unavailable")
        return len(calls)

    def _note_redis_down(self, exc: BaseException) -> None:
        self._backoff_s = min(2.0, max(0.05, self._backoff_s * 2))
        delay = self._backoff_s * (0.5 + random.random() / 2)
        self._redis_down_until = asyncio.get_running_loop().time() + delay
        # Not always an outage: on a cluster, a publish no replica confirmed (a failover
        # or a slot migration under way) waits in the log the same way.
        what = (
            "publish not confirmed by a replica"
            if isinstance(exc, NotReplicated)
            else "redis unavailable"
        )
        log.warning(f"{what}; events wait in the log", extra={"retry_s": delay, "error": str(exc)})
