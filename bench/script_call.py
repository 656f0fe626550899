"""CPU per single script call: a pipeline of one (``ScriptRunner.run``) against a plain
``EVALSHA`` (``ScriptRunner.run_one`` on a standalone Redis).

Every REST request charges the rate limiter with one script call
(storage/redis/rate_limits.py), so what redis-py spends around one call is paid
per request. This bench runs the limiter's own script (two GCRA keys, as a REST
request charges church and key) on an embedded Valkey, 8 calls in flight as in a
busy web process, both ways alternately, and prints this process's CPU per call
(the client's side: the server's is the same both ways).

    uv run python bench/script_call.py [--calls 20000] [--reps 4]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from deploy.embedded_redis import EmbeddedRedis
from storage.process.settings import RedisSettings
from storage.redis.connection import open_redis
from storage.redis.rate_limits import RateLimiter
from storage.redis.scripts import ScriptRunner

IN_FLIGHT = 8


async def _cpu_per_call(call: Callable[[], Awaitable[Any]], calls: int) -> float:
    async def worker() -> None:
        for _ in range(calls // IN_FLIGHT):
            await call()

    started = time.process_time()
    await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
    return (time.process_time() - started) / calls * 1e6


async def _main(url: str, calls: int, reps: int) -> None:
    redis = open_redis(RedisSettings(url=url))
    runner = ScriptRunner(redis)
    sha = RateLimiter(runner)._sha  # the limiter's script, registered as it does
    keys = ["kn:rl:{c:bench}:church", "kn:rl:{c:bench}:key"]
    args = [60_000, 10**9, 10**9]
    ways: dict[str, Callable[[], Awaitable[Any]]] = {
        "pipeline of one (run)": lambda: runner.run([(sha, keys, args)]),
        "plain EVALSHA (run_one)": lambda: runner.run_one(sha, keys, args),
    }
    found: dict[str, list[float]] = {way: [] for way in ways}
    try:
        for call in ways.values():
            await call()  # script loaded, connections open
        for rep in range(reps):
            order = list(ways) if rep % 2 == 0 else list(reversed(ways))
            for way in order:
                found[way].append(await _cpu_per_call(ways[way], calls))
            print(
                f"[script_call] rep {rep + 1}/{reps}: "
                + ", ".join(f"{way} {found[way][-1]:.1f} µs" for way in ways),
                file=sys.stderr,
            )
    finally:
        await redis.aclose()
    print(f"\nclient CPU per limiter call, {IN_FLIGHT} in flight, median of {reps} runs:")
    for way, values in found.items():
        print(
            f"- {way}: {statistics.median(values):.1f} µs (runs: {', '.join(f'{v:.0f}' for v in values)})"
        )
    base, plain = (statistics.median(v) for v in found.values())
    print(f"- plain / pipeline: {plain / base:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--reps", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="koinonia-script-call-") as tmp:
        server = EmbeddedRedis(Path(tmp), persist=False)
        print("[script_call] starting embedded Redis", file=sys.stderr)
        url = server.start()
        try:
            asyncio.run(_main(url, args.calls, args.reps))
        finally:
            server.stop()


if __name__ == "__main__":
    main()
