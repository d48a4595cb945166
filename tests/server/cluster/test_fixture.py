"""The Redis Cluster fixture is a real cluster: keys on every shard read back through redis-py's
cluster client, and a master killed -9 is replaced by its replica with the data it held."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from tests.cluster import RedisClusterProcesses

# One key per master: the hash tags {a}, {b}, {c} land on slots 15495, 3300 and 7365, in
# the three ranges `redis-cli --cluster create` gives three masters.
TAGS = ("a", "b", "c")


def shard_port(client: RedisCluster, key: str) -> int:
    """The port of the master that holds `key` (the client must have run a command)."""
    node = client.get_node_from_key(key)
    assert node is not None
    return int(node.port)


async def test_keys_on_every_shard_read_back(cluster_url: str) -> None:
    client = RedisCluster.from_url(cluster_url)
    try:
        for tag in TAGS:
            await client.set(f"k:{{{tag}}}", tag)
        assert [await client.get(f"k:{{{tag}}}") for tag in TAGS] == [b"a", b"b", b"c"]
        owners = {shard_port(client, f"k:{{{tag}}}") for tag in TAGS}
        assert len(owners) == 3  # the keys really sit on three shards
    finally:
        await client.aclose()


async def test_a_killed_master_is_replaced_by_its_replica(
    redis_cluster: RedisClusterProcesses, cluster_url: str
) -> None:
    client = RedisCluster.from_url(cluster_url)
    try:
        for tag in TAGS:
            await client.set(f"k:{{{tag}}}", tag)
        victim_port = shard_port(client, "k:{a}")
        victim = next(n for n in redis_cluster.nodes if n.port == victim_port)
        # WAIT: the replica holds the write before the master dies, so none is lost here.
        node = aioredis.Redis(host="127.0.0.1", port=victim_port)
        assert await node.wait(1, 10_000) == 1
        await node.aclose()
    finally:
        await client.aclose()

    killed, promoted = redis_cluster.kill_master(victim)
    try:
        assert not killed.alive()
        assert promoted.info("replication")["role"] == "master"
        client = RedisCluster.from_url(redis_cluster.url)
        try:
            assert [await client.get(f"k:{{{tag}}}") for tag in TAGS] == [b"a", b"b", b"c"]
            assert shard_port(client, "k:{a}") == promoted.port
        finally:
            await client.aclose()
    finally:
        redis_cluster.restart(killed)  # the next test gets 3 masters with a replica each
