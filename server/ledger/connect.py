"""How the downstream commands (audit, consume, relay, trim, the load test's check) reach the
ledger: one Redis as before, or, given the URL of any node of a Redis Cluster, the cluster
through redis-py's RedisCluster with the partition count its data was created with.

They never set the partition count (`giftstream serve` does, at the data's first start):
a cluster without it holds no giftstream data yet, and a tool guessing a count there could
read the wrong ledgers for good.
"""

from __future__ import annotations

import redis.asyncio as aioredis

from giftstream.server.money import keys
from giftstream.server.redis_cluster import RedisClient, cluster_client, is_cluster


class NoPartitions(RuntimeError):
    """A Redis Cluster whose data has no partition count yet: no gateway ever started on it."""


async def open_ledger_redis(
    url: str, ledger_key: str = keys.LEDGER
) -> tuple[RedisClient, keys.KeySpace]:
    """A client for `url` and the key space of its data: one Redis's, or the cluster's with
    its stored partition count (NoPartitions when there is none). The caller closes it."""
    plain = aioredis.Redis.from_url(url)
    try:
        cluster = await is_cluster(plain)
    finally:
        await plain.aclose()
    if not cluster:
        return aioredis.Redis.from_url(url), keys.KeySpace(ledger_key=ledger_key)
    client = cluster_client(url)
    try:
        stored = await client.get(keys.PARTITIONS)
    except BaseException:
        await client.aclose()
        raise
    if stored is None:
        await client.aclose()
        raise NoPartitions(
            f"a Redis Cluster with no {keys.PARTITIONS}: no giftstream data yet "
            "(`giftstream serve` sets the partition count at its first start)"
        )
    space = keys.KeySpace(ledger_key=ledger_key, partitions=int(keys.text(stored)), cluster=True)
    return client, space
