"""Redis Cluster at start: told from the URL of any of its nodes, and its partition count.

A cluster node answers `INFO cluster` with `cluster_enabled:1`; then redis-py's asyncio
`RedisCluster` (slot routing, MOVED/ASK and failover are its own, never ours) reaches every
shard from that one URL. The partition count is fixed when the data is created: the first
start stores it (`giftstream:partitions`, SET NX) and a later start with another refuses.
One Redis never gets that key: it has one partition and exactly today's keys.
"""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from giftstream.server.money import keys

# What is not cluster-ready yet (issue 14), said in the one line a refused start prints.
NOT_YET = (
    "Redis Cluster: not yet supported for the money path (a gift's sender and creator "
    "wallets sit on different shards; issue 14) nor for the Redis broker's room scripts: "
    "use one Redis for now"
)


class PartitionsMismatch(ValueError):
    """The cluster's data was created with another partition count; the message says both."""


async def is_cluster(redis: aioredis.Redis) -> bool:
    """Whether the Redis behind this (plain) client is a node of a Redis Cluster. A managed
    Redis may deny INFO (an ACL): then CLUSTER INFO, which one Redis answers with an error;
    if both are denied it is taken for one Redis, as before clusters were known."""
    try:
        info = await redis.info("cluster")
        return int(info.get("cluster_enabled", 0)) == 1
    except ResponseError:
        pass
    try:
        await redis.cluster("info")
    except ResponseError:
        return False  # "cluster support disabled", or CLUSTER denied too
    return True


def cluster_client(url: str) -> RedisCluster:
    """A cluster client that finds every node from the URL of one."""
    return RedisCluster.from_url(url)


async def claim_partitions(redis: RedisCluster, wanted: int) -> int:
    """The cluster data's partition count: `wanted` if this start creates it, else the stored
    one, which must equal `wanted` (PartitionsMismatch: moving wallets is not done here)."""
    await redis.set(keys.PARTITIONS, str(wanted), nx=True)
    stored = await redis.get(keys.PARTITIONS)
    count = int(keys.text(stored)) if stored is not None else wanted
    if count != wanted:
        raise PartitionsMismatch(
            f"Redis Cluster: its data has {count} partitions ({keys.PARTITIONS}), not the "
            f"{wanted} asked (--partitions, GIFTSTREAM_PARTITIONS): start with --partitions "
            f"{count}"
        )
    return count
