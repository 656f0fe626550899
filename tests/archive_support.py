"""The archive's tests: running the operator commands beside a stack, and a stack
whose object store is S3.

Registered in tests/conftest.py (``pytest_plugins``). ``archive_s3_stack`` is a
whole stack of its own (about 10 s, once per session, the first time a test asks
for it) whose processes keep their objects on moto's S3 server
(tests/object_store_support.py): the session stack's store is a folder, and the
archive must read the same through either.

``koinonia archive`` drops whole months for every church of a database: on the
session stack only months no other test writes may be archived (``demo --months
15`` or more, ``--before`` the current month minus 9, ``before_month(9)``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from deploy.stack import Stack
from storage.objects import ObjectStore, open_object_store
from storage.process.settings import Settings
from tests.object_store_support import MotoS3

ROOT = Path(__file__).resolve().parent.parent
STORES = ("DATABASE_URL", "DATABASE_SESSION_URL", "REDIS_URL", "REDIS_CLUSTER_NODES")

SUITE_ENV = {
    # As the session stack has them (tests/conftest.py ``stack``): cheap sign-ups, no
    # rate limits met by accident, fast reconciling.
    "KOINONIA_LOG_LEVEL": "INFO",
    "KOINONIA_RECONCILE_AFTER_S": "5",
    "KOINONIA_SCHEDULER_INTERVAL_S": "1",
    "KOINONIA_PASSWORD_TIME_COST": "1",
    "KOINONIA_PASSWORD_MEMORY_KIB": "8192",
    "KOINONIA_RATE_STARTER": "1000000",
    "KOINONIA_RATE_API_KEY": "1000000",
    "KOINONIA_RATE_LOGIN_IP": "100000",
    "KOINONIA_RATE_RESET_IP": "100000",
}


def before_month(months_back: int, today: date | None = None) -> str:
    """``YYYY-MM`` of the current UTC month minus ``months_back``."""
    today = today or datetime.now(UTC).date()
    index = today.year * 12 + today.month - 1 - months_back
    return f"{index // 12:04d}-{index % 12 + 1:02d}"


def stack_objects(stack: Stack) -> ObjectStore:
    """The object store the stack's processes use: the one their environment names
    (a relative data folder resolves against the working directory they share with
    the tests)."""
    return open_object_store(Settings.from_env(stack.env))


def run_koinonia(
    stack: Stack, *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``koinonia <args>`` as an operator runs it beside ``koinonia dev``: no store
    URLs, the stack found through ``<data dir>/stack.json``; the object store the one
    the stack's processes use."""
    uv = shutil.which("uv")
    command = [uv, "run", "--no-sync", "koinonia"] if uv else [sys.executable, "-m", "deploy.cli"]
    env = {k: v for k, v in stack.env.items() if k not in STORES}
    env["KOINONIA_OBJECT_STORE_URL"] = stack_objects(stack).url
    return subprocess.run(
        [*command, *args],
        cwd=ROOT,
        env={**env, "KOINONIA_DATA_DIR": str(stack.data_dir)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def every_page(client: httpx.Client, path: str, **params: Any) -> list[dict[str, Any]]:
    """Every row of a listing, following ``next_cursor``."""
    rows: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(500):
        page: dict[str, Any] = {"limit": 100, **({"cursor": cursor} if cursor else {})}
        answer = client.get(path, params={**params, **page})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        rows += body["data"]
        cursor = body["meta"].get("next_cursor")
        if not cursor:
            return rows
    raise AssertionError(f"{path}: more than 500 pages")


@pytest.fixture(scope="session")
def archive_s3_stack(tmp_path_factory: pytest.TempPathFactory, moto_s3: MotoS3) -> Iterator[Stack]:
    """A stack of its own whose object store is a bucket on moto's S3 server, and
    whose web process caches no archive file (``KOINONIA_ARCHIVE_CACHE_MB=0``), so
    every archived read it serves fetches from S3."""
    from tests.conftest import running_stack

    env = dict(os.environ)
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    env.pop("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", None)
    env.update(SUITE_ENV)
    # Its web process keeps no archive file: every archived read goes to S3.
    env["KOINONIA_ARCHIVE_CACHE_MB"] = "0"
    env.update(moto_s3.env(f"s3://{moto_s3.new_bucket('koinonia-archive')}/archive-stack"))
    with running_stack(tmp_path_factory, "archive-s3", env) as stack:
        _S3_STACKS.append(stack)
        yield stack


_S3_STACKS: list[Stack] = []


def uses_archive_s3_stack(item: pytest.Item) -> bool:
    """Takes the s3 stack: as a fixture, or through ``history[s3]`` of
    tests/api/test_archive_reads.py (``request.getfixturevalue``)."""
    callspec = getattr(item, "callspec", None)
    through_history = callspec is not None and callspec.params.get("history") == "s3"
    return through_history or "archive_s3_stack" in getattr(item, "fixturenames", ())


def stop_archive_s3_stack() -> None:
    """Stop the s3 stack once its last user has run (tests/conftest.py
    ``pytest_runtest_teardown``) rather than at the session's end: idle, its scheduler,
    worker and relays still poll, and the cluster tests that run last are timing
    sensitive. ``Stack.stop`` is idempotent, so the fixture's own stop is harmless."""
    while _S3_STACKS:
        _S3_STACKS.pop().stop()
