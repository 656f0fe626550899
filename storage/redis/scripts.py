"""Lua scripts run by SHA in pipelines: several scripts, one round trip.

redis-py's own pipeline script support sends ``SCRIPT EXISTS`` before every
pipeline, a second round trip on the hottest paths (every status webhook).
Here scripts are sent by SHA straight away; when Redis does not know them
(restarted, flushed) only the calls that failed with NOSCRIPT are loaded and
run again, so no call ever runs twice.

Each script is a file of its own, ``storage/redis/lua/<name>.lua``, with its KEYS
and ARGV in a comment at the top; ``lua(name)`` reads it (once) from the package.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import time
from collections.abc import Sequence
from importlib import resources
from typing import Any

from redis.exceptions import NoScriptError

from storage.redis.connection import SLOT_MOVING_WAIT_S, Redis, is_cluster, slot_moving

Call = tuple[str, Sequence[str], Sequence[Any]]
"""(script sha, keys, args)"""


@functools.cache
def lua(name: str) -> str:
    """The source of ``storage/redis/lua/<name>.lua`` (shipped in the wheel with the
    package); a missing name fails at import of the module that asks for it."""
    return resources.files("storage.redis").joinpath("lua", f"{name}.lua").read_text("utf-8")


class ScriptRunner:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._cluster = is_cluster(redis)
        self._sources: dict[str, str] = {}

    def register(self, source: str) -> str:
        sha = hashlib.sha1(source.encode()).hexdigest()
        self._sources[sha] = source
        return sha

    async def run(self, calls: Sequence[Call]) -> list[Any]:
        results = await self._pipeline(calls)
        # Calls refused before running, run again (only those, so none runs twice):
        # NOSCRIPT once the scripts are loaded (at most twice: a node that still lacks
        # them is a failure); and, after a short backoff, those refused because their
        # slot is being migrated (``slot_moving``). A script's KEYS may be split between
        # the two nodes, or one may not exist yet (counted as missing on the importing
        # node: TRYAGAIN), for as long as the migration lasts, far longer than redis-py's
        # own 0.3 s of redirects.
        loads = 0
        deadline = time.monotonic() + SLOT_MOVING_WAIT_S
        delay = 0.02
        while True:
            missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
            moving = [i for i, r in enumerate(results) if slot_moving(r)]
            if missing and loads < 2:
                loads += 1
                for sha in {calls[i][0] for i in missing}:
                    await self._redis.script_load(self._sources[sha])
                again = sorted(missing + moving)
            elif moving and time.monotonic() + delay <= deadline:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.2)
                again = moving
            else:
                break
            for i, value in zip(
                again, await self._pipeline([calls[i] for i in again]), strict=True
            ):
                results[i] = value
        for value in results:
            if isinstance(value, Exception):
                raise value
        return results

    async def run_one(self, sha: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """One call. On a standalone Redis a plain ``EVALSHA``: a pipeline object per
        call was a tenth of the REST limiter's cost, which every request pays; a
        NOSCRIPT (the script did not run) goes the way of ``run``. On a cluster
        ``run``'s own handling of slot migrations applies."""
        if not self._cluster:
            try:
                return await self._redis.execute_command(  # type: ignore[no-untyped-call]
                    "EVALSHA", sha, len(keys), *keys, *args
                )
            except NoScriptError:
                pass
        return (await self.run([(sha, keys, args)]))[0]

    async def _pipeline(self, calls: Sequence[Call]) -> list[Any]:
        pipe = self._redis.pipeline(transaction=False)
        for sha, keys, args in calls:
            # Not ``pipe.evalsha``: redis-py's cluster pipeline refuses that method
            # (for its Script objects' sake), yet routes the raw command by its
            # keys like any other; on a cluster each call's KEYS must share a slot.
            pipe.execute_command("EVALSHA", sha, len(keys), *keys, *args)
        return list(await pipe.execute(raise_on_error=False))
