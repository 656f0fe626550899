"""Queue entries and the producers that put them on Redis streams.

Two streams of work:

- the materialize stream: "turn accepted message X into recipient rows";
- the send shards: batches of recipient ids of one message, spread over
  ``shards`` streams by church so that one church's backlog sits on one shard
  and the others keep flowing.

Entries are msgpack-encoded Structs under the field ``j``. Postgres stays the
truth: losing any entry only delays work until the reconciler finds it.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from datetime import datetime

import msgspec

from storage import keys
from storage.redis_connection import Redis
from storage.scripts import ScriptRunner

STREAM_MAXLEN = 1_000_000


class MaterializeJob(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    church_id: uuid.UUID
    message_id: uuid.UUID
    created_at: datetime


class SendBatch(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="batch"):
    church_id: uuid.UUID
    message_id: uuid.UUID
    created_at: datetime
    recipient_ids: list[uuid.UUID]
    from_number: str
    attempt: int = 1
    max_attempts: int = 5


class ConversationSend(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="reply"):
    """A staff reply in a conversation: one outbound text to one member."""

    church_id: uuid.UUID
    conversation_id: uuid.UUID
    message_id: uuid.UUID
    attempt: int = 1
    max_attempts: int = 5


Work = SendBatch | ConversationSend

_encoder = msgspec.msgpack.Encoder()
materialize_decoder = msgspec.msgpack.Decoder(MaterializeJob)
send_decoder = msgspec.msgpack.Decoder(Work)


def shard_of(church_id: uuid.UUID, shards: int) -> int:
    return int.from_bytes(hashlib.blake2s(church_id.bytes, digest_size=4).digest(), "big") % shards


async def enqueue_materialize(redis: Redis, job: MaterializeJob) -> str:
    entry_id = await redis.xadd(
        keys.MATERIALIZE_STREAM,
        {"j": _encoder.encode(job)},
        maxlen=STREAM_MAXLEN,
        approximate=True,
    )
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


async def enqueue_sends(redis: Redis, batches: Sequence[Work], shards: int) -> int:
    """XADD every batch in one pipeline round trip; returns how many were added."""
    if not batches:
        return 0
    pipe = redis.pipeline(transaction=False)
    for batch in batches:
        pipe.xadd(
            keys.send_stream(shard_of(batch.church_id, shards)),
            {"j": _encoder.encode(batch)},
            maxlen=STREAM_MAXLEN,
            approximate=True,
        )
    await pipe.execute()
    return len(batches)


_DUE_LUA = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, entry in ipairs(due) do
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'j', entry)
  redis.call('ZREM', KEYS[1], entry)
end
return #due
"""


async def schedule_retry(redis: Redis, batch: Work, due_ms: int, shards: int) -> None:
    await redis.zadd(
        keys.delayed_set(shard_of(batch.church_id, shards)), {_encoder.encode(batch): due_ms}
    )


class RetryPump:
    """Moves due retries from each shard's sorted set onto its stream, atomically
    (one Lua call per shard: the entry is either still delayed or queued); all
    shards in one pipelined round trip."""

    def __init__(self, redis: Redis, shards: int) -> None:
        self._scripts = ScriptRunner(redis)
        self._due = self._scripts.register(_DUE_LUA)
        self._shards = shards

    async def pump(self, now_ms: int, limit: int = 500) -> int:
        moved = await self._scripts.run(
            [
                (
                    self._due,
                    [keys.delayed_set(shard), keys.send_stream(shard)],
                    [now_ms, limit, STREAM_MAXLEN],
                )
                for shard in range(self._shards)
            ]
        )
        return sum(int(m) for m in moved)


def encode_entry(value: MaterializeJob | Work) -> bytes:
    return _encoder.encode(value)
