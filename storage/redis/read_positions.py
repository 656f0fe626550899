"""Each church's read position in Redis: read-your-writes across web nodes.

The position (storage/pg/freshness.py) is where the primary's WAL stood right after
the church's last answered write, or after the commits of its last relayed events.
Every web node reads it in the rate limiter's script, the Redis call a request
makes anyway (storage/redis/rate_limits.py), and serves the church's stale-tolerant
reads from a replica only if the replica has replayed that far.

A position only moves forward. It lives an hour past the church's last write: long
after any replica it could matter for is caught up or skipped for lagging.
"""

from __future__ import annotations

import uuid

from storage.redis import key_names
from storage.redis.scripts import Call, ScriptRunner, lua

_RECORD = lua("read_position")

TTL_MS = 3_600_000


class ReadPositions:
    def __init__(self, runner: ScriptRunner) -> None:
        self._runner = runner
        self._sha = runner.register(_RECORD)

    def record_call(self, church_id: uuid.UUID, position: int) -> Call:
        """The script call that records ``position`` for the church, to send in a
        pipeline with other calls (the relay's publish)."""
        return (self._sha, [key_names.read_position(church_id)], [position, TTL_MS])

    async def record(self, church_id: uuid.UUID, position: int) -> None:
        await self._runner.run([self.record_call(church_id, position)])
