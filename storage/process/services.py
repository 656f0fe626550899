"""The long-lived resources a process opens at start-up and hands down.

Built once in the Starlette lifespan (or a worker's entry point) from the one
``Settings`` object; nothing here is created at import time.
"""

from __future__ import annotations

import time

import msgspec

from storage.archive.reader import ArchiveReader
from storage.domain.media_links import MediaLinks
from storage.domain.phones import PhoneVault
from storage.domain.receipt_refs import ReceiptRefs
from storage.objects import ObjectStore, open_object_store
from storage.pg.churches import plan_loader
from storage.pg.credentials import (
    Principal,
    api_key_digest,
    principal_for_api_key,
    session_hash,
    session_principal,
)
from storage.pg.database import Pool, open_pool
from storage.pg.event_log import EventRelay
from storage.pg.replicas import ReplicaSet
from storage.process.metrics import Metrics, Sampler
from storage.process.principal_cache import PrincipalCache, api_key_entry, session_entry
from storage.process.settings import Settings
from storage.redis.cache import Cache
from storage.redis.connection import Redis, open_redis
from storage.redis.publisher import EventPublisher
from storage.redis.rate_limits import ChurchLimits, RateLimiter
from storage.redis.scripts import ScriptRunner

SESSION_COOKIE = "koinonia_session"
CSRF_COOKIE = "koinonia_csrf"


class Services(msgspec.Struct, kw_only=True):
    settings: Settings
    pool: Pool
    redis: Redis
    publisher: EventPublisher
    vault: PhoneVault
    refs: ReceiptRefs
    media_links: MediaLinks
    scripts: ScriptRunner
    limiter: RateLimiter
    church_limits: ChurchLimits
    cache: Cache
    relay: EventRelay
    """Moves this process's (and any stranded) logged events to Redis and webhooks."""
    replicas: ReplicaSet
    """Where a read runs (a replica or the primary) and what a write must record for
    read-your-writes; inert without DATABASE_REPLICA_URLS."""
    objects: ObjectStore
    """Archive files and (later) media (KOINONIA_OBJECT_STORE_URL)."""
    archive: ArchiveReader
    """Archived months read through the live endpoints, with this process's cache of
    recently read files (KOINONIA_ARCHIVE_CACHE_MB)."""
    principals: PrincipalCache = msgspec.field(default_factory=PrincipalCache)
    """Principals this process resolved lately, dropped by revocations. It keeps
    nothing until a hub's revocation channel feeds it (web processes only)."""
    metrics: Metrics | None = None
    """This process's metrics; None when its metrics port is ``off`` (then nothing is
    measured: every instrumentation site tests for None)."""
    sampler: Sampler | None = None
    """Refreshes the gauges of live state while ``metrics`` exists."""

    @classmethod
    async def open(
        cls, settings: Settings, *, redis_connections: int = 64, metrics: Metrics | None = None
    ) -> Services:
        """``metrics``: the process's own (``Metrics.for_process``), made before its
        ``/metrics`` server; None measures nothing."""
        pool = await open_pool(
            settings.database, on_query=metrics.counted_query() if metrics is not None else None
        )
        redis = open_redis(settings.redis, max_connections=redis_connections)
        scripts = ScriptRunner(redis)
        publisher = EventPublisher(redis)
        relay = EventRelay(pool, publisher)
        relay.start()
        measured = metrics if settings.database.replica_urls else None
        replicas = ReplicaSet(
            pool,
            settings.database,
            publisher.positions,
            on_replica_query=measured.db_queries.labels("replica").inc if measured else None,
            on_lag=(lambda name, s: measured.replica_lag.labels(name).set(s)) if measured else None,
        )
        cache = Cache(redis)
        objects = open_object_store(settings)
        sampler = None
        if metrics is not None:
            sampler = Sampler(metrics, settings, pool, redis, cache)
            sampler.start()
        return cls(
            settings=settings,
            pool=pool,
            redis=redis,
            publisher=publisher,
            vault=PhoneVault(settings.security.phone_key, settings.security.lookup_key),
            refs=ReceiptRefs(settings.security.lookup_key),
            media_links=MediaLinks(settings.security.lookup_key),
            scripts=scripts,
            limiter=RateLimiter(scripts),
            church_limits=ChurchLimits(plan_loader(pool), settings.limits.plans),
            cache=cache,
            relay=relay,
            replicas=replicas,
            objects=objects,
            archive=ArchiveReader(objects, settings.archive.cache_mb * 1024 * 1024),
            principals=PrincipalCache(
                ttl_s=settings.http.principal_cache_s, size=settings.http.principal_cache_size
            ),
            metrics=metrics,
            sampler=sampler,
        )

    async def close(self) -> None:
        if self.sampler is not None:
            await self.sampler.stop()
        await self.relay.stop()
        await self.replicas.stop()
        await self.pool.close()
        await self.redis.aclose()

    async def authenticate(
        self, authorization: str | None, session_token: str | None
    ) -> Principal | None:
        """The principal for a request's credentials: a Bearer API key wins over a
        session cookie. None when neither is present and valid.

        From this process's cache when it has the principal (``principals``), which
        spares the request a Redis round trip; failures are never cached."""
        cache = self.principals
        if authorization:
            scheme, _, value = authorization.partition(" ")
            raw = value.strip()
            if scheme.lower() != "bearer" or not raw:
                return None
            digest = api_key_digest(raw)
            if digest is None:
                return None
            key = api_key_entry(digest)
            found = cache.get(key)
            if found is not None:
                return found
            generation = cache.generation
            principal = await principal_for_api_key(self.redis, self.pool, raw)
            if principal is not None:
                cache.put(key, principal, generation)
            return principal
        if session_token:
            token_hash = session_hash(session_token)
            key = session_entry(token_hash)
            found = cache.get(key)
            if found is not None:
                return found
            generation = cache.generation
            stored = await session_principal(self.redis, token_hash)
            if stored is None:
                return None
            principal, expires_at = stored
            if expires_at is not None:
                # Never past the session's own end (its key expires in Redis then).
                cache.put(key, principal, generation, at_most_s=expires_at - time.time())
            return principal
        return None
