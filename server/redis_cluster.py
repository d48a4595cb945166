"""Redis Cluster at start: told from the URL of any of its nodes, and its partition count.

A cluster node answers `INFO cluster` with `cluster_enabled:1`; then redis-py's asyncio
`RedisCluster` (slot routing, MOVED/ASK and failover are its own, never ours) reaches every
shard from that one URL. The partition count is fixed when the data is created: the first
start stores it (`giftstream:partitions`, SET NX) and a later start with another refuses.
One Redis never gets that key: it has one partition and exactly today's keys.

Every part of a node (hub, brokers, registry, ops log, admin, wallet) takes the one client the
app built, a plain `Redis` or a `RedisCluster`: `RedisClient` names that choice in one place.
"""

from __future__ import annotations

from typing import TypeAlias

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import ResponseError

from giftstream.server.money import keys

# The client every part of a node is given: one Redis's, or a cluster's (slots, MOVED/ASK
# and failover are redis-py's). Commands and scripts stay within one slot either way.
RedisClient: TypeAlias = aioredis.Redis | RedisCluster


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


# Connections the client may open to each node. Past it redis-py raises MaxConnectionsError
# rather than wait, so the money path keeps its own calls in flight below it
# (wallet.CLUSTER_CALLS_IN_FLIGHT) and this leaves room for the rest (rooms, crediting, API).
NODE_CONNECTIONS = 256


def cluster_client(url: str) -> RedisCluster:
    """A cluster client that finds every node from the URL of one."""
    return RedisCluster.from_url(url, max_connections=NODE_CONNECTIONS)


def masters(redis: RedisCluster) -> list[ClusterNode]:
    """The cluster's masters as the client last saw them (each holds money of its slots)."""
    return list(redis.get_primaries())


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
