"""A node started on a Redis Cluster node: it reaches the whole cluster through one cluster
client, fixes the data's partition count at the first start (a later start asking another
is refused in one line), and judges every master's eviction policy. One Redis gets no such
key and today's key names."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from giftstream.server.app import App, StartupError
from giftstream.server.money import keys
from giftstream.server.money.catalog import Catalog
from tests.cluster import RedisClusterProcesses
from tests.conftest import make_settings


def cluster_app(url: str, data_dir: Path, catalog: Catalog, partitions: int) -> App:
    return App(dataclasses.replace(make_settings(url, data_dir), partitions=partitions), catalog)


async def stored_partitions(url: str) -> bytes | str | None:
    client = RedisCluster.from_url(url)
    try:
        value: bytes | str | None = await client.get(keys.PARTITIONS)
        return value
    finally:
        await client.aclose()


async def test_a_node_on_a_cluster_uses_one_cluster_client_and_its_partitions(
    cluster_url: str, data_dir: Path, catalog: Catalog
) -> None:
    async with cluster_app(cluster_url, data_dir, catalog, partitions=8) as node:
        assert isinstance(node.redis, RedisCluster)
        assert node.keyspace == keys.KeySpace(partitions=8, cluster=True)
        assert node.hub.redis is node.redis and node.broker.keyspace is node.keyspace
        assert "Redis Cluster, 8 partitions" in node.redis_description
    assert await stored_partitions(cluster_url) == b"8"


async def test_the_first_start_fixes_the_partition_count(
    cluster_url: str, data_dir: Path, catalog: Catalog
) -> None:
    async with cluster_app(cluster_url, data_dir, catalog, partitions=8):
        pass
    with pytest.raises(StartupError, match=r"has 8 partitions .* not the 4 asked") as refused:
        async with cluster_app(cluster_url, data_dir, catalog, partitions=4):
            pass
    assert "\n" not in str(refused.value)
    assert await stored_partitions(cluster_url) == b"8"  # never rewritten


async def test_one_redis_gets_no_partitions_key(
    make_app: Callable[..., App], redis_client: aioredis.Redis
) -> None:
    async with make_app() as node:
        assert node.keyspace == keys.SINGLE
    assert not await redis_client.exists(keys.PARTITIONS)


@pytest.fixture
def one_master_evicting(redis_cluster: RedisClusterProcesses, cluster_url: str) -> Iterator[str]:
    """The last master may evict keys (allkeys-lru) for the test; put back after it."""
    master = redis_cluster.masters()[-1]
    with master.client() as client:
        client.config_set("maxmemory-policy", "allkeys-lru")
    try:
        yield master.address
    finally:
        with master.client() as client:
            client.config_set("maxmemory-policy", "noeviction")


async def test_every_master_must_keep_money(
    one_master_evicting: str, cluster_url: str, data_dir: Path, catalog: Catalog
) -> None:
    with pytest.raises(StartupError, match="maxmemory-policy allkeys-lru") as refused:
        async with cluster_app(cluster_url, data_dir, catalog, partitions=16):
            pass
    assert one_master_evicting in str(refused.value)


async def test_a_cluster_that_denies_info_is_still_told_by_cluster_info(
    redis_cluster: RedisClusterProcesses, cluster_url: str, data_dir: Path, catalog: Catalog
) -> None:
    # A managed cluster's ACL may deny INFO; CLUSTER INFO still tells it (one Redis errors).
    for node in redis_cluster.nodes:
        with node.client() as client:
            client.acl_setuser(
                "app", enabled=True, passwords=["+app-pw"], keys=["*"], commands=["+@all", "-info"]
            )
    try:
        url = cluster_url.replace("redis://", "redis://app:app-pw@")
        async with cluster_app(url, data_dir, catalog, partitions=16) as started:
            assert isinstance(started.redis, RedisCluster)
    finally:
        for node in redis_cluster.nodes:
            with node.client() as client:
                client.acl_deluser("app")


@pytest.mark.parametrize("broker", ["redis", "memory"])
async def test_rooms_of_two_partitions_on_a_cluster(
    broker: str, cluster_url: str, data_dir: Path, catalog: Catalog
) -> None:
    """The hub's multi-partition readers (live sets, records, creator_seen, the idle sweep,
    the registry's room count) and either broker's room writes each stay within a slot."""
    settings = dataclasses.replace(make_settings(cluster_url, data_dir, broker), partitions=16)
    async with App(settings, catalog) as node:
        assert node.keyspace.partition("cara") != node.keyspace.partition("dan")
        for creator in ("cara", "dan"):
            await node.hub.go_live(creator, f"{creator} live", 1_000)
            node.hub.creator_connected(creator)
        await node.hub.keep_creators_seen()
        assert await node.hub.end_idle_rooms() == 0
        assert await node.hub.restore() == 2
        assert (await node.registry.survey()).rooms == 2
        await node.hub.flush()
        await node.hub.end_live("dan")
        assert (await node.registry.survey()).rooms == 1
