"""Embedded PostgreSQL: the ``pgserver`` wheel's binaries, run as a child process.

See deploy/embedded.py for the layout under the data folder and the rules
both embedded servers follow.
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
import stat
import subprocess
import time
from dataclasses import dataclass
from typing import IO

import psycopg

from deploy.embedded import (
    POLL_INTERVAL,
    PORT_ATTEMPTS,
    START_TIMEOUT,
    STOP_TIMEOUT,
    EmbeddedServer,
    EmbeddedServerError,
    file_size,
    free_port,
    pid_alive,
    port_clash,
    read_pid,
    terminate,
)
from storage.pg.database import ensure_database

logger = logging.getLogger(__name__)

#: Superuser role and application database created in the embedded cluster.
PG_ROLE = "koinonia"
PG_DATABASE = "koinonia"
#: Unprivileged system account PostgreSQL runs as when we are root.
PG_SYSTEM_USER = "koinonia-pg"
_SOCKET_PATH_MAX = 107


@dataclass(frozen=True, slots=True)
class _Account:
    """The system account a server process runs as (only set when we are root)."""

    name: str
    uid: int
    gid: int


class EmbeddedPostgres(EmbeddedServer):
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

    @property
    def pid(self) -> int | None:
        """The postmaster's pid while this object runs it, else None."""
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

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

        for attempt in range(1, PORT_ATTEMPTS + 1):
            port = self.requested_port if self.requested_port is not None else free_port()
            log_offset = file_size(self.log_path)
            process = self._spawn(bin_dir, account, port, socket_dir)
            try:
                self._wait_ready(process, port)
            except EmbeddedServerError:
                terminate(process, signal.SIGINT)
                retry = self.requested_port is None and attempt < PORT_ATTEMPTS
                if retry and port_clash(self.log_path, log_offset):
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
        terminate(process, signal.SIGINT, escalate=signal.SIGQUIT)
        logger.info("PostgreSQL on port %s stopped", self.port)

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
        pid = read_pid(self.pgdata / "postmaster.pid")
        if pid is None or not pid_alive(pid, "postgres"):
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
            time.sleep(POLL_INTERVAL)
        admin_url = f"postgresql://{PG_ROLE}@127.0.0.1:{port}/postgres"
        try:
            ensure_database(admin_url, PG_DATABASE)
        except psycopg.OperationalError as exc:
            raise EmbeddedServerError(
                f"PostgreSQL is ready but refused a connection on port {port}: {exc}",
                self.log_path,
            ) from exc

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
