"""Health: liveness, readiness (Postgres and Redis answer), and a detailed view."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from api.operation import Handler, Operation
from storage.pg.database import ping
from storage.process.services import Services
from storage.redis import key_names
from storage.redis.queue import queue_depths
from storage.redis.send_limits import account_id, circuit_snapshot
from storage.responses import fail, ok

CHECK_TIMEOUT_S = 2.0


async def _database(services: Services) -> dict[str, Any]:
    started = time.perf_counter()
    async with services.pool.connection(timeout=CHECK_TIMEOUT_S) as conn:
        await ping(conn)
    stats = services.pool.get_stats()
    return {
        "ok": True,
        "latency_ms": round((time.perf_counter() - started) * 1000, 2),
        "pool_size": stats.get("pool_size"),
        "pool_available": stats.get("pool_available"),
    }


async def _redis(services: Services) -> dict[str, Any]:
    started = time.perf_counter()
    await services.redis.ping()
    return {"ok": True, "latency_ms": round((time.perf_counter() - started) * 1000, 2)}


async def _queue(services: Services) -> dict[str, Any]:
    redis = services.redis
    pipe = redis.pipeline(transaction=False)
    pipe.xlen(key_names.MATERIALIZE_STREAM)
    pipe.xlen(key_names.DEAD_LETTER_STREAM)
    materialize_backlog, dead_letter = [int(v) for v in await pipe.execute()]
    depths = await queue_depths(redis, services.settings.delivery.shards)
    try:
        info = await redis.xpending(key_names.MATERIALIZE_STREAM, key_names.SEND_GROUP)
        depths["pending"] += int(info["pending"])
    except Exception:
        pass
    return {
        "ok": True,
        "materialize_backlog": materialize_backlog,
        **depths,
        "dead_letter": dead_letter,
        "provider_circuit": await circuit_snapshot(redis, account_id(services.settings.provider)),
    }


async def _check(name: str, probe: Any) -> tuple[str, dict[str, Any]]:
    try:
        return name, await asyncio.wait_for(probe, CHECK_TIMEOUT_S)
    except Exception as exc:
        return name, {"ok": False, "error": type(exc).__name__}


class Health(msgspec.Struct, frozen=True):
    status: str
    """``ok``; an unhealthy answer is the ``unavailable`` error with the checks as details."""
    checks: dict[str, dict[str, Any]] = {}


def _answer(checks: dict[str, dict[str, Any]]) -> Response:
    if all(c.get("ok") for c in checks.values()):
        return ok(Health(status="ok", checks=checks))
    return fail("unavailable", "a dependency is not answering", checks)


async def health(request: Request) -> Response:
    return await ready(request)


async def live(request: Request) -> Response:
    return ok(Health(status="ok"))


async def ready(request: Request) -> Response:
    services: Services = request.app.state.services
    checks = dict(
        await asyncio.gather(
            _check("database", _database(services)), _check("redis", _redis(services))
        )
    )
    return _answer(checks)


async def detailed(request: Request) -> Response:
    services: Services = request.app.state.services
    checks = dict(
        await asyncio.gather(
            _check("database", _database(services)),
            _check("redis", _redis(services)),
            _check("queue", _queue(services)),
        )
    )
    checks["cache"] = {"ok": True, **services.cache.stats.snapshot()}
    return _answer(checks)


def health_operations() -> list[Operation]:
    def op(path: str, handler: Handler, name: str, summary: str) -> Operation:
        return Operation(
            "GET",
            path,
            handler,
            name,
            summary,
            "health",
            scope=None,
            response=Health,
            errors=("unavailable",),
        )

    # Queue figures, the circuit and cache counters are for operators: owners and
    # admins (API keys act as admins), or the monitoring system's token.
    detailed_op = Operation(
        "GET",
        "/health/detailed",
        detailed,
        "health.detailed",
        "Postgres, Redis, queue depths and this process's cache hits and misses",
        "health",
        scope="read",
        role="admin",
        monitoring=True,
        response=Health,
        errors=("unavailable",),
        description="Owners, admins and API keys, or `Authorization: Bearer "
        "$KOINONIA_METRICS_TOKEN` (the monitoring system's token, when set).",
    )

    return [
        op("/health", health, "health.show", "Ready to serve (as /health/ready)"),
        op("/health/live", live, "health.live", "The process answers"),
        op("/health/ready", ready, "health.ready", "Postgres and Redis answer"),
        detailed_op,
    ]
