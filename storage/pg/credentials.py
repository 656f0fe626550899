"""Credentials and the principal they become.

Two kinds of credentials reach every surface (REST, WebSocket, SSE):

- API keys ``kn_<prefix>_<secret>``: the prefix finds the row (and is shown to
  people to tell keys apart), the secret is only ever stored as SHA-256;
- staff sessions: a random token in an httpOnly cookie, stored in Redis under
  its SHA-256 so any web node serves any request.

Both turn into a ``Principal``: the one church a request acts in, and what it
may do there. REST and realtime share this module (docs/architecture.md: turning
credentials into a principal lives in storage).

Every function that ends credentials before their time (logout, staff removal,
password reset or change, API key revoke or rotate) also publishes a revocation
on ``key_names.CREDENTIAL_REVOCATIONS``, so realtime connections that authenticated
with them, on any web node, close with 4001. A message is ASCII words:
``session <hash> [<hash> ...]``, ``user <church id> <user id>`` (every session
of that user) or ``api_key <key id>``; ``parse_revocation`` reads one. A role
change rewrites sessions in place and is not a revocation: it publishes
``role <church id> <user id>`` on the same channel, which closes nothing but drops
the user's principals that web processes cached (storage/process/principal_cache.py).

Those functions take ``local``: the calling process's own cache, told before the
function returns, so the process's next request does not wait for the message.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
import uuid
from collections.abc import Callable
from datetime import datetime

import msgspec

from storage.domain.errors import NotFound
from storage.domain.ids import uuid7
from storage.pg.database import Conn, Pool
from storage.pg.pagination import Page, decode_cursor, page_of
from storage.redis import key_names
from storage.redis.connection import Redis

ALL_SCOPES: tuple[str, ...] = ("read", "write")


class Principal(msgspec.Struct, frozen=True):
    church_id: uuid.UUID
    kind: str
    """``session`` or ``api_key``."""
    scopes: frozenset[str]
    user_id: uuid.UUID | None = None
    api_key_id: uuid.UUID | None = None
    role: str | None = None
    csrf_token: str | None = None
    rate_limit_per_min: int | None = None
    """An API key's own request limit (None: the default per-key limit)."""
    session_hash: str | None = None
    """A session's token hash (hex SHA-256): what a revocation names. Tickets carry
    it over, so a connection opened with a ticket ends with the session it stands for."""

    def can(self, scope: str) -> bool:
        return scope in self.scopes


class ApiKey(msgspec.Struct, frozen=True):
    id: uuid.UUID
    name: str
    prefix: str
    scopes: list[str]
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None
    rate_limit_per_min: int | None = None


_KEY_COLUMNS = "id, name, prefix, scopes, created_at, last_used_at, revoked_at, rate_limit_per_min"


class SessionRecord(msgspec.Struct, frozen=True):
    church_id: uuid.UUID
    user_id: uuid.UUID
    role: str
    csrf: str
    expires_at: float | None = None
    """Unix time the session ends (its key's expiry): how long a process may cache
    its principal. None in records written before it was kept."""


_session_encoder = msgspec.msgpack.Encoder()
_session_decoder = msgspec.msgpack.Decoder(SessionRecord)


def _sha256(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


SESSION_REVOKED = "session"
USER_REVOKED = "user"
API_KEY_REVOKED = "api_key"
ROLE_CHANGED = "role"
"""Not a revocation: a user's role changed (cached principals of theirs are stale)."""

Forget = Callable[[str], None]
"""The calling process's principal cache (``PrincipalCache.forget``)."""


def _revocation(kind: str, *names: object) -> str:
    return " ".join((kind, *(str(n) for n in names)))


def revocation_names(principal: Principal, *, role: bool = False) -> list[str]:
    """The revocation names a principal answers to: what closes its connections
    (``realtime.revocation``) and, with ``role``, also what drops its cached entry
    (``storage.process.principal_cache``: a role change ends no connection)."""
    if principal.api_key_id is not None:
        return [f"{API_KEY_REVOKED} {principal.api_key_id}"]
    names = []
    if principal.session_hash is not None:
        names.append(f"{SESSION_REVOKED} {principal.session_hash}")
    if principal.user_id is not None:
        names.append(f"{USER_REVOKED} {principal.church_id} {principal.user_id}")
        if role:
            names.append(f"{ROLE_CHANGED} {principal.church_id} {principal.user_id}")
    return names


def parse_revocation(data: bytes | str) -> tuple[str, list[str]]:
    """(kind, names) of a revocation message; kind ``""`` when it is not one."""
    words = (data.decode("ascii", "replace") if isinstance(data, bytes) else data).split()
    if len(words) < 2 or words[0] not in (
        SESSION_REVOKED,
        USER_REVOKED,
        API_KEY_REVOKED,
        ROLE_CHANGED,
    ):
        return "", []
    return words[0], words[1:]


def revoked_names(data: bytes | str) -> tuple[str, list[str]]:
    """(kind, the names of ``revocation_names`` it matches) of one message on the
    revocation channel; kind ``""`` when it is not one."""
    kind, words = parse_revocation(data)
    if kind in (USER_REVOKED, ROLE_CHANGED):
        return kind, [f"{kind} {' '.join(words)}"]
    return kind, [f"{kind} {word}" for word in words]


def parse_api_key(raw: str) -> tuple[str, str] | None:
    parts = raw.split("_")
    if len(parts) != 3 or parts[0] != "kn" or not parts[1] or not parts[2]:
        return None
    return parts[1], raw


async def create_api_key(
    conn: Conn,
    church_id: uuid.UUID,
    *,
    name: str,
    scopes: list[str],
    created_by: uuid.UUID | None,
    rate_limit_per_min: int | None = None,
) -> tuple[ApiKey, str]:
    """Create a key; returns the row and the full secret, which is never stored."""
    prefix, secret = _new_secret()
    key_id, limit = uuid7(), rate_limit_per_min
    async with conn.transaction():
        cur = await conn.execute(
            "INSERT INTO api_key (church_id, id, name, prefix, secret_hash, scopes, created_by, "
            "rate_limit_per_min) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
            f"RETURNING {_KEY_COLUMNS}",
            (church_id, key_id, name, prefix, _sha256(secret), scopes, created_by, limit),
        )
        row = await cur.fetchone()
        assert row is not None
        # The lookup's primary key is what keeps prefixes unique across churches.
        await conn.execute(
            "INSERT INTO api_key_lookup (prefix, church_id, api_key_id) VALUES (%s, %s, %s)",
            (prefix, church_id, key_id),
        )
    return ApiKey(*row), secret


def _new_secret() -> tuple[str, str]:
    prefix = secrets.token_hex(6)
    return prefix, f"kn_{prefix}_{secrets.token_urlsafe(32).replace('_', '-')}"


async def rotate_api_key(
    redis: Redis,
    conn: Conn,
    church_id: uuid.UUID,
    key_id: uuid.UUID,
    *,
    local: Forget | None = None,
) -> tuple[ApiKey, str]:
    """A new secret (and prefix) for a live key; the old secret stops working at once."""
    prefix, secret = _new_secret()
    async with conn.transaction():
        cur = await conn.execute(
            "UPDATE api_key SET prefix = %s, secret_hash = %s FROM "
            "(SELECT secret_hash AS old_hash FROM api_key WHERE church_id = %s AND id = %s "
            "AND revoked_at IS NULL FOR UPDATE) old "
            "WHERE church_id = %s AND id = %s AND revoked_at IS NULL "
            f"RETURNING old.old_hash, "
            f"{', '.join('api_key.' + c for c in _KEY_COLUMNS.split(', '))}",
            (prefix, _sha256(secret), church_id, key_id, church_id, key_id),
        )
        row = await cur.fetchone()
        if row is None:
            raise NotFound("api key")
        await conn.execute(
            "UPDATE api_key_lookup SET prefix = %s WHERE church_id = %s AND api_key_id = %s",
            (prefix, church_id, key_id),
        )
    await _forget_api_key(redis, bytes(row[0]).hex(), key_id, local)
    return ApiKey(*row[1:]), secret


async def _forget_api_key(
    redis: Redis, secret_hash: str, key_id: uuid.UUID, local: Forget | None
) -> None:
    """Drop a key's cached principal and tell every node to close its connections."""
    # Delete, then publish: separate calls (redis-py's cluster pipeline refuses
    # PUBLISH), in the order the pipeline had, and rare (a person's action).
    await redis.delete(key_names.api_key_auth(secret_hash))
    await _announce(redis, _revocation(API_KEY_REVOKED, key_id), local)


async def _announce(redis: Redis, message: str, local: Forget | None) -> None:
    """Tell this process's cache at once, then every node (this one again: harmless)."""
    if local is not None:
        local(message)
    await redis.publish(key_names.CREDENTIAL_REVOCATIONS, message)


async def list_api_keys(
    conn: Conn, church_id: uuid.UUID, *, limit: int, cursor: str | None
) -> Page[ApiKey]:
    after = decode_cursor(cursor).id if cursor else None
    cur = await conn.execute(
        f"SELECT {_KEY_COLUMNS} FROM api_key "
        "WHERE church_id = %s AND (%s::uuid IS NULL OR id > %s) ORDER BY id LIMIT %s",
        (church_id, after, after, limit + 1),
    )
    rows = [ApiKey(*r) for r in await cur.fetchall()]
    return page_of(rows, limit, lambda k: (None, k.id))


async def revoke_api_key(
    redis: Redis,
    conn: Conn,
    church_id: uuid.UUID,
    key_id: uuid.UUID,
    *,
    local: Forget | None = None,
) -> ApiKey:
    """Revoke a key of this church (idempotent: a revoked key stays revoked); it stops
    working on every node at once, its cached principal going with it."""
    async with conn.transaction():
        cur = await conn.execute(
            "UPDATE api_key SET revoked_at = coalesce(revoked_at, now()) "
            f"WHERE church_id = %s AND id = %s RETURNING secret_hash, {_KEY_COLUMNS}",
            (church_id, key_id),
        )
        row = await cur.fetchone()
        if row is None:
            raise NotFound("api key")
        # Only live keys are in the lookup: a revoked key is not found at all.
        await conn.execute(
            "DELETE FROM api_key_lookup WHERE church_id = %s AND api_key_id = %s",
            (church_id, key_id),
        )
    await _forget_api_key(redis, bytes(row[0]).hex(), key_id, local)
    return ApiKey(*row[1:])


async def unrevoked_api_key_ids(conn: Conn, key_ids: list[str]) -> set[str]:
    """Those of these key ids (text) whose key is not revoked: realtime's recheck after
    its pub/sub connection was lost (a rotated key keeps its id, so it is among them)."""
    cur = await conn.execute(
        "SELECT id::text FROM api_key WHERE id = ANY(%s::uuid[]) AND revoked_at IS NULL",
        (key_ids,),
    )
    return {row[0] for row in await cur.fetchall()}


API_KEY_CACHE_S = 60
_principal_encoder = msgspec.msgpack.Encoder()
_principal_decoder = msgspec.msgpack.Decoder(Principal)


def api_key_digest(raw: str) -> bytes | None:
    """The SHA-256 of a well-formed API key's secret (what it is cached under)."""
    parsed = parse_api_key(raw)
    return None if parsed is None else _sha256(parsed[1])


async def principal_for_api_key(redis: Redis, pool: Pool, raw: str) -> Principal | None:
    """The key's principal, from Redis when cached (a minute at most; revocation and
    rotation delete the entry), else from Postgres.

    ``last_used_at`` has minute resolution: it is written when the cache is filled,
    and the cache lives a minute, so a busy key writes once a minute, not per request.
    """
    parsed = parse_api_key(raw)
    if parsed is None:
        return None
    prefix, secret = parsed
    digest = _sha256(secret)
    cache_key = key_names.api_key_auth(digest.hex())
    cached = await redis.get(cache_key)
    if cached is not None:
        return _principal_decoder.decode(cached if isinstance(cached, bytes) else cached.encode())
    async with pool.connection() as conn:
        # The lookup (a reference table under Citus) names the key's church, so the
        # key's row is then read on its one shard.
        cur = await conn.execute(
            "SELECT church_id, api_key_id FROM api_key_lookup WHERE prefix = %s", (prefix,)
        )
        found = await cur.fetchone()
        if found is None:
            return None
        cur = await conn.execute(
            "SELECT church_id, id, secret_hash, scopes, revoked_at, rate_limit_per_min, "
            "last_used_at IS NULL OR last_used_at < now() - interval '1 minute' "
            "FROM api_key WHERE church_id = %s AND id = %s AND prefix = %s",
            (found[0], found[1], prefix),
        )
        row = await cur.fetchone()
        if row is None or row[4] is not None:
            return None
        if not hmac.compare_digest(bytes(row[2]), digest):
            return None
        if row[6]:
            await conn.execute(
                "UPDATE api_key SET last_used_at = now() WHERE church_id = %s AND id = %s",
                (row[0], row[1]),
            )
    principal = Principal(
        church_id=row[0],
        kind="api_key",
        scopes=frozenset(row[3]),
        api_key_id=row[1],
        rate_limit_per_min=row[5],
    )
    await redis.set(cache_key, _principal_encoder.encode(principal), ex=API_KEY_CACHE_S)
    return principal


async def create_session(
    redis: Redis, *, church_id: uuid.UUID, user_id: uuid.UUID, role: str, ttl_s: int
) -> tuple[str, str]:
    """Store a new session; returns (session token, CSRF token).

    The session's hash also joins its user's index (``keys.user_sessions``), so a
    role change reaches every live session of that user and a removal or password
    reset ends them all. The index lives as long as the user's newest session.
    """
    token = secrets.token_urlsafe(32)
    csrf = secrets.token_urlsafe(24)
    token_hash = _sha256(token).hex()
    record = SessionRecord(
        church_id=church_id, user_id=user_id, role=role, csrf=csrf, expires_at=time.time() + ttl_s
    )
    index = key_names.user_sessions(church_id, user_id)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.set(key_names.session(token_hash), _session_encoder.encode(record), ex=ttl_s)
        pipe.sadd(index, token_hash)
        pipe.expire(index, ttl_s)
        await pipe.execute()
    return token, csrf


def _decode_session(raw: bytes | str) -> SessionRecord:
    return _session_decoder.decode(raw if isinstance(raw, bytes) else raw.encode())


async def principal_for_session(redis: Redis, token: str) -> Principal | None:
    found = await session_principal(redis, session_hash(token))
    return None if found is None else found[0]


async def session_principal(redis: Redis, token_hash: str) -> tuple[Principal, float | None] | None:
    """The principal of the session stored under ``token_hash`` and the Unix time the
    session ends (None when its record predates keeping it)."""
    raw = await redis.get(key_names.session(token_hash))
    if raw is None:
        return None
    record = _decode_session(raw)
    principal = Principal(
        church_id=record.church_id,
        kind="session",
        scopes=frozenset(ALL_SCOPES),
        user_id=record.user_id,
        role=record.role,
        csrf_token=record.csrf,
        session_hash=token_hash,
    )
    return principal, record.expires_at


def session_hash(token: str) -> str:
    """The hash a session is stored and revoked under."""
    return _sha256(token).hex()


async def delete_session(redis: Redis, token: str, *, local: Forget | None = None) -> None:
    token_hash = _sha256(token).hex()
    raw = await redis.getdel(key_names.session(token_hash))
    if raw is not None:
        record = _decode_session(raw)
        await redis.srem(key_names.user_sessions(record.church_id, record.user_id), token_hash)
        # Not in a pipeline: redis-py's cluster pipeline refuses PUBLISH.
        await _announce(redis, _revocation(SESSION_REVOKED, token_hash), local)


async def _user_session_hashes(redis: Redis, church_id: uuid.UUID, user_id: uuid.UUID) -> list[str]:
    members = await redis.smembers(key_names.user_sessions(church_id, user_id))
    return sorted(m.decode() if isinstance(m, bytes) else str(m) for m in members)


async def delete_user_sessions(
    redis: Redis,
    church_id: uuid.UUID,
    user_id: uuid.UUID,
    *,
    keep: str | None = None,
    local: Forget | None = None,
) -> int:
    """End every session of a user (removal, password reset), or every one but the
    session whose token is ``keep`` (a password change keeps its own session).
    Returns how many sessions were ended."""
    index = key_names.user_sessions(church_id, user_id)
    kept = _sha256(keep).hex() if keep else None
    doomed = [h for h in await _user_session_hashes(redis, church_id, user_id) if h != kept]
    # Without a session to keep, every connection of the user ends, whatever
    # session it came from; with one, only the sessions deleted here.
    if kept is None:
        revocation = _revocation(USER_REVOKED, church_id, user_id)
    elif doomed:
        revocation = _revocation(SESSION_REVOKED, *doomed)
    else:
        return 0
    async with redis.pipeline(transaction=False) as pipe:
        for token_hash in doomed:
            pipe.delete(key_names.session(token_hash))
        if doomed:
            pipe.srem(index, *doomed)
        # The session keys (no tag) span slots: a plain pipeline, split per node
        # on a cluster; the publish after it, since that pipeline refuses PUBLISH.
        results = await pipe.execute()
    await _announce(redis, revocation, local)
    return sum(int(n) for n in results[: len(doomed)])


async def set_user_sessions_role(
    redis: Redis,
    church_id: uuid.UUID,
    user_id: uuid.UUID,
    role: str,
    *,
    local: Forget | None = None,
) -> int:
    """Rewrite the role in every live session of a user, keeping each one's expiry,
    so a role change applies to the very next request. Returns how many changed."""
    index = key_names.user_sessions(church_id, user_id)
    hashes = await _user_session_hashes(redis, church_id, user_id)
    if not hashes:
        return 0
    async with redis.pipeline(transaction=False) as pipe:
        for token_hash in hashes:
            pipe.get(key_names.session(token_hash))
        found = await pipe.execute()
    gone = [h for h, raw in zip(hashes, found, strict=True) if raw is None]
    changed = 0
    async with redis.pipeline(transaction=False) as pipe:
        for token_hash, raw in zip(hashes, found, strict=True):
            if raw is None:
                continue
            record = msgspec.structs.replace(_decode_session(raw), role=role)
            # XX: a session that ended meanwhile (logout) is not brought back.
            pipe.set(
                key_names.session(token_hash),
                _session_encoder.encode(record),
                keepttl=True,
                xx=True,
            )
            changed += 1
        if gone:
            pipe.srem(index, *gone)
        await pipe.execute()
    # After the rewrite: a process that caches principals reads the new role next.
    await _announce(redis, _revocation(ROLE_CHANGED, church_id, user_id), local)
    return changed


TICKET_TTL_S = 30


class _Ticket(msgspec.Struct, frozen=True, array_like=True):
    church_id: uuid.UUID
    kind: str
    scopes: list[str]
    user_id: uuid.UUID | None
    api_key_id: uuid.UUID | None
    role: str | None
    session_hash: str | None = None


_ticket_encoder = msgspec.msgpack.Encoder()
_ticket_decoder = msgspec.msgpack.Decoder(_Ticket)


async def create_ticket(redis: Redis, principal: Principal) -> str:
    """A one-time ticket standing for ``principal`` at one realtime handshake, for
    browsers on another origin (no cookie there, no header in a WebSocket API)."""
    ticket = secrets.token_urlsafe(32)
    record = _Ticket(
        church_id=principal.church_id,
        kind=principal.kind,
        scopes=sorted(principal.scopes),
        user_id=principal.user_id,
        api_key_id=principal.api_key_id,
        role=principal.role,
        session_hash=principal.session_hash,
    )
    await redis.set(
        key_names.realtime_ticket(_sha256(ticket).hex()),
        _ticket_encoder.encode(record),
        ex=TICKET_TTL_S,
    )
    return ticket


async def principal_for_ticket(redis: Redis, ticket: str) -> Principal | None:
    """The ticket's principal, consuming it (GETDEL: a second use finds nothing)."""
    raw = await redis.getdel(key_names.realtime_ticket(_sha256(ticket).hex()))
    if raw is None:
        return None
    record = _ticket_decoder.decode(raw if isinstance(raw, bytes) else raw.encode())
    return Principal(
        church_id=record.church_id,
        kind=record.kind,
        scopes=frozenset(record.scopes),
        user_id=record.user_id,
        api_key_id=record.api_key_id,
        role=record.role,
        session_hash=record.session_hash,
    )
