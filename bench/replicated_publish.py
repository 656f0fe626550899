"""What confirming publishes on a replica costs the event relay on a Redis Cluster.

The relay publishes each drain step in one pipeline. On a cluster it ends that
pipeline with ``WAIT 1`` on every master written (storage/redis/publisher.py
``run_replicated``) so a failover cannot drop events from history. This bench runs
the same publish calls both ways on an embedded 3+3 cluster, alternating, and
prints events/s and milliseconds per round trip for three shapes: one event of one
church, 20 events of one church, and 200 events over 30 churches (three masters).

    uv run python bench/replicated_publish.py [--reps 3] [--scale 1.0]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec

from deploy.embedded_redis_cluster import EmbeddedRedisCluster
from storage.process.settings import RedisSettings
from storage.redis.connection import open_redis
from storage.redis.publisher import EventPublisher
from storage.redis.scripts import Call

EVENT = msgspec.json.encode(
    {
        "type": "message.recipient.status",
        "id": "x" * 32,
        "occurred_at": "2026-12-03T00:00:00Z",
        "data": {"message_id": "m" * 36, "recipient_id": "r" * 36, "status": "delivered"},
    }
)
SHAPES = ((1, 1, 2000), (1, 20, 500), (30, 200, 60))
"""(churches, events per round trip, round trips) of each measurement."""

Run = Callable[[Sequence[Call]], Awaitable[list[Any]]]


async def _measure(
    publisher: EventPublisher, run: Run, churches: list[uuid.UUID], per_trip: int, trips: int
) -> tuple[float, float]:
    def calls(i: int) -> list[Call]:
        return [
            publisher.publish_encoded_call(
                churches[(i + k) % len(churches)], "message:bench", "t", EVENT
            )
            for k in range(per_trip)
        ]

    await run(calls(0))  # scripts loaded, connections open
    started = time.perf_counter()
    for i in range(trips):
        await run(calls(i))
    took = time.perf_counter() - started
    return trips * per_trip / took, took / trips * 1000


async def _main(seeds: list[str], reps: int, scale: float) -> None:
    redis = open_redis(RedisSettings(cluster_nodes=tuple(seeds)))
    publisher = EventPublisher(redis)
    modes: dict[str, Run] = {
        "no WAIT": publisher.scripts.run,
        "WAIT 1": publisher.run_replicated,
    }
    try:
        for n_churches, per_trip, trips in SHAPES:
            trips = max(1, int(trips * scale))
            churches = [uuid.uuid4() for _ in range(n_churches)]
            found: dict[str, list[tuple[float, float]]] = {mode: [] for mode in modes}
            for rep in range(reps):
                order = list(modes) if rep % 2 == 0 else list(reversed(modes))
                for mode in order:
                    found[mode].append(
                        await _measure(publisher, modes[mode], churches, per_trip, trips)
                    )
                print(
                    f"  {n_churches} churches x {per_trip}: rep {rep + 1}/{reps}", file=sys.stderr
                )
            for mode, results in found.items():
                rate = statistics.median(r[0] for r in results)
                ms = statistics.median(r[1] for r in results)
                print(
                    f"churches={n_churches:3d} events/trip={per_trip:4d} {mode:8s}: "
                    f"{rate:9.0f} events/s, {ms:7.3f} ms per round trip "
                    f"(median of {reps}; all {[round(r[0]) for r in results]})"
                )
    finally:
        await redis.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply round trips")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="koinonia-replicated-publish-") as folder:
        cluster = EmbeddedRedisCluster(Path(folder))
        print("starting a 3+3 cluster", file=sys.stderr)
        cluster.start()
        try:
            asyncio.run(_main(cluster.seeds, args.reps, args.scale))
        finally:
            cluster.stop()


if __name__ == "__main__":
    main()
