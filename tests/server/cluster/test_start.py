"""`giftstream serve` on a Redis Cluster node: it reaches the whole cluster, fixes the data's
partition count at the first start, and (the money path not being cluster-ready yet) refuses
with one clear line instead of dying later on a MovedError. One Redis gets no such key."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from giftstream.server.app import App, StartupError
from giftstream.server.money import keys
from giftstream.server.money.catalog import Catalog
from giftstream.server.redis_cluster import NOT_YET
from tests.cluster import RedisClusterProcesses
from tests.conftest import JWT_SECRET, WEBHOOK_SECRET, make_settings
from tests.processes import run_cli


def cluster_app(url: str, data_dir: Path, catalog: Catalog, partitions: int) -> App:
    return App(dataclasses.replace(make_settings(url, data_dir), partitions=partitions), catalog)


async def stored_partitions(url: str) -> bytes | str | None:
    client = RedisCluster.from_url(url)
    try:
        value: bytes | str | None = await client.get(keys.PARTITIONS)
        return value
    finally:
        await client.aclose()


def test_serve_on_a_cluster_node_refuses_in_one_line(cluster_url: str, data_dir: Path) -> None:
    done = run_cli(
        "serve",
        "--redis-url",
        cluster_url,
        "--port",
        "0",
        "--admin-port",
        "0",
        "--data-dir",
        str(data_dir),
        "--jwt-secret",
        JWT_SECRET,
        "--webhook-secret",
        WEBHOOK_SECRET,
        timeout=120,
    )
    assert done.returncode != 0
    assert NOT_YET in done.stderr
    assert "Traceback" not in done.stderr and "MovedError" not in done.stderr


async def test_the_first_start_fixes_the_partition_count(
    cluster_url: str, data_dir: Path, catalog: Catalog
) -> None:
    with pytest.raises(StartupError, match="not yet supported"):
        async with cluster_app(cluster_url, data_dir, catalog, partitions=8):
            pass
    assert await stored_partitions(cluster_url) == b"8"

    with pytest.raises(StartupError, match=r"has 8 partitions .* not the 4 asked"):
        async with cluster_app(cluster_url, data_dir, catalog, partitions=4):
            pass
    assert await stored_partitions(cluster_url) == b"8"  # never rewritten


async def test_one_redis_gets_no_partitions_key(
    make_app: Callable[..., App], redis_client: aioredis.Redis
) -> None:
    async with make_app():
        pass
    assert not await redis_client.exists(keys.PARTITIONS)


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
        with pytest.raises(StartupError, match="not yet supported"):
            async with cluster_app(url, data_dir, catalog, partitions=16):
                pass
    finally:
        for node in redis_cluster.nodes:
            with node.client() as client:
                client.acl_deluser("app")
