"""Object store candidates: put/get latency and CPU per operation, 1 MB and 20 MB.

Candidates, each driven through the same async calls:

    file   obstore       storage/objects/files.py: puts through LocalStore (staging
                         file + rename, then fsync of the file and its folders),
                         gets read the file in asyncio.to_thread
    file   obstore, its get   the same puts; gets through obstore.get_async (what
                         the adapter did before this bench)
    file   to_thread     plain file I/O in asyncio.to_thread: temp file, fsync,
                         os.replace, fsync of the folder (the same durability)
    s3     obstore       storage/objects/s3.py (S3Store), one PUT per object
    s3     aiobotocore   put_object / get_object + read() on one client

s3:// runs against moto's S3 server in its own process on loopback, so its CPU is
not counted; "CPU" is this process's CPU time (every thread: obstore's Tokio
runtime, asyncio's worker threads) per operation, averaged. Rounds interleave the
candidates (round r runs each once) so a noisy neighbour hits them alike. With N
repetitions p99 is the worst but one or so; read it as a tail, not a percentile.

    uv run --group bench python bench/object_store.py
    uv run --group bench python bench/object_store.py --reps 50 --sizes 1,20,100

aiobotocore is in the bench dependency group only (it lost; see bench/README.md
"Object store"). Numbers only; it asserts that every get returned what was put.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import obstore  # noqa: E402
from obstore.store import LocalStore  # noqa: E402

from storage.objects import ObjectStore, open_object_store  # noqa: E402
from storage.process.settings import Settings  # noqa: E402

MB = 1024 * 1024


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class ThreadedFiles:
    """The other file:// candidate: the standard library in worker threads."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".put-")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temp, path)
        except BaseException:
            os.unlink(temp)
            raise
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)

    async def put(self, key: str, data: bytes) -> None:
        await asyncio.to_thread(self._write, self.root / key, data)

    async def get(self, key: str) -> bytes:
        return await asyncio.to_thread((self.root / key).read_bytes)


class Botocore:
    """The other s3:// candidate: aiobotocore, one client for the whole run."""

    def __init__(self, client: Any, bucket: str) -> None:
        self.client = client
        self.bucket = bucket

    async def put(self, key: str, data: bytes) -> None:
        await self.client.put_object(Bucket=self.bucket, Key=key, Body=data)

    async def get(self, key: str) -> bytes:
        response = await self.client.get_object(Bucket=self.bucket, Key=key)
        async with response["Body"] as body:
            data: bytes = await body.read()
            return data


class Port:
    """The chosen adapters, through the port."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    async def put(self, key: str, data: bytes) -> None:
        await self.store.put(key, data)

    async def get(self, key: str) -> bytes:
        return await self.store.get(key)


@dataclass
class Candidate:
    backend: str
    library: str
    put: Callable[[str, bytes], Awaitable[None]]
    get: Callable[[str], Awaitable[bytes]]
    samples: dict[tuple[int, str], list[tuple[float, float]]] = field(default_factory=dict)
    """(size, "put"/"get") -> [(wall seconds, CPU seconds)]"""


def start_moto(log: Path) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"moto's server exited; see {log}")
        try:
            httpx.get(f"{endpoint}/moto-api/", timeout=1).raise_for_status()
            for bucket in ("bench-obstore", "bench-botocore"):
                httpx.put(f"{endpoint}/{bucket}", timeout=10).raise_for_status()
            return process, endpoint
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit(f"moto's server did not answer in 60 s; see {log}")


async def timed(call: Awaitable[Any]) -> tuple[Any, float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    result = await call
    return result, time.perf_counter() - wall, time.process_time() - cpu


def payload(size: int, seed: int) -> bytes:
    return (seed.to_bytes(4, "big", signed=True) + os.urandom(4092)) * (size // 4096)


async def run(args: argparse.Namespace) -> list[Candidate]:
    work = Path(tempfile.mkdtemp(prefix="koinonia-bench-objects-"))
    moto, endpoint = start_moto(work / "moto.log")
    say(f"moto's S3 server on {endpoint}; files under {work}")
    try:
        async with AsyncExitStack() as stack:
            aws = {
                "AWS_ACCESS_KEY_ID": "bench",
                "AWS_SECRET_ACCESS_KEY": "bench",
                "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_ENDPOINT_URL": endpoint,
            }
            file_port = Port(
                open_object_store(
                    Settings.from_env({"KOINONIA_OBJECT_STORE_URL": (work / "obstore").as_uri()})
                )
            )
            s3_port = Port(
                open_object_store(
                    Settings.from_env(aws | {"KOINONIA_OBJECT_STORE_URL": "s3://bench-obstore"})
                )
            )
            threaded = ThreadedFiles(work / "threaded")
            native = LocalStore(work / "obstore")

            async def native_get(key: str) -> bytes:
                result = await obstore.get_async(native, key)
                return bytes(await result.bytes_async())

            candidates = [
                Candidate("file", "obstore", file_port.put, file_port.get),
                Candidate("file", "obstore, its get", file_port.put, native_get),
                Candidate("file", "to_thread", threaded.put, threaded.get),
                Candidate("s3", "obstore", s3_port.put, s3_port.get),
            ]
            if "aiobotocore" not in args.skip:
                from aiobotocore.session import get_session  # type: ignore[import-untyped]

                client = await stack.enter_async_context(
                    get_session().create_client(
                        "s3",
                        endpoint_url=endpoint,
                        aws_access_key_id="bench",
                        aws_secret_access_key="bench",
                        region_name="us-east-1",
                    )
                )
                botocore = Botocore(client, "bench-botocore")
                candidates.append(Candidate("s3", "aiobotocore", botocore.put, botocore.get))
            for size_mb in args.sizes:
                size = size_mb * MB
                reps = args.reps if size_mb < 10 else max(3, args.reps // 2)
                say(f"{size_mb} MB: {args.warmup} warm-up + {reps} rounds of put+get each")
                for r in range(-args.warmup, reps):
                    for c in candidates:
                        data = payload(size, r)
                        key = f"bench/{size_mb}mb/{r % 4}.bin"
                        _, put_s, put_cpu = await timed(c.put(key, data))
                        got, get_s, get_cpu = await timed(c.get(key))
                        if got != data:
                            raise SystemExit(f"{c.backend} {c.library}: get returned other bytes")
                        if r >= 0:
                            c.samples.setdefault((size_mb, "put"), []).append((put_s, put_cpu))
                            c.samples.setdefault((size_mb, "get"), []).append((get_s, get_cpu))
                    if r >= 0 and (r + 1) % 10 == 0:
                        say(f"  {r + 1}/{reps}")
            return candidates
    finally:
        moto.terminate()
        moto.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def table(candidates: list[Candidate], sizes: list[int]) -> str:
    header = (
        "| backend | library | size | put p50 ms | put p99 ms | put CPU ms | "
        "get p50 ms | get p99 ms | get CPU ms | n |"
    )
    lines = [header, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for size_mb in sizes:
        for c in candidates:
            cells = []
            for op in ("put", "get"):
                samples = c.samples[(size_mb, op)]
                walls = [w * 1000 for w, _ in samples]
                cpu = statistics.fmean(cpu * 1000 for _, cpu in samples)
                cells += [
                    f"{quantile(walls, 0.5):.1f}",
                    f"{quantile(walls, 0.99):.1f}",
                    f"{cpu:.1f}",
                ]
            n = len(c.samples[(size_mb, "put")])
            lines.append(
                f"| {c.backend} | {c.library} | {size_mb} MB | " + " | ".join(cells) + f" | {n} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=30, help="rounds per size (20 MB+: half)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--sizes", default="1,20", help="object sizes in MB, comma-separated")
    parser.add_argument("--skip", default="", help="aiobotocore: leave it out")
    args = parser.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    candidates = asyncio.run(run(args))
    print(table(candidates, args.sizes))


if __name__ == "__main__":
    main()
