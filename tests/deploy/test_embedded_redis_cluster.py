"""The embedded Redis Cluster (deploy/embedded_redis_cluster.py), the cluster client
(storage/redis/connection.py) and the tests' ``redis_cluster`` fixture, on real nodes."""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

import httpx
import pytest
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import AskError, MovedError

from deploy.stack import Stack
from deploy.stack_file import operator_settings
from storage.process.settings import RedisSettings, Settings
from storage.redis.connection import is_cluster, open_redis, seed_nodes
from tests.redis_cluster_support import RedisClusterHandle, slot_of


def _two_churches_on_different_masters(cluster: RedisClusterHandle) -> tuple[str, str]:
    """Hash tags of two churches whose slots different masters serve."""
    first = "{c:1}"
    owner = cluster.master_of(first).node_id
    for church in range(2, 200):
        tag = f"{{c:{church}}}"
        if cluster.master_of(tag).node_id != owner:
            return first, tag
    raise AssertionError("200 churches all on one master")


def _unique_church() -> str:
    return f"{{c:{uuid.uuid4().int % 10**12}}}"


def test_settings_read_the_seed_list() -> None:
    settings = Settings.from_env(
        {"REDIS_CLUSTER_NODES": " 10.0.0.1:7000, redis://u:p@10.0.0.2:7001/0 ,"}
    )
    assert settings.redis.cluster_nodes == ("10.0.0.1:7000", "redis://u:p@10.0.0.2:7001/0")
    assert Settings.from_env({}).redis.cluster_nodes == ()
    nodes, options = seed_nodes(settings.redis.cluster_nodes)
    assert [(n.host, n.port) for n in nodes] == [("10.0.0.1", 7000), ("10.0.0.2", 7001)]
    # Credentials of the URL apply to every node; a cluster has no database number.
    assert options == {"username": "u", "password": "p"}
    assert seed_nodes(("rediss://h:7002",))[1] == {"ssl": True}
    with pytest.raises(ValueError, match="host:port"):
        seed_nodes(("no-port",))


def test_cluster_has_three_masters_each_with_a_replica(redis_cluster: RedisClusterHandle) -> None:
    views = redis_cluster.cluster.view()
    masters = [v for v in views if v.is_master and v.slots]
    assert len(masters) == 3
    assert sum(hi - lo + 1 for m in masters for lo, hi in m.slots) == 16384
    for master in masters:
        replicas = [v for v in views if v.master_id == master.node_id and not v.failed]
        assert len(replicas) == 1, master.address
    assert len(redis_cluster.nodes) == 6
    assert redis_cluster.env["REDIS_CLUSTER_NODES"].count(",") == 5


@pytest.mark.anyio
async def test_keys_of_two_churches_land_by_hash_tag(redis_cluster: RedisClusterHandle) -> None:
    first, second = _two_churches_on_different_masters(redis_cluster)
    client = open_redis(redis_cluster.settings)
    assert is_cluster(client)
    assert isinstance(client, RedisCluster)
    try:
        # Every key of one church shares its slot, so a script and a transaction
        # touching several of them run on one node.
        for tag in (first, second):
            await client.set(f"{tag}:a", b"1")
            pipe = client.pipeline(transaction=True)
            pipe.set(f"{tag}:b", b"2").incr(f"{tag}:n")
            await pipe.execute()
            total = await client.eval(
                "return redis.call('GET', KEYS[1]) + redis.call('GET', KEYS[2])",
                2,
                f"{tag}:a",
                f"{tag}:b",
            )
            assert total == 3
        assert slot_of(f"{first}:a") == slot_of(f"{first}:queue") != slot_of(f"{second}:a")
    finally:
        await client.aclose()
    # The keys live on the master of their tag and nowhere else.
    for tag in (first, second):
        owner = redis_cluster.master_of(tag)
        for master in redis_cluster.masters():
            with master.client() as plain:
                if master.node_id == owner.node_id:
                    assert plain.get(f"{tag}:b") == b"2"
                else:
                    with pytest.raises(MovedError):
                        plain.get(f"{tag}:b")


@pytest.mark.slow
@pytest.mark.anyio
async def test_failover_promotes_the_replica(redis_cluster: RedisClusterHandle) -> None:
    tag = _unique_church()
    client = open_redis(redis_cluster.settings)
    try:
        await client.set(f"{tag}:kept", b"yes")
        old_master = redis_cluster.master_of(tag)
        with old_master.client() as plain:
            # Replication is asynchronous: wait for the replica to have the write.
            assert plain.execute_command("WAIT", 1, 2000) == 1
        (replica,) = redis_cluster.cluster.replicas_of(old_master)

        killed = redis_cluster.kill_master_of(tag)
        assert killed.node_id == old_master.node_id
        assert killed.pid is None
        promoted = redis_cluster.master_of(tag)
        assert promoted.node_id == replica.node_id

        # The same client object finds the new master (it re-reads the slot map
        # after the connection error) and the write survived.
        assert await client.get(f"{tag}:kept") == b"yes"
        await client.set(f"{tag}:after", b"1")
    finally:
        await client.aclose()
        redis_cluster.heal()
    # The old master came back as a replica of the promoted node.
    assert [r.node_id for r in redis_cluster.cluster.replicas_of(promoted)] == [killed.node_id]


@pytest.mark.anyio
async def test_slot_migration_moves_keys_and_clients_follow(
    redis_cluster: RedisClusterHandle,
) -> None:
    tag = _unique_church()
    keys = [f"{tag}:k{i}" for i in range(20)]
    client = open_redis(redis_cluster.settings)
    try:
        for i, key in enumerate(keys):
            await client.set(key, str(i))
        slot = redis_cluster.slot_of(tag)
        source = redis_cluster.master_of(tag)
        target = redis_cluster.other_master(tag)
        before = redis_cluster.redirects()

        with redis_cluster.migrate_slot(slot, target) as migration:
            assert migration.move_keys(limit=5) == 5
            # Half-moved: the source answers ASK for the keys it no longer has.
            with source.client() as plain:
                # (Not EXISTS: for a key it lacks, a MIGRATING node answers ASK.)
                left = plain.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100)
                missing = sorted(set(keys) - {k.decode() for k in left})
                assert len(missing) == 5
                with pytest.raises(AskError):
                    plain.get(missing[0])
            # The cluster client follows ASK for the moved keys and reads the
            # others where they are.
            assert [await client.get(k) for k in keys] == [str(i).encode() for i in range(20)]
            migration.finish()

        assert redis_cluster.master_of(tag).node_id == target.node_id
        # The client still maps the slot to the source: MOVED, followed.
        assert [await client.get(k) for k in keys] == [str(i).encode() for i in range(20)]
        await client.set(f"{tag}:new", b"1")
        after = redis_cluster.redirects()
        assert after["ASK"] > before["ASK"]
        assert after["MOVED"] > before["MOVED"]
        with target.client() as plain:
            assert plain.get(keys[0]) == b"0"
    finally:
        await client.aclose()


def test_standalone_settings_keep_the_standalone_client() -> None:
    client = open_redis(RedisSettings(url="redis://127.0.0.1:1/0"))
    assert not is_cluster(client)


@pytest.mark.slow
def test_dev_stack_starts_a_cluster_and_records_it(stack: Stack, tmp_path: Path) -> None:
    """``koinonia dev`` with KOINONIA_DEV_REDIS_CLUSTER=1 (the suite's Postgres reused)."""
    env = {
        "PATH": os.environ.get("PATH", ""),
        "KOINONIA_DEV_REDIS_CLUSTER": "1",
        "DATABASE_URL": stack.env["DATABASE_URL"],
    }
    dev = Stack(tmp_path, env=env, fast_unsafe=True, quiet=True)
    try:
        child_env = dev.start_stores()
        assert dev.redis is None
        assert dev.redis_cluster is not None
        assert "REDIS_URL" not in child_env
        seeds = child_env["REDIS_CLUSTER_NODES"].split(",")
        assert len(seeds) == 6
        dev.write_stack_file()
        entry = dev.describe().redis
        assert sorted(node.role for node in entry.cluster) == ["primary"] * 3 + ["replica"] * 3
        # Operator commands find the cluster through stack.json.
        found = operator_settings({"KOINONIA_DATA_DIR": str(tmp_path)})
        assert sorted(found.redis.cluster_nodes) == sorted(seeds)

        async def round_trip() -> bytes | str | None:
            client = open_redis(found.redis)
            try:
                await client.set("{c:1}:dev", b"1")
                return await client.get("{c:1}:dev")
            finally:
                await client.aclose()

        assert asyncio.run(round_trip()) == b"1"
    finally:
        dev.stop()
    assert dev.redis_cluster is None


@pytest.mark.slow
def test_cluster_stack_is_ready(cluster_stack: Stack) -> None:
    """The ``cluster_stack`` fixture: a whole stack whose processes use the cluster."""
    assert "REDIS_URL" not in cluster_stack.env
    assert cluster_stack.env["REDIS_CLUSTER_NODES"]
    answer = httpx.get(f"http://127.0.0.1:{cluster_stack.http_port}/health/ready", timeout=10)
    assert answer.status_code == 200, answer.text
