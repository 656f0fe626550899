"""Lua scripts run by SHA in pipelines: several scripts, one round trip.

redis-py's own pipeline script support sends ``SCRIPT EXISTS`` before every
pipeline, a second round trip on the hottest paths (every status webhook).
Here scripts are sent by SHA straight away; when Redis does not know them
(restarted, flushed) only the calls that failed with NOSCRIPT are loaded and
run again, so no call refused by Redis runs twice. (A reply lost on the wire is
another matter: redis-py's retry on a connection error or timeout sends the
command again, and it may have run: as for every command, not only scripts.)

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
        self.cluster = is_cluster(redis)
        self._sources: dict[str, str] = {}

    def register(self, source: str) -> str:
        sha = hashlib.sha1(source.encode()).hexdigest()
        self._sources[sha] = source
        return sha

    async def run(self, calls: Sequence[Call], *, each: bool = False) -> list[Any]:
        """The calls' results, in order, in one round trip (more only for calls that
        met NOSCRIPT or a slot migration). A call that failed raises its error, or with
        ``each`` takes its place among the results, the others' results kept."""
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
        if not each:
            for value in results:
                if isinstance(value, Exception):
                    raise value
        return results

    async def run_one(self, sha: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """One call. On a standalone Redis a plain ``EVALSHA``: a pipeline object per
        call was a tenth of the REST limiter's cost, which every request pays; a
        NOSCRIPT (the script did not run) goes the way of ``run``. On a cluster
        ``run``'s own handling of slot migrations applies."""
        if not self.cluster:
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


class TurnBatch:
    """Script calls made during one event-loop turn, sent together in one pipeline.

    Every REST request charges the rate limiter once, and redis-py's machinery around
    a call (pool checkout, a task for the write's timeout, the read's timeout) costs
    far more CPU than the wire (bench/script_call.py: 140-200 µs per call on this
    2-core machine): the calls of requests served in the same turn share one
    pipeline, and that cost. Each caller gets its own result or error.

    Only on a standalone Redis, where every call shares the one server's fate. On a
    cluster a batch would span masters, and one master failing over would fail the
    charges of churches on the others: there each call goes alone (``run_one``).
    """

    def __init__(self, runner: ScriptRunner) -> None:
        self._runner = runner
        self._pending: list[tuple[Call, asyncio.Future[Any]]] = []
        self._sending: set[asyncio.Task[None]] = set()

    async def run_one(self, sha: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        if self._runner.cluster:
            return await self._runner.run_one(sha, keys, args)
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Any] = loop.create_future()
        self._pending.append(((sha, keys, args), done))
        if len(self._pending) == 1:
            loop.call_soon(self._send)
        return await done

    def _send(self) -> None:
        # A caller gone before the batch leaves (its request cancelled) is not sent:
        # its charge would spend the church's budget for nothing.
        pending = [entry for entry in self._pending if not entry[1].done()]
        self._pending = []
        if not pending:
            return
        task = asyncio.get_running_loop().create_task(self._sent(pending))
        self._sending.add(task)  # a reference, or the task may be collected mid-flight
        task.add_done_callback(self._sending.discard)

    async def _sent(self, pending: list[tuple[Call, asyncio.Future[Any]]]) -> None:
        try:
            if len(pending) == 1:
                results = [await self._runner.run_one(*pending[0][0])]
            else:
                results = await self._runner.run([call for call, _ in pending], each=True)
        except Exception as exc:
            for _, done in pending:
                if not done.done():
                    done.set_exception(exc)
            return
        except BaseException:
            for _, done in pending:
                done.cancel()  # the loop is shutting down
            raise
        for (_, done), result in zip(pending, results, strict=True):
            if done.done():
                continue  # its request went away (cancelled)
            if isinstance(result, Exception):
                done.set_exception(result)
            else:
                done.set_result(result)
