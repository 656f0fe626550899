"""Every Redis key name, in one place.

Keys that belong to one church carry the hash tag ``{c:<church_id>}`` so that a
Lua script or multi-key command touching them stays in one Redis Cluster slot
(docs/architecture.md decision 9). Global keys are few and never hot per request.
"""

from __future__ import annotations

import uuid

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
# the church, and a short list whose pushes wake idle workers.
def ready_set(shard: int) -> str:
    return f"{PREFIX}:q:{{r{shard}}}:ready"


def ready_wake(shard: int) -> str:
    return f"{PREFIX}:q:{{r{shard}}}:wake"


# Sending limits and the circuit breaker of one provider account
# (storage/redis/send_limits.py): every bucket of the account (the account's own and one
# per sending number) and its circuit share the account tag, so one script checks
# them all atomically. ``account`` is a digest, never the API key itself.
def provider_tag(account: str) -> str:
    return f"{{p:{account}}}"


def send_bucket(account: str, name: str) -> str:
    """``name`` is ``account`` or ``n:<E.164 sending number>``."""
    return f"{PREFIX}:tb:{provider_tag(account)}:{name}"


def provider_circuit(account: str) -> str:
    return f"{PREFIX}:cb:{provider_tag(account)}"
