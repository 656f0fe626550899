"""Health: liveness, readiness (Postgres and Redis answer), and a detailed view."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from storage import keys
from storage.envelope import JSONResponse, success_bytes
from storage.services import Services

CHECK_TIMEOUT_S = 2.0


async def _database(services: Services) -> dict[str, Any]:
    started = time.perf_counter()
    async with services.pool.connection(timeout=CHECK_TIMEOUT_S) as conn:
        await conn.execute("SELECT 1")
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
    shards = services.settings.delivery.shards
    pipe = services.redis.pipeline(transaction=False)
    streams = [keys.MATERIALIZE_STREAM] + [keys.send_stream(s) for s in range(shards)]
    for stream in streams:
        pipe.xlen(stream)
    pipe.xlen(keys.DEAD_LETTER_STREAM)
    for shard in range(shards):
        pipe.zcard(keys.delayed_set(shard))
    values = [int(v) for v in await pipe.execute()]
    pending = 0
    for stream in streams:
        try:
            info = await services.redis.xpending(stream, keys.SEND_GROUP)
            pending += int(info["pending"])
        except Exception:
            continue
    return {
        "ok": True,
        "materialize_backlog": values[0],
        "send_stream_length": sum(values[1 : 1 + shards]),
        "pending": pending,
        "dead_letter": values[1 + shards],
        "delayed_retries": sum(values[2 + shards :]),
    }


async def _check(name: str, probe: Any) -> tuple[str, dict[str, Any]]:
    try:
        return name, await asyncio.wait_for(probe, CHECK_TIMEOUT_S)
    except Exception as exc:
        return name, {"ok": False, "error": type(exc).__name__}


def _answer(checks: dict[str, dict[str, Any]]) -> Response:
    healthy = all(c.get("ok") for c in checks.values())
    body = {"status": "ok" if healthy else "unavailable", "checks": checks}
    return JSONResponse(success_bytes(body), status_code=200 if healthy else 503)


async def health(request: Request) -> Response:
    return await ready(request)


async def live(request: Request) -> Response:
    return JSONResponse(success_bytes({"status": "ok"}))


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
    return _answer(checks)


def health_routes() -> list[BaseRoute]:
    return [
        Route("/health", health, methods=["GET"]),
        Route("/health/live", live, methods=["GET"]),
        Route("/health/ready", ready, methods=["GET"]),
        Route("/health/detailed", detailed, methods=["GET"]),
    ]
