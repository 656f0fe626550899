"""Every Redis key name, in one place.

Keys that belong to one church carry the hash tag ``{c:<church_id>}`` so that a
Lua script or multi-key command touching them stays in one Redis Cluster slot
(docs/architecture.md decision 9). Global keys are few and never hot per request.
"""

from __future__ import annotations

import functools
import uuid

from redis.crc import key_slot

PREFIX = "kn"


def church_tag(church_id: uuid.UUID) -> str:
    return f"{{c:{church_id}}}"


# Realtime: per-channel history stream, its epoch, and the pub/sub channel name.
def channel_history(church_id: uuid.UUID, channel: str) -> str:
    return f"{PREFIX}:rt:{church_tag(church_id)}:h:{channel}"


def channel_epoch(church_id: uuid.UUID, channel: str) -> str:
    return f"{PREFIX}:rt:{church_tag(church_id)}:e:{channel}"


def channel_pubsub(church_id: uuid.UUID, channel: str) -> str:
    return f"{PREFIX}:rt:{church_tag(church_id)}:p:{channel}"


PUBSUB_PREFIX = f"{PREFIX}:rt:"


def parse_pubsub(name: str) -> tuple[uuid.UUID, str] | None:
    """(church id, channel) of a pub/sub channel name made by channel_pubsub."""
    if not name.startswith(PUBSUB_PREFIX + "{c:"):
        return None
    rest = name[len(PUBSUB_PREFIX) + 3 :]
    end = rest.find("}:p:")
    if end < 0:
        return None
    try:
        church_id = uuid.UUID(rest[:end])
    except ValueError:
        return None
    return church_id, rest[end + 4 :]


# Delivery queue: shard streams with one consumer group; the materialize stream.
SEND_GROUP = "workers"


def send_stream(shard: int) -> str:
    return f"{PREFIX}:q:{{s{shard}}}:send"


def delayed_set(shard: int) -> str:
    """Sorted set of batches waiting for a retry, scored by due time (ms)."""
    return f"{PREFIX}:q:{{s{shard}}}:delayed"


MATERIALIZE_STREAM = f"{PREFIX}:q:materialize"
DEAD_LETTER_STREAM = f"{PREFIX}:q:dead"


# Message progress counters and the coalescing lock for progress events.
def message_counts(church_id: uuid.UUID, message_id: uuid.UUID) -> str:
    return f"{PREFIX}:mc:{church_tag(church_id)}:{message_id}"


def progress_gate(church_id: uuid.UUID, message_id: uuid.UUID) -> str:
    return f"{PREFIX}:mp:{church_tag(church_id)}:{message_id}"


# Staff sessions.
def session(token_hash: str) -> str:
    return f"{PREFIX}:sess:{token_hash}"


def realtime_ticket(ticket_hash: str) -> str:
    """A one-time realtime ticket (single use, 30 s)."""
    return f"{PREFIX}:rtt:{ticket_hash}"


# Request limits (storage/redis/rate_limits.py). A church's and its keys' limits share
# the church tag so one script checks both; login limits are tagged by IP or account.
def church_rate(church_id: uuid.UUID) -> str:
    return f"{PREFIX}:rl:{church_tag(church_id)}"


def api_key_rate(church_id: uuid.UUID, key_id: uuid.UUID) -> str:
    return f"{PREFIX}:rl:{church_tag(church_id)}:k:{key_id}"


def login_rate(kind: str, who: str) -> str:
    """``kind`` is ``login-ip``, ``login-account``, ``reset-ip`` or ``reset-account``."""
    return f"{PREFIX}:rl:{{{kind}:{who}}}"


# Read-your-writes (storage/redis/read_positions.py): the church's last commit
# position, tagged like its rate limit so the limiter's script reads it.
def read_position(church_id: uuid.UUID) -> str:
    return f"{PREFIX}:rp:{church_tag(church_id)}"


# Cache-aside entries (storage/redis/cache.py), tagged by church.
def cached(church_id: uuid.UUID, name: str) -> str:
    return f"{PREFIX}:cache:{church_tag(church_id)}:{name}"


def api_key_auth(token_hash: str) -> str:
    """Cached principal of an API key, by SHA-256 of the whole key."""
    return f"{PREFIX}:ak:{token_hash}"


# Staff: the sessions of one user (a set of session token hashes), so a role
# change rewrites them and a removal or password reset deletes them at once.
def user_sessions(church_id: uuid.UUID, user_id: uuid.UUID) -> str:
    return f"{PREFIX}:us:{church_tag(church_id)}:{user_id}"


# Credentials ended before their time (logout, staff removal, password reset or
# change, API key revoke or rotate): one pub/sub channel that every web node's hub
# listens to, so realtime connections on any node close with 4001. Global on
# purpose: every node needs every message, and they are rare (a person's action,
# never per request); on Redis Cluster a plain PUBLISH reaches every node anyway.
CREDENTIAL_REVOCATIONS = f"{PREFIX}:revoked"


# Delivery queue, per church (storage/redis/queue.py): each church's send stream (one
# consumer group, SEND_GROUP) and its sorted set of delayed retries share the
# church tag, so one script moves due retries onto the stream and claims from it.
def church_send_stream(church_id: uuid.UUID) -> str:
    return f"{PREFIX}:q:{church_tag(church_id)}:send"


def church_delayed(church_id: uuid.UUID) -> str:
    """A church's batches waiting for a retry or a pause, scored by due time (ms)."""
    return f"{PREFIX}:q:{church_tag(church_id)}:delayed"


# Churches with work, spread over ``shards`` ready sets (no key serves every church):
# a sorted set of church ids scored by the time (ms) a worker should next look at
# the church, and a short list whose pushes wake idle workers. A shard's set and
# list share its tag (one script touches both); the tags are chosen so that the
# shards sit evenly over the cluster's 16384 slots (shard s of n in the s-th n-th
# of the slot range), so masters that split the slots evenly share the shards
# evenly too: plain ``{r0}`` ... ``{r7}`` put half of eight shards on one of three
# masters.
def ready_tag(shard: int, shards: int) -> str:
    return _spread_tag("r", shard, shards)


def ready_set(shard: int, shards: int) -> str:
    return f"{PREFIX}:q:{ready_tag(shard, shards)}:ready"


def ready_wake(shard: int, shards: int) -> str:
    return f"{PREFIX}:q:{ready_tag(shard, shards)}:wake"


def legacy_ready_set(shard: int) -> str:
    """A ready set of earlier versions (``{r<shard>}``), drained at worker start."""
    return f"{PREFIX}:q:{{r{shard}}}:ready"


def legacy_ready_wake(shard: int) -> str:
    return f"{PREFIX}:q:{{r{shard}}}:wake"


@functools.cache
def _spread_tag(kind: str, shard: int, shards: int) -> str:
    """``{<kind><shard>.<k>}`` with the smallest k whose slot lies in the shard's
    share of the slot range (about ``shards`` tries; deterministic, so every
    process names the same keys)."""
    shards = max(1, shards)
    low, high = shard * SLOTS // shards, (shard + 1) * SLOTS // shards
    for k in range(1_000_000):
        tag = f"{{{kind}{shard}.{k}}}"
        if low <= key_slot(tag.encode()) < high:
            return tag
    raise AssertionError("no hash tag found")  # pragma: no cover - 16384 slots, ~n tries


SLOTS = 16384
"""Redis Cluster's hash slots."""


# Sending limits and the circuit breaker of one provider account
# (storage/redis/send_limits.py). The account's own bucket and its circuit are one
# per provider account by nature (touched once per batch of sends, never per text)
# and share the account tag; each sending number's bucket carries a tag of its own,
# so numbers spread over the cluster instead of all landing on the account's slot.
# ``account`` is a digest, never the API key itself.
def provider_tag(account: str) -> str:
    return f"{{p:{account}}}"


def send_bucket(account: str, name: str) -> str:
    """``name`` is ``account`` (the account's tag) or ``n:<E.164 sending number>``
    (the number's own tag)."""
    if name.startswith("n:"):
        return f"{PREFIX}:tb:{{pn:{account}:{name[2:]}}}"
    return f"{PREFIX}:tb:{provider_tag(account)}:{name}"


def provider_circuit(account: str) -> str:
    return f"{PREFIX}:cb:{provider_tag(account)}"


def hash_tag(key: str) -> str:
    """The part of a key Redis Cluster hashes: the first ``{...}`` with something
    inside, else the whole key."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key
