"""Embedded streaming replicas of the embedded PostgreSQL (``KOINONIA_DEV_REPLICAS``).

A replica is an ``EmbeddedPostgres`` whose cluster comes from ``pg_basebackup``
(same wheel, same ``koinonia-pg`` account as root) instead of ``initdb``, and
which streams from the primary as a hot standby::

    <primary data dir>/replicas/<n>/
        postgres/        PGDATA of replica n (0700, owned like the primary's)
        postgres.log

Each replica has its own port and socket folder, and a physical replication
slot ``koinonia_replica_<n>`` on the primary: the primary keeps the WAL a
stopped or killed replica still needs, so it catches up when started again
instead of needing a new base backup. ``remove()`` drops the slot, or the
primary would keep WAL for it forever.

No SQL here (tests/test_layers.py): the slot is made and dropped by
``pg_basebackup`` and ``pg_receivewal`` over the replication protocol, and
readiness comes from ``postmaster.pid`` like the primary's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import shutil
import signal

from deploy.embedded import EmbeddedServerError
from deploy.embedded_postgres import (
    PG_ROLE,
    EmbeddedPostgres,
    _Account,
    _pg_bin_dir,
    _postgres_account,
    _run_tool,
)

logger = logging.getLogger(__name__)

SLOT_PREFIX = "koinonia_replica_"
#: Settings this module owns in the replica's postgresql.auto.conf.
_OWN_SETTINGS = ("primary_conninfo", "primary_slot_name", "hot_standby_feedback")


class EmbeddedReplica(EmbeddedPostgres):
    """Hot standby number ``index`` of the embedded primary ``primary``.

    ``start()`` makes the base backup on first use, then (re)starts the
    standby pointed at the primary's current port: the primary picks a new
    port at each start unless told otherwise, so the connection settings are
    rewritten at every start rather than trusted from the backup.
    """

    def __init__(
        self,
        primary: EmbeddedPostgres,
        index: int,
        *,
        port: int | None = None,
        fast_unsafe: bool = False,
    ) -> None:
        super().__init__(
            primary.data_dir / "replicas" / str(index), port=port, fast_unsafe=fast_unsafe
        )
        self.primary = primary
        self.index = index
        self.slot = f"{SLOT_PREFIX}{index}"

    def start(self) -> str:
        """Start streaming from the primary (which must be running); return the URL.

        Returns once the standby accepts read-only connections; streaming
        itself begins a moment later (the WAL receiver connects on its own).
        """
        if self.primary.port is None:
            raise EmbeddedServerError("the primary must be started before its replicas")
        if (self.pgdata / "PG_VERSION").exists():
            self._write_standby_settings()
        url = super().start()
        # The same port on every later start: web processes hold this URL.
        self.requested_port = self.port
        return url

    def kill(self) -> None:
        """SIGKILL the postmaster and its children, as a crash would.

        The whole process group: children left behind would keep the shared
        memory attached and the next start would refuse to run.
        """
        process, self._process = self._process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        logger.info("replica %d (port %s) killed", self.index, self.port)

    def remove(self) -> None:
        """Stop the replica, drop its slot on the primary, delete its folder."""
        self.stop()
        if self.primary.port is not None:
            self._drop_slot(_pg_bin_dir(), _postgres_account())
        shutil.rmtree(self.data_dir, ignore_errors=True)

    # -- overrides of EmbeddedPostgres's steps ----------------------------------

    def _initdb(self, bin_dir: pathlib.Path, account: _Account | None) -> None:
        """Clone the primary instead of creating an empty cluster."""
        # A slot left by a replica whose folder was deleted would make -C fail.
        self._drop_slot(bin_dir, account)
        args = [
            str(bin_dir / "pg_basebackup"),
            "--pgdata",
            str(self.pgdata),
            "--dbname",
            self._primary_conninfo(),
            # standby.signal; the connection settings are ours (see start()).
            "--write-recovery-conf",
            "--create-slot",
            "--slot",
            self.slot,
            "--wal-method=stream",
            "--checkpoint=fast",
        ]
        if self.fast_unsafe:
            args.append("--no-sync")
        if _run_tool(args, account, self.pgdata, self.log_path) != 0:
            raise EmbeddedServerError(
                f"pg_basebackup from port {self.primary.port} failed", self.log_path
            )
        self._write_standby_settings()

    def _postmaster_ready(self, pid: int) -> bool:
        # A hot standby reports "standby" once it accepts read-only connections.
        try:
            lines = (self.pgdata / "postmaster.pid").read_text().splitlines()
        except FileNotFoundError:
            return False
        return (
            len(lines) >= 8
            and lines[0].strip() == str(pid)
            and lines[7].strip() in ("ready", "standby")
        )

    # -- helpers ---------------------------------------------------------------

    def _primary_conninfo(self) -> str:
        # application_name shows the replica by name in the primary's
        # pg_stat_replication.
        return (
            f"host=127.0.0.1 port={self.primary.port} user={PG_ROLE} application_name={self.slot}"
        )

    def _write_standby_settings(self) -> None:
        """Point postgresql.auto.conf at the primary's current port and our slot.

        Other lines (the primary's own ALTER SYSTEM settings, copied by the
        backup) are kept. The file is rewritten in place so it keeps its owner.
        """
        path = self.pgdata / "postgresql.auto.conf"
        kept = [
            line
            for line in path.read_text().splitlines()
            if line.split("=", 1)[0].strip() not in _OWN_SETTINGS
        ]
        ours = [
            f"primary_conninfo = '{self._primary_conninfo()}'",
            f"primary_slot_name = '{self.slot}'",
            # Long analytics reads on the replica are not cancelled by the
            # primary vacuuming rows they still see.
            "hot_standby_feedback = on",
        ]
        with path.open("r+") as out:
            out.truncate(0)
            out.write("\n".join([*kept, *ours]) + "\n")

    def _drop_slot(self, bin_dir: pathlib.Path, account: _Account | None) -> None:
        """Drop our slot on the primary if it exists (a missing one is fine)."""
        args = [
            str(bin_dir / "pg_receivewal"),
            "--dbname",
            self._primary_conninfo(),
            "--slot",
            self.slot,
            "--drop-slot",
        ]
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # Exit code ignored: "does not exist" is the common, harmless answer.
        _run_tool(args, account, self.data_dir, self.log_path)
