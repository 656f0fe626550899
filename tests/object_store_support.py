"""Object stores for the tests: a folder, and a real S3 server on loopback.

Registered in tests/conftest.py (``pytest_plugins``). ``moto_s3`` starts moto's
S3 server in its own process once per session, on a free loopback port, the first
time a test asks for it (about a second), and stops it at the end. Every test gets
a bucket of its own (``new_bucket``), so tests never see each other's objects.

``object_store`` is parametrized: each test that takes it runs once on
``file://`` (a folder under tmp_path) and once on ``s3://`` (a fresh bucket with
a prefix). ``object_store_env`` gives the environment variables that point a
process (``koinonia archive`` in a subprocess) at the same store.
"""

from __future__ import annotations

import itertools
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from storage.objects import ObjectStore, open_object_store
from storage.process.settings import Settings

MOTO_START_S = 30.0
_buckets = itertools.count(1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class MotoS3:
    """moto's S3 server, a separate process (its CPU is not the test's)."""

    def __init__(self, process: subprocess.Popen[bytes], endpoint_url: str) -> None:
        self.process = process
        self.endpoint_url = endpoint_url

    def new_bucket(self, prefix: str = "koinonia-test") -> str:
        """A new, empty bucket (moto's server accepts unsigned requests)."""
        bucket = f"{prefix}-{next(_buckets)}"
        response = httpx.put(f"{self.endpoint_url}/{bucket}", timeout=10)
        response.raise_for_status()
        return bucket

    def env(self, url: str) -> dict[str, str]:
        """The variables that point a process at ``url`` on this server."""
        return self.env_for(self.endpoint_url, url)

    @staticmethod
    def env_for(endpoint_url: str, url: str) -> dict[str, str]:
        return {
            "KOINONIA_OBJECT_STORE_URL": url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint_url,
        }


def start_moto(log: Path) -> MotoS3:
    """Start ``python -m moto.server`` on a free loopback port; fails (never skips)
    with what to install when moto is missing."""
    try:
        import moto.server  # noqa: F401
    except ImportError as exc:
        pytest.fail(f"moto[server] is needed for the s3:// tests (uv sync --all-groups): {exc}")
    last_error: Exception | None = None
    for _ in range(3):  # another process may take the port between probe and bind
        port = free_port()
        endpoint = f"http://127.0.0.1:{port}"
        with log.open("ab") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + MOTO_START_S
        while time.monotonic() < deadline and process.poll() is None:
            try:
                httpx.get(f"{endpoint}/moto-api/", timeout=1).raise_for_status()
                return MotoS3(process, endpoint)
            except httpx.HTTPError as exc:
                last_error = exc
                time.sleep(0.1)
        process.kill()
        process.wait()
    pytest.fail(f"moto's S3 server did not start (log: {log}): {last_error}")


def stop_moto(moto: MotoS3) -> None:
    moto.process.terminate()
    try:
        moto.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        moto.process.kill()
        moto.process.wait()


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoS3]:
    moto = start_moto(tmp_path_factory.mktemp("moto") / "moto.log")
    try:
        yield moto
    finally:
        stop_moto(moto)


@pytest.fixture(params=["file", "s3"])
def object_store_env(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    """KOINONIA_OBJECT_STORE_URL (and for s3:// the AWS variables) of a fresh store."""
    if request.param == "file":
        return {"KOINONIA_OBJECT_STORE_URL": (tmp_path / "objects").as_uri()}
    moto: MotoS3 = request.getfixturevalue("moto_s3")
    return moto.env(f"s3://{moto.new_bucket()}/koinonia")


@pytest.fixture
def object_store(object_store_env: dict[str, str]) -> ObjectStore:
    """An empty store: once on file://, once on s3:// (moto)."""
    return open_object_store(Settings.from_env(object_store_env))
