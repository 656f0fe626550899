"""An embedded Redis Cluster (3 masters, 3 replicas) for the tests.

Registered in tests/conftest.py (``pytest_plugins``). ``redis_cluster`` starts the
cluster lazily, the first time a test asks for it (about a second), and keeps it
for the session. A process spawned with ``redis_cluster.env`` (or code given
``redis_cluster.settings``) talks to it through redis-py's cluster client.

The cluster is shared by the session: a test that kills a node or moves a slot
leaves the cluster serving every slot (``kill_master_of`` waits for the
failover, ``migrate_slot`` finishes on leaving its ``with``), and should call
``restart(node)`` (or ``heal()``) for a node it killed, so the next test again
finds a replica behind every master. Slots may have moved: find a key's master
with ``master_of``, never assume the initial layout.

``cluster_stack`` runs a second whole stack (its own Postgres) on the cluster,
for tests that run the same assertions against a standalone Redis (``stack``)
and a cluster.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import TracebackType
from typing import Self

import pytest
from redis.crc import key_slot

from deploy.embedded_redis_cluster import ClusterNode, EmbeddedRedisCluster
from deploy.stack import Stack
from storage.process.settings import RedisSettings
from tests.conftest import running_stack


def slot_of(key: str | bytes) -> int:
    """The cluster slot of ``key`` (of its ``{hash tag}`` when it has one)."""
    return key_slot(key.encode() if isinstance(key, str) else key)


class SlotMigration:
    """A slot half-moved: IMPORTING on the target, MIGRATING on the source.

    While it lasts, a client asking the source for a key already moved gets
    ``-ASK``; after ``finish()`` the source answers ``-MOVED``. Leaving the
    ``with`` block finishes the move (unless ``finish()`` already did).
    """

    def __init__(self, cluster: EmbeddedRedisCluster, slot: int, target: ClusterNode) -> None:
        self.cluster = cluster
        self.slot = slot
        self.target = target
        self.source = cluster.begin_migration(slot, target)
        self.finished = False

    def move_keys(self, limit: int | None = None) -> int:
        """MIGRATE up to ``limit`` keys of the slot (all when None); how many moved."""
        return self.cluster.move_keys(self.slot, self.source, self.target, limit=limit)

    def finish(self) -> None:
        """Move the remaining keys and give the slot to the target on every master."""
        if not self.finished:
            self.cluster.finish_migration(self.slot, self.source, self.target)
            self.finished = True

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.finish()


class RedisClusterHandle:
    """The session's cluster, with what failover and migration tests need."""

    def __init__(self, cluster: EmbeddedRedisCluster) -> None:
        self.cluster = cluster

    @property
    def nodes(self) -> list[str]:
        """Every node's ``host:port`` (seeds; masters and replicas alike)."""
        return self.cluster.seeds

    @property
    def cluster_nodes(self) -> str:
        """``REDIS_CLUSTER_NODES``."""
        return self.cluster.cluster_nodes_setting

    @property
    def env(self) -> dict[str, str]:
        """Environment for a process that should use the cluster (REDIS_URL unset)."""
        return {"REDIS_CLUSTER_NODES": self.cluster_nodes, "REDIS_URL": ""}

    @property
    def settings(self) -> RedisSettings:
        return RedisSettings(cluster_nodes=tuple(self.nodes))

    def masters(self) -> list[ClusterNode]:
        """The nodes serving slots now."""
        masters = {v.node_id for v in self.cluster.view() if v.is_master and v.slots}
        return [n for n in self.cluster.live_nodes() if n.node_id in masters]

    def master_of(self, key: str | bytes) -> ClusterNode:
        """The master serving ``key``'s slot now."""
        return self.cluster.master_of(key)

    def other_master(self, key: str | bytes) -> ClusterNode:
        """A master not serving ``key``'s slot (a migration target)."""
        owner = self.master_of(key)
        return next(m for m in self.masters() if m.node_id != owner.node_id)

    def kill_master_of(self, key: str | bytes) -> ClusterNode:
        """SIGKILL the master serving ``key``; return once its replica has taken over and
        every live node reports ``cluster_state:ok``. Returns the killed node (for
        ``restart``); ``master_of(key)`` now names the promoted one."""
        master = self.master_of(key)
        self.cluster.kill_master(master)
        return master

    def kill(self, node: ClusterNode) -> None:
        """SIGKILL any node and return at once (no waiting for a failover)."""
        self.cluster.kill_node(node)

    def restart(self, node: ClusterNode) -> None:
        """Start a killed node again; it rejoins (as a replica after a failover). Returns
        once the cluster is healthy with it."""
        self.cluster.restart_node(node)
        self.cluster.wait_healthy()

    def heal(self) -> None:
        """Restart every dead node and wait until the cluster is healthy."""
        for node in self.cluster.nodes:
            if node.pid is None:
                self.cluster.restart_node(node)
        self.cluster.wait_healthy()

    def redirects(self) -> dict[str, int]:
        """``{"MOVED": n, "ASK": n}`` replies sent by the live nodes so far (INFO
        errorstats); take a reading before and after to show a client met them."""
        return self.cluster.redirect_counts()

    def slot_of(self, key: str | bytes) -> int:
        return slot_of(key)

    def migrate_slot(self, slot: int, to_node: ClusterNode) -> SlotMigration:
        """Begin moving ``slot`` to ``to_node`` (SETSLOT IMPORTING/MIGRATING). Use as
        ``with redis_cluster.migrate_slot(s, n) as m: m.move_keys(10); ...; m.finish()``
        so a test can act while the slot is half-moved; the ``with`` finishes it."""
        return SlotMigration(self.cluster, slot, to_node)

    def move_slot(self, slot: int, to_node: ClusterNode) -> None:
        """Move ``slot`` to ``to_node`` in one go."""
        with self.migrate_slot(slot, to_node):
            pass


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterHandle]:
    cluster = EmbeddedRedisCluster(tmp_path_factory.mktemp("redis-cluster"))
    cluster.start()
    try:
        yield RedisClusterHandle(cluster)
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def cluster_stack(
    stack: Stack, redis_cluster: RedisClusterHandle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """A second whole stack (simulator, web, worker, scheduler) on ``redis_cluster``,
    with the suite's settings (the session ``stack``'s environment).

    It has its own embedded Postgres: sharing the suite's database, each stack's
    scheduler would reconcile the other's broadcasts into its own Redis, and both
    workers would text them. Tests sign up churches on it as on the session stack
    (``Church(f"http://127.0.0.1:{cluster_stack.http_port}")``).
    """
    env = dict(stack.base_env)
    for name in ("DATABASE_URL", "DATABASE_SESSION_URL", "REDIS_URL", "DATABASE_REPLICA_URLS"):
        env.pop(name, None)
    env.pop("KOINONIA_DEV_REDIS_CLUSTER", None)
    env["REDIS_CLUSTER_NODES"] = redis_cluster.cluster_nodes
    with running_stack(tmp_path_factory, "koinonia-cluster", env) as cluster_stack:
        yield cluster_stack
