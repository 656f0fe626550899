"""``<data dir>/stack.json``: where a running ``koinonia dev`` keeps its stores and processes.

``koinonia dev`` (``Stack`` in deploy/stack.py) writes it once the stack is ready and
removes it when it stops. Every operator command finds its stores through
``operator_settings``: ``DATABASE_URL`` / ``REDIS_URL`` when set, else the stores named
in this file, else a message naming both ways (docs/operations.md "Finding a running
stack"). A file whose Postgres is no longer running (a ``koinonia dev`` killed outright,
then its servers stopped or the machine rebooted) is refused, never trusted.

Only the standard library and msgspec here: operator commands import it before anything
heavy.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

import msgspec

from deploy.embedded import pid_alive
from storage.process.settings import Settings

STACK_FILE = "stack.json"
VERSION = 1
DEV_SECRETS = "dev-secrets.json"
KEY_NAMES = ("KOINONIA_PHONE_KEY", "KOINONIA_LOOKUP_KEY")


class Endpoint(msgspec.Struct, frozen=True, kw_only=True):
    """A server the stack reaches by URL."""

    url: str
    pid: int | None = None
    """None: an external server (``DATABASE_URL`` / ``REDIS_URL`` given to ``koinonia dev``)."""


class RedisNode(msgspec.Struct, frozen=True, kw_only=True):
    address: str
    """``host:port``"""
    role: str
    """``primary`` or ``replica``; ``seed`` for a node of ``REDIS_CLUSTER_NODES`` (an
    external cluster, whose roles the stack does not track)"""
    pid: int | None = None


class RedisEntry(msgspec.Struct, frozen=True, kw_only=True):
    url: str
    """The standalone server, or the cluster's first node."""
    pid: int | None = None
    """Standalone only; None for an external server or a cluster."""
    cluster: tuple[RedisNode, ...] = ()
    """Empty when standalone."""


class Process(msgspec.Struct, frozen=True, kw_only=True):
    """One child process of the stack (``koinonia <kind>``)."""

    name: str
    pid: int
    address: str | None = None
    """The URL it serves (web, simulator); None for processes that listen on nothing."""


class MetricsEndpoint(msgspec.Struct, frozen=True, kw_only=True):
    """Where one process of the stack serves Prometheus metrics."""

    process: str
    """The process's name in the stack (``web``, ``worker``, ``scheduler``, ...)."""
    address: str
    """``host:port``: its metrics are at ``http://<address>/metrics``."""


class StackFile(msgspec.Struct, frozen=True, kw_only=True):
    version: int = VERSION
    pid: int
    """The ``koinonia dev`` process that wrote the file (and removes it when it stops)."""
    data_dir: str
    postgres: Endpoint
    """The primary; operator commands (migrations included) connect here."""
    replicas: tuple[Endpoint, ...] = ()
    pgbouncer: Endpoint | None = None
    redis: RedisEntry
    simulator: tuple[Process, ...] = ()
    web: tuple[Process, ...] = ()
    worker: tuple[Process, ...] = ()
    scheduler: tuple[Process, ...] = ()
    metrics: tuple[MetricsEndpoint, ...] = ()
    """Every ``/metrics`` of the stack's processes (web, worker, scheduler), by name."""


class NoStores(Exception):
    """No store to use: the message says what to set or start (the CLI exits with 2)."""


def stack_file_path(data_dir: Path | str) -> Path:
    return Path(data_dir).resolve() / STACK_FILE


def write_stack_file(path: Path, stack: StackFile) -> None:
    """Replace ``path`` atomically (a temporary file in the same folder, then rename):
    a reader sees the old file or the new one, never half of one. Mode 600: an
    external ``DATABASE_URL`` may hold a password."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(msgspec.json.format(msgspec.json.encode(stack), indent=2) + b"\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def remove_stack_file(path: Path, owner_pid: int) -> None:
    """Remove ``path`` if the process ``owner_pid`` wrote it: a newer ``koinonia dev``
    on the same data folder has replaced the file, and keeps it."""
    try:
        stack = read_stack_file(path)
    except (OSError, msgspec.DecodeError):
        return  # gone, or not ours to judge: a stop must not fail here
    if stack.pid == owner_pid:
        with contextlib.suppress(OSError):
            path.unlink()


def read_stack_file(path: Path) -> StackFile:
    """The file as written; FileNotFoundError or msgspec.DecodeError (a ValidationError
    included) when absent or unreadable. Says nothing about whether it is current:
    ``stale_reason`` does."""
    return msgspec.json.decode(path.read_bytes(), type=StackFile)


def stale_reason(stack: StackFile, *, redis: bool = False) -> str | None:
    """Why ``stack`` cannot be trusted, or None. Its Postgres must still run (its own
    program at that pid, not a process that took the pid over after a reboot), and
    with ``redis`` its standalone Redis too; a store the stack did not start (pid
    None) needs the ``koinonia dev`` that wrote the file alive instead."""
    if stack.postgres.pid is not None:
        if not pid_alive(stack.postgres.pid, "postgres"):
            return f"its Postgres (pid {stack.postgres.pid}) is not running"
    elif not pid_alive(stack.pid):
        return f"the `koinonia dev` that wrote it (pid {stack.pid}) is not running"
    if redis and stack.redis.pid is not None and not pid_alive(stack.redis.pid, "valkey-server"):
        return f"its Redis (pid {stack.redis.pid}) is not running"
    if redis and stack.redis.pid is None and not stack.redis.cluster and not pid_alive(stack.pid):
        return f"the `koinonia dev` that wrote it (pid {stack.pid}) is not running"
    return None


def operator_settings(env: Mapping[str, str] | None = None, *, redis: bool = True) -> Settings:
    """The settings an operator command runs with; the one way they find their stores.

    ``DATABASE_URL`` (and, with ``redis``, ``REDIS_URL``) when set; otherwise the stores
    named in ``<KOINONIA_DATA_DIR>/stack.json`` of a running ``koinonia dev``, whose
    development keys (``dev-secrets.json`` beside it) then stand in for unset
    ``KOINONIA_PHONE_KEY`` / ``KOINONIA_LOOKUP_KEY``. Raises NoStores with a message
    naming both ways when neither is there, or when the file is stale.
    """
    source = dict(os.environ if env is None else env)
    settings = Settings.from_env(source)
    missing_db = not settings.database.url
    missing_redis = redis and not (settings.redis.url or settings.redis.cluster_nodes)
    if not (missing_db or missing_redis):
        return settings
    wanted = " and ".join(
        name for name, gone in (("DATABASE_URL", missing_db), ("REDIS_URL", missing_redis)) if gone
    )
    path = stack_file_path(settings.data_dir)
    try:
        stack = read_stack_file(path)
    except FileNotFoundError:
        raise NoStores(
            f"no stores: set {wanted}, or start `koinonia dev` with the same data folder "
            f"(KOINONIA_DATA_DIR; no running stack: {path} does not exist)"
        ) from None
    except (OSError, msgspec.DecodeError) as exc:
        raise NoStores(
            f"cannot read {path} ({exc}); set {wanted}, or restart `koinonia dev`"
        ) from exc
    reason = stale_reason(stack, redis=missing_redis)
    if reason is not None:
        raise NoStores(
            f"{path} is stale: {reason} (`koinonia dev` did not stop cleanly); "
            f"start `koinonia dev` again, or set {wanted}"
        )
    if missing_db:
        source["DATABASE_URL"] = stack.postgres.url
    if missing_redis and stack.redis.cluster:
        # KOINONIA_DEV_REDIS_CLUSTER=1: every node is a seed.
        source["REDIS_CLUSTER_NODES"] = ",".join(node.address for node in stack.redis.cluster)
    elif missing_redis:
        source["REDIS_URL"] = stack.redis.url
    secrets = _dev_secrets(Path(stack.data_dir) / DEV_SECRETS)
    for name in KEY_NAMES:
        if not source.get(name) and secrets.get(name):
            source[name] = secrets[name]
    return Settings.from_env(source)


def _dev_secrets(path: Path) -> dict[str, str]:
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return (
        {k: v for k, v in loaded.items() if isinstance(v, str)} if isinstance(loaded, dict) else {}
    )
