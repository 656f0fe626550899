"""Embedded PgBouncer: Debian's ``pgbouncer`` (1.18) in front of a Postgres, as a child.

``koinonia dev`` with ``KOINONIA_DEV_PGBOUNCER=1``, the tests and the benches
run it to prove the application works through a transaction-mode pooler. Its
configuration is ``deploy/pgbouncer.ini``, the production starting config, with
only what is local replaced: the ``[databases]`` entry, the loopback address and
port, trust authentication, and the file paths. Layout under the data folder::

    data_dir/
        pgbouncer/       pgbouncer.ini, userlist.txt, pgbouncer.pid (0700; owned
                         by ``koinonia-pg`` as root)
        pgbouncer.log    its output

Unlike Postgres it is not in a wheel: a machine without the Debian package
gets an error that says how to install it.
"""

from __future__ import annotations

import atexit
import logging
import os
import pathlib
import re
import shutil
import signal
import subprocess
import time

from psycopg.conninfo import conninfo_to_dict

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
from deploy.embedded_postgres import (
    _Account,
    _chown_tree,
    _ensure_traversable,
    _popen_as,
    _postgres_account,
)

logger = logging.getLogger(__name__)

TEMPLATE = pathlib.Path(__file__).with_name("pgbouncer.ini")
INSTALL_HINT = "install Debian's package: apt-get install -y pgbouncer"
#: The [pgbouncer] settings replaced by local ones; every other line of the
#: template (the pooling ones) applies as written.
_LOCAL_KEYS = (
    "listen_addr",
    "listen_port",
    "unix_socket_dir",
    "auth_type",
    "auth_file",
    "admin_users",
    "stats_users",
    "logfile",
    "pidfile",
)
_SECTION = re.compile(r"^\s*\[(?P<name>[^\]]+)\]\s*$")
_KEY = re.compile(r"^\s*(?P<key>[A-Za-z_]+)\s*=")


def pgbouncer_binary() -> str:
    """The ``pgbouncer`` executable; EmbeddedServerError saying how to get it."""
    found = shutil.which("pgbouncer") or shutil.which(
        "pgbouncer", path=os.pathsep.join(["/usr/sbin", "/usr/local/sbin", "/sbin"])
    )
    if found is None:
        raise EmbeddedServerError(f"pgbouncer is not installed ({INSTALL_HINT})")
    return found


def render_config(template: str, databases: dict[str, str], settings: dict[str, str]) -> str:
    """``template`` with ``[databases]`` replaced by ``databases`` and each key of
    ``settings`` set in ``[pgbouncer]`` (replaced where the template has it, else
    added at the end of the section)."""
    out: list[str] = []
    section = ""
    pending = dict(settings)

    def flush_section() -> None:
        if section == "databases":
            out.extend(f"{name} = {entry}" for name, entry in databases.items())
        elif section == "pgbouncer":
            out.extend(f"{key} = {value}" for key, value in pending.items())
            pending.clear()

    for line in template.splitlines():
        header = _SECTION.match(line)
        if header:
            flush_section()
            section = header["name"].strip()
            out.append(line)
            continue
        key = _KEY.match(line)
        if section == "databases" and key:
            continue  # the template's example entry
        if section == "pgbouncer" and key and key["key"] in settings:
            value = pending.pop(key["key"], None)
            if value is not None:
                out.append(f"{key['key']} = {value}")
            continue
        out.append(line)
    flush_section()
    return "\n".join(out) + "\n"


class EmbeddedPgBouncer(EmbeddedServer):
    """PgBouncer in transaction mode on 127.0.0.1, in front of ``upstream_url``.

    Clients reach database ``dbname`` of the upstream under the same name, as the
    upstream's role, with trust auth (the listener is loopback only, as the
    embedded Postgres's). The admin console is database ``pgbouncer`` for that role.
    """

    def __init__(
        self, data_dir: pathlib.Path, upstream_url: str, *, port: int | None = None
    ) -> None:
        self.data_dir = pathlib.Path(data_dir).absolute()
        self.home = self.data_dir / "pgbouncer"
        self.config_path = self.home / "pgbouncer.ini"
        self.pid_path = self.home / "pgbouncer.pid"
        self.log_path = self.data_dir / "pgbouncer.log"
        upstream = conninfo_to_dict(upstream_url)
        self.upstream_host = str(upstream.get("host") or "127.0.0.1")
        self.upstream_port = int(str(upstream.get("port") or 5432))
        self.role = str(upstream.get("user") or "koinonia")
        self.dbname = str(upstream.get("dbname") or self.role)
        self.requested_port = port
        self.port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._owner_pid: int | None = None

    @property
    def url(self) -> str:
        """What DATABASE_URL becomes: the same database, through PgBouncer."""
        return f"postgresql://{self.role}@127.0.0.1:{self._bound_port()}/{self.dbname}"

    @property
    def admin_url(self) -> str:
        """The admin console (SHOW POOLS, SHOW STATS, ...; simple query protocol only)."""
        return f"postgresql://{self.role}@127.0.0.1:{self._bound_port()}/pgbouncer"

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    def _bound_port(self) -> int:
        if self.port is None:
            raise EmbeddedServerError("EmbeddedPgBouncer address read before start()")
        return self.port

    def start(self) -> str:
        """Start PgBouncer; return the URL clients use. Blocks until it listens."""
        if self._process is not None and self._process.poll() is None:
            return self.url
        binary = pgbouncer_binary()
        account = _postgres_account()
        self._prepare_home(account)
        stop_stale(self.pid_path, "pgbouncer", "PgBouncer")
        for attempt in range(1, PORT_ATTEMPTS + 1):
            port = self.requested_port if self.requested_port is not None else free_port()
            self._write_config(port, account)
            log_offset = file_size(self.log_path)
            process = self._spawn(binary, account)
            try:
                self._wait_ready(process, port, log_offset)
            except EmbeddedServerError:
                terminate(process, signal.SIGTERM, escalate=signal.SIGKILL)
                retry = self.requested_port is None and attempt < PORT_ATTEMPTS
                if retry and port_clash(self.log_path, log_offset):
                    logger.info("port %d was taken before PgBouncer bound it; retrying", port)
                    continue
                raise
            break
        self._process = process
        self._owner_pid = os.getpid()
        self.port = port
        atexit.register(self.stop)
        logger.info("PgBouncer ready at %s (in front of %s)", self.url, self.upstream_port)
        return self.url

    def stop(self) -> None:
        """Immediate shutdown (SIGTERM: clients are disconnected); idempotent."""
        atexit.unregister(self.stop)
        process, self._process = self._process, None
        if process is None or self._owner_pid != os.getpid():
            return  # a forked child inherited this object: the parent owns it
        terminate(process, signal.SIGTERM, escalate=signal.SIGKILL)
        logger.info("PgBouncer on port %s stopped", self.port)

    # -- steps of start() ------------------------------------------------------

    def _prepare_home(self, account: _Account | None) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.home.mkdir(mode=0o700, exist_ok=True)
        if account is not None:
            # PgBouncer reads its config as root, then drops to the account, which
            # writes the pid file here and reads the config again on SIGHUP.
            _ensure_traversable(self.home)
            _chown_tree(self.home, account)

    def _write_config(self, port: int, account: _Account | None) -> None:
        users = self.home / "userlist.txt"
        # Trust: PgBouncer still wants the role listed; no password is kept.
        users.write_text(f'"{self.role}" ""\n')
        target = f"host={self.upstream_host} port={self.upstream_port} dbname={self.dbname}"
        text = render_config(
            TEMPLATE.read_text(),
            {self.dbname: target},
            {
                "listen_addr": "127.0.0.1",
                "listen_port": str(port),
                "unix_socket_dir": "",
                "auth_type": "trust",
                "auth_file": str(users),
                "admin_users": self.role,
                "stats_users": self.role,
                # Empty: to stderr, which is our log file.
                "logfile": "",
                "pidfile": str(self.pid_path),
            },
        )
        self.config_path.write_text(text)
        for path in (users, self.config_path):
            path.chmod(0o600)
            if account is not None:
                os.chown(path, account.uid, account.gid)

    def _spawn(self, binary: str, account: _Account | None) -> subprocess.Popen[bytes]:
        args = [binary]
        if account is not None:
            # As root PgBouncer refuses to run unless told whom to become; it
            # drops privileges itself, after reading its config.
            args += ["-u", account.name]
        args.append(str(self.config_path))
        with self.log_path.open("ab") as log:
            log.write(f"--- koinonia: pgbouncer {' '.join(args[1:])} ---\n".encode())
            log.flush()
            # Started as ourselves (root included): PgBouncer changes user itself.
            return _popen_as(args, None, self.home, log)

    def _wait_ready(self, process: subprocess.Popen[bytes], port: int, log_offset: int) -> None:
        """Ready once it logged "process up" (after binding) for this start."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            with self.log_path.open("rb") as log:
                log.seek(log_offset)
                if b"process up" in log.read():
                    return
            if process.poll() is not None:
                raise EmbeddedServerError(
                    f"PgBouncer exited with code {process.returncode} during start-up",
                    self.log_path,
                )
            if time.monotonic() > deadline:
                raise EmbeddedServerError(
                    f"PgBouncer was not ready on port {port} within {START_TIMEOUT:.0f}s",
                    self.log_path,
                )
            time.sleep(POLL_INTERVAL)
