"""Queue entries, the producers that put them on Redis streams, and fair claiming.

Two kinds of work:

- the materialize stream: "turn accepted message X into recipient rows" (one
  entry per broadcast, read with a blocking ``XREADGROUP``);
- sends: batches of recipient ids of one message (a broadcast's, or the one
  recipient of a staff reply or an automatic answer), on the church's own
  stream ``kn:q:{c:<church>}:send`` (consumer group ``workers``), with the
  church's delayed retries in a sorted set under the same tag.

Fairness. A church with work is announced in one of ``shards`` *ready sets*
(sorted sets of church ids; the shard is a hash of the church, so no key serves
every church). A church's score is the time (ms, Redis clock) a worker should
next look at it. A worker *leases* the church with the lowest score that is due
(its score moves a few seconds ahead, so other workers pass it by), *takes* at
most ``quantum`` entries from its stream, and *releases* it with a new score:
now when it has more unread work (behind every church that has waited longer),
the due time of its next retry, or a check-back time while entries are still in
flight. Churches therefore take turns in the order they have waited: a 5-recipient
message waits for about one batch of a 50,000-recipient broadcast, whichever
church it comes from, and a broadcast alone is leased again and again at full
speed. A throttled church is *paused* (its score raised to when its sending
number has tokens), so it holds no worker while it waits.

Idle workers block on the ready sets' wake lists (``BLPOP``) instead of polling:
a church that becomes due now pushes one token (on Redis Cluster, one list at a
time: see ``SendQueue.wait``). Every step is one Lua script on one hash tag (the
church's, or the ready set's, spread over the slots: key_names.ready_tag), so the
layout fits Redis Cluster; ready set and church stream are touched in separate
calls, ordered so that a lost race only ever leaves a church announced with
nothing to do, never work without an announcement. A crash between a church's
entries and its announcement leaves work that Postgres still holds and the
reconciler enqueues again; a worker that dies holding a lease leaves the church
due again when the lease ends.

Takeover. Entries a dead worker read stay pending; the take script claims those
idle past ``claim_idle_ms`` (``XAUTOCLAIM``) before reading new ones, and a church
with entries in flight keeps a check-back score, so somebody looks again.
Finished entries are acknowledged and deleted (the stream's length is its
backlog). Entries are msgpack-encoded Structs under the field ``j``. Postgres
stays the truth: losing any entry only delays work until the reconciler finds it.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
import uuid
import weakref
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import msgspec
from redis.exceptions import RedisError

from storage.redis import key_names
from storage.redis.connection import Redis, is_cluster
from storage.redis.scripts import Call, ScriptRunner, lua

log = logging.getLogger("koinonia.storage.queue")

STREAM_MAXLEN = 1_000_000
LEASE_MS = 5_000
"""How long a leased church is passed over by others; a lease normally ends
within milliseconds (take, then release) and only outlives a dead worker."""
WAKE_TOKENS = 256
"""At most this many wake-ups wait in a wake list (surplus ones are harmless)."""
DUE_PER_TAKE = 200
"""Delayed entries moved onto a church's stream per take, at most."""
REFRESH_MS = 200
CLUSTER_WAIT_S = 0.2
"""On Redis Cluster an idle worker blocks on one wake list at a time, this long at
most (then it looks at every ready set): the longest an idle worker can miss work
announced in another shard."""
"""A busy worker looks at every ready set's head this often (one round trip), so
a church announced in another set than the one it is draining gets its turn."""


# ``omit_defaults``: a field at its default is left out of the entry, so an entry
# without trace context (tracing off) is one an earlier version reads too.


class MaterializeJob(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    church_id: uuid.UUID
    message_id: uuid.UUID
    created_at: datetime
    traceparent: str = ""
    """W3C trace context of the acceptance (storage/process/tracing.py); empty when
    tracing is off or the entry was made by a sweep."""


class SendBatch(
    msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True, tag="batch"
):
    """Recipients of one message to send: a broadcast's (up to ``batch_size``), or the
    single recipient of a staff reply or an automatic answer (``conversation_id``
    set). Every text we send travels as one of these."""

    church_id: uuid.UUID
    message_id: uuid.UUID
    created_at: datetime
    recipient_ids: list[uuid.UUID]
    from_number: str
    attempt: int = 1
    max_attempts: int = 5
    conversation_id: uuid.UUID | None = None
    """The conversation of a reply or answer; None for a broadcast."""
    traceparent: str = ""
    """W3C trace context the batch's spans continue (the materialize job's, or the
    reply's acceptance); empty when tracing is off."""


Work = SendBatch
"""What a church's send stream carries."""

_encoder = msgspec.msgpack.Encoder()
materialize_decoder = msgspec.msgpack.Decoder(MaterializeJob)
send_decoder = msgspec.msgpack.Decoder(Work)


def shard_of(church_id: uuid.UUID, shards: int) -> int:
    """The ready set a church is announced in."""
    return int.from_bytes(hashlib.blake2s(church_id.bytes, digest_size=4).digest(), "big") % shards


def encode_entry(value: MaterializeJob | Work) -> bytes:
    return _encoder.encode(value)


# -- scripts ---------------------------------------------------------------------------------

_ADD_LUA = lua("queue_add")

_ANNOUNCE_LUA = lua("queue_announce")

_LEASE_LUA = lua("queue_lease")

_RELEASE_LUA = lua("queue_release")

_PAUSE_LUA = lua("queue_pause")

_TAKE_LUA = lua("queue_take")

_SOURCES = {
    "add": _ADD_LUA,
    "announce": _ANNOUNCE_LUA,
    "lease": _LEASE_LUA,
    "release": _RELEASE_LUA,
    "pause": _PAUSE_LUA,
    "take": _TAKE_LUA,
}
_SHAS = {name: hashlib.sha1(source.encode()).hexdigest() for name, source in _SOURCES.items()}
_runners: weakref.WeakKeyDictionary[Redis, ScriptRunner] = weakref.WeakKeyDictionary()


def _scripts(redis: Redis) -> ScriptRunner:
    """One runner per client with every queue script registered (run by SHA)."""
    runner = _runners.get(redis)
    if runner is None:
        runner = ScriptRunner(redis)
        for source in _SOURCES.values():
            runner.register(source)
        _runners[redis] = runner
    return runner


async def _run(redis: Redis, calls: Sequence[Call]) -> list[Any]:
    return await _scripts(redis).run(calls)


def _announce_call(church_id: uuid.UUID, shards: int, score_ms: int) -> Call:
    shard = shard_of(church_id, shards)
    return (
        _SHAS["announce"],
        [key_names.ready_set(shard, shards), key_names.ready_wake(shard, shards)],
        [str(church_id), score_ms, WAKE_TOKENS],
    )


# -- producers -------------------------------------------------------------------------------


async def enqueue_materialize(redis: Redis, job: MaterializeJob) -> str:
    entry_id = await redis.xadd(
        key_names.MATERIALIZE_STREAM,
        {"j": _encoder.encode(job)},
        maxlen=STREAM_MAXLEN,
        approximate=True,
    )
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


async def enqueue_sends(redis: Redis, batches: Sequence[Work], shards: int) -> int:
    """Append every batch to its church's stream, then announce each church in its
    ready set (two pipelined round trips, in that order: a worker that leases the
    church finds the entries there). Returns how many were added."""
    if not batches:
        return 0
    by_church: dict[uuid.UUID, list[bytes]] = {}
    for batch in batches:
        by_church.setdefault(batch.church_id, []).append(_encoder.encode(batch))
    await _run(
        redis,
        [
            (
                _SHAS["add"],
                [key_names.church_send_stream(church_id)],
                [key_names.SEND_GROUP, STREAM_MAXLEN, *payloads],
            )
            for church_id, payloads in by_church.items()
        ],
    )
    await _run(redis, [_announce_call(church_id, shards, -1) for church_id in by_church])
    return len(batches)


async def hand_over(redis: Redis, batches: Sequence[Work], shards: int) -> bool:
    """Enqueue sends whose rows were just committed. Redis being unreachable is not
    the caller's failure: Postgres holds the work, and the reconciler enqueues it
    again after ``reconcile_after_s``. Returns whether it was enqueued now."""
    try:
        await enqueue_sends(redis, batches, shards)
    except (RedisError, OSError):
        log.warning("enqueue deferred to the reconciler", extra={"batches": len(batches)})
        return False
    return True


async def schedule_retry(redis: Redis, batch: Work, due_ms: int, shards: int) -> None:
    """Put a batch in its church's delayed set until ``due_ms`` (wall clock, ms) and
    make sure the church is looked at by then."""
    await redis.zadd(key_names.church_delayed(batch.church_id), {_encoder.encode(batch): due_ms})
    await _run(redis, [_announce_call(batch.church_id, shards, due_ms)])


# -- consumers -------------------------------------------------------------------------------


class Taken(msgspec.Struct, frozen=True):
    """Entries taken from one church's stream; ``entries`` are (entry id, payload)."""

    church_id: uuid.UUID
    stream: str
    entries: list[tuple[str, bytes | None]]


class SendQueue:
    """One worker's view of the send queue: claim fairly, block while idle, finish.

    Not safe for concurrent ``claim`` calls: a worker has one reading loop.
    """

    def __init__(
        self,
        redis: Redis,
        shards: int,
        consumer: str,
        *,
        quantum: int = 1,
        claim_idle_ms: int = 60_000,
    ) -> None:
        self._redis = redis
        self._shards = shards
        self._consumer = consumer
        self._quantum = max(1, quantum)
        self._claim_idle_ms = claim_idle_ms
        self._next_ms = [0.0] * shards
        """Per ready set, its lowest score as last seen (0: look now)."""
        self._refreshed_ms = 0.0
        self._ready_keys = [key_names.ready_set(s, shards) for s in range(shards)]
        self._wake_keys = [key_names.ready_wake(s, shards) for s in range(shards)]
        # On a cluster the wake lists sit in different slots and one BLPOP may only
        # name keys of one slot: block on one list at a time, in turn, briefly.
        self._cluster = is_cluster(redis)
        self._wait_turn = 0

    async def claim(self) -> Taken | None:
        """Lease the longest-waiting due church (across the ready sets, as last seen),
        take up to ``quantum`` entries from it, release it. None when no church is due."""
        now = time.time() * 1000
        if now - self._refreshed_ms > REFRESH_MS:
            await self._refresh()
            now = time.time() * 1000
        for shard in sorted(range(self._shards), key=self._next_ms.__getitem__):
            if self._next_ms[shard] > now:
                break
            for _ in range(8):  # a few churches that turn out to have nothing left
                taken, again = await self._claim_in(shard)
                if taken is not None:
                    return taken
                if not again:
                    break
        return None

    async def _refresh(self) -> None:
        """The lowest score of every ready set, in one round trip: work announced by
        others since the last look, wherever it is."""
        pipe = self._redis.pipeline(transaction=False)
        for shard in range(self._shards):
            pipe.zrange(self._ready_keys[shard], 0, 0, withscores=True)
        firsts = await pipe.execute()
        self._next_ms = [float(f[0][1]) if f else float("inf") for f in firsts]
        self._refreshed_ms = time.time() * 1000

    async def _claim_in(self, shard: int) -> tuple[Taken | None, bool]:
        lease = await _run(
            self._redis,
            [(_SHAS["lease"], [self._ready_keys[shard]], [LEASE_MS, random.randrange(1000)])],
        )
        church, token, now = lease[0]
        if not church:
            self._next_ms[shard] = float("inf") if int(token) < 0 else float(token)
            return None, False
        church_id = uuid.UUID(_text(church))
        stream = key_names.church_send_stream(church_id)
        took: Any = (
            await _run(
                self._redis,
                [
                    (
                        _SHAS["take"],
                        [stream, key_names.church_delayed(church_id)],
                        [
                            key_names.SEND_GROUP,
                            self._consumer,
                            self._quantum,
                            self._claim_idle_ms,
                            DUE_PER_TAKE,
                            STREAM_MAXLEN,
                        ],
                    )
                ],
            )
        )[0]
        flat, more, next_due, pending, now = took
        entries = [(_text(flat[i]), flat[i + 1] or None) for i in range(0, len(flat), 2)]
        candidates = []
        if int(more):
            candidates.append(int(now))
        if int(next_due) >= 0:
            candidates.append(int(next_due))
        if int(pending):
            candidates.append(int(now) + self._claim_idle_ms)
        score = min(candidates) if candidates else -1
        first = (
            await _run(
                self._redis,
                [
                    (
                        _SHAS["release"],
                        [self._ready_keys[shard], self._wake_keys[shard]],
                        [str(church_id), token, score, WAKE_TOKENS],
                    )
                ],
            )
        )[0]
        self._next_ms[shard] = float("inf") if int(first) < 0 else float(first)
        if not entries:
            return None, True
        return Taken(church_id=church_id, stream=stream, entries=entries), True

    def next_due_in_s(self) -> float:
        """Seconds until a ready set is known to have a due church (inf: none known)."""
        return max(0.0, min(self._next_ms) / 1000 - time.time())

    async def wait(self, timeout_s: float) -> None:
        """Block until a church becomes due (a wake token) or ``timeout_s`` passes;
        then look at every ready set again."""
        timeout = max(0.05, min(timeout_s, 1.0))
        keys = self._wake_keys
        if self._cluster:
            # One slot per BLPOP: this shard's list now, the next one next time. A
            # token pushed to another list is seen at the latest when this short
            # wait ends, since a timeout makes the next claim look at every ready
            # set (one pipelined round trip per master).
            timeout = min(timeout, CLUSTER_WAIT_S)
            self._wait_turn = (self._wait_turn + 1) % len(keys)
            keys = [keys[self._wait_turn]]
        # BLPOP takes whole seconds or a float; a wake token names its ready set.
        popped: Any = await self._redis.blpop(keys, timeout=timeout)
        if popped:
            name = _text(popped[0])
            for shard, key in enumerate(self._wake_keys):
                if key == name:
                    self._next_ms[shard] = 0.0
        else:
            self._refreshed_ms = 0.0

    def look_again(self, church_id: uuid.UUID, at_ms: float = 0.0) -> None:
        """This worker itself made work for a church due at ``at_ms``."""
        shard = shard_of(church_id, self._shards)
        self._next_ms[shard] = min(self._next_ms[shard], at_ms)

    async def done(self, stream: str, entry_id: str) -> None:
        """Acknowledge and delete a finished entry (one round trip)."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.xack(stream, key_names.SEND_GROUP, entry_id)
        pipe.xdel(stream, entry_id)
        await pipe.execute()

    async def pause(self, church_id: uuid.UUID, until_ms: int) -> None:
        """Pass a church over until ``until_ms`` (its sending number has no tokens)."""
        await _run(
            self._redis,
            [
                (
                    _SHAS["pause"],
                    [self._ready_keys[shard_of(church_id, self._shards)]],
                    [str(church_id), until_ms],
                )
            ],
        )


async def queue_depths(redis: Redis, shards: int, sample: int = 500) -> dict[str, int]:
    """Backlog figures for /health/detailed: churches with work (and how many are due
    now), and over up to ``sample`` of them, entries not yet finished, in flight, and
    waiting for a retry."""
    now_ms = int(time.time() * 1000)
    pipe = redis.pipeline(transaction=False)
    for shard in range(shards):
        pipe.zcard(key_names.ready_set(shard, shards))
        pipe.zcount(key_names.ready_set(shard, shards), "-inf", now_ms)
        pipe.zrange(key_names.ready_set(shard, shards), 0, max(0, sample // shards - 1))
    raw = await pipe.execute()
    churches = sum(int(raw[i]) for i in range(0, len(raw), 3))
    due = sum(int(raw[i]) for i in range(1, len(raw), 3))
    listed = [uuid.UUID(_text(c)) for i in range(2, len(raw), 3) for c in raw[i]]
    backlog = pending = delayed = 0
    if listed:
        pipe = redis.pipeline(transaction=False)
        for church_id in listed:
            pipe.xlen(key_names.church_send_stream(church_id))
            pipe.xpending(key_names.church_send_stream(church_id), key_names.SEND_GROUP)
            pipe.zcard(key_names.church_delayed(church_id))
        values = await pipe.execute(raise_on_error=False)
        for i in range(0, len(values), 3):
            backlog += int(values[i]) if isinstance(values[i], int) else 0
            info = values[i + 1]
            pending += int(info["pending"]) if isinstance(info, dict) else 0
            delayed += int(values[i + 2]) if isinstance(values[i + 2], int) else 0
    return {
        "churches_with_work": churches,
        "churches_due": due,
        "send_stream_length": backlog,
        "pending": pending,
        "delayed_retries": delayed,
    }


class Backlog(msgspec.Struct, frozen=True):
    """Queue figures for the worker's metrics (storage/process/metrics.py)."""

    send: list[int]
    """Per ready shard: entries not finished on the streams of (up to ``sample``
    of) its churches; in flight included, delayed retries not."""
    send_oldest_age_s: float
    """Age of the oldest of those entries (0 when none)."""
    materialize: int
    """Materialize entries not yet read, or read and not acknowledged."""
    materialize_oldest_age_s: float
    dead_letters: int


async def queue_backlog(redis: Redis, shards: int, sample: int = 500) -> Backlog:
    """Backlog and age of the oldest entry per queue, in two pipelined round trips
    (ages by the Redis clock, which stamps the entry ids)."""
    per_shard = max(1, sample // max(1, shards))
    pipe = redis.pipeline(transaction=False)
    # Raw, since redis-py's cluster pipeline refuses its ``time()`` method (the
    # command itself goes to one node like any keyless one).
    pipe.execute_command("TIME")
    for shard in range(shards):
        pipe.zrange(key_names.ready_set(shard, shards), 0, per_shard - 1)
    pipe.xinfo_groups(key_names.MATERIALIZE_STREAM)
    pipe.xlen(key_names.DEAD_LETTER_STREAM)
    raw = await pipe.execute(raise_on_error=False)
    seconds, micros = raw[0]
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    churches = [[uuid.UUID(_text(c)) for c in raw[1 + s]] for s in range(shards)]
    groups, dead = raw[1 + shards], raw[2 + shards]
    group: dict[str, Any] | None = None
    for candidate in groups if isinstance(groups, list) else ():
        if _text(candidate.get("name", b"")) == key_names.SEND_GROUP:
            group = candidate
    pending = int(group.get("pending") or 0) if group else 0
    lag = int(group.get("lag") or 0) if group else 0
    pipe = redis.pipeline(transaction=False)
    for listed in churches:
        for church_id in listed:
            pipe.xlen(key_names.church_send_stream(church_id))
            pipe.xrange(key_names.church_send_stream(church_id), "-", "+", count=1)
    if pending:
        pipe.xpending(key_names.MATERIALIZE_STREAM, key_names.SEND_GROUP)
    if lag and group is not None:
        after = _text(group.get("last-delivered-id") or "0-0")
        pipe.xrange(key_names.MATERIALIZE_STREAM, f"({after}", "+", count=1)
    values = await pipe.execute(raise_on_error=False) if len(pipe) else []
    send: list[int] = []
    oldest: list[int] = []
    i = 0
    for listed in churches:
        total = 0
        for _ in listed:
            length, first = values[i], values[i + 1]
            i += 2
            total += length if isinstance(length, int) else 0
            if isinstance(first, list) and first:
                oldest.append(_id_ms(first[0][0]))
        send.append(total)
    materialize_oldest: list[int] = []
    if pending:
        summary = values[i]
        i += 1
        if isinstance(summary, dict) and summary.get("min"):
            materialize_oldest.append(_id_ms(summary["min"]))
    if lag and group is not None:
        first = values[i]
        if isinstance(first, list) and first:
            materialize_oldest.append(_id_ms(first[0][0]))

    def age(stamps: list[int]) -> float:
        return max(0.0, (now_ms - min(stamps)) / 1000) if stamps else 0.0

    return Backlog(
        send=send,
        send_oldest_age_s=age(oldest),
        materialize=pending + lag,
        materialize_oldest_age_s=age(materialize_oldest),
        dead_letters=dead if isinstance(dead, int) else 0,
    )


def _id_ms(entry_id: bytes | str) -> int:
    """The milliseconds part of a stream entry id (when Redis stamped it)."""
    return int(_text(entry_id).partition("-")[0] or 0)


async def migrate_shard_streams(redis: Redis, shards: int, legacy_shards: int = 8) -> int:
    """Move entries left in the shard streams of earlier versions (``kn:q:{s<n>}``)
    onto the churches' own streams, then drop those keys; returns how many moved.
    Safe to run from several workers at once: a duplicate entry finds its recipients
    already sent (and the provider's idempotency key covers a race)."""
    moved: list[Work | None] = []
    for shard in range(legacy_shards):
        for name in (key_names.send_stream(shard), key_names.delayed_set(shard)):
            kind: Any = await redis.type(name)
            if _text(kind) == "stream":
                entries: Any = await redis.xrange(name)
                moved += [_decode_work(fields.get(b"j")) for _, fields in entries]
            elif _text(kind) == "zset":
                members: Any = await redis.zrange(name, 0, -1)
                moved += [_decode_work(m) for m in members]
            else:
                continue
    work = [w for w in moved if w is not None]
    if work:
        await enqueue_sends(redis, work, shards)
    for shard in range(legacy_shards):
        # Both keys carry the tag {s<shard>}: one slot, one DEL.
        await redis.delete(key_names.send_stream(shard), key_names.delayed_set(shard))
    await _migrate_ready_sets(redis, shards, max(shards, legacy_shards))
    return len(work)


async def _migrate_ready_sets(redis: Redis, shards: int, legacy_shards: int) -> None:
    """Announce the churches of earlier versions' ready sets (``{r<n>}``, before
    their tags were spread over the slots) in today's, then drop the old keys. The
    church streams are untouched: an announcement only says where to look."""
    for shard in range(legacy_shards):
        name = key_names.legacy_ready_set(shard)
        members: Any = await redis.zrange(name, 0, -1, withscores=True)
        if members:
            await _run(
                redis,
                [
                    _announce_call(uuid.UUID(_text(church)), shards, int(score))
                    for church, score in members
                ],
            )
        await redis.delete(name)
        await redis.delete(key_names.legacy_ready_wake(shard))


def _decode_work(payload: bytes | None) -> Work | None:
    if payload is None:
        return None
    try:
        work: Work = send_decoder.decode(payload)
    except msgspec.DecodeError:
        return None
    return work


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
