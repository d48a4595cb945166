"""`giftstream relay --status`: the relay's lag and its lease holder, as data to print."""

from __future__ import annotations

import logging
from typing import Any

from redis.exceptions import RedisError

from giftstream.server.config import redact_url
from giftstream.server.ledger.connect import NoPartitions, open_ledger_redis
from giftstream.server.ledger.lease import Holder, lease_holder
from giftstream.server.ledger.relay.config import lease_key
from giftstream.server.ledger.relay.lag import relay_lag
from giftstream.server.ledger.relay.share import live_relays
from giftstream.server.money import keys
from giftstream.server.redis_cluster import RedisClient

log = logging.getLogger(__name__)


async def relay_status(redis: RedisClient, ledger_key: str = keys.LEDGER) -> dict[str, Any]:
    """The relay's lag, and who holds the relay lease (None: no relay runs, or one is
    waiting to take it) with its TTL left."""
    lag = await relay_lag(redis, ledger_key)
    holder: Holder | None = await lease_holder(redis, lease_key(ledger_key))
    return {**lag.as_dict(), "lease": holder.as_dict() if holder else None}


async def relays_status(
    redis: RedisClient, key: str, ledgers: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Each relay process (alive by its heartbeat, or holding a lease without one): how long
    its heartbeat has left (None: none) and the ledgers whose leases it holds."""
    now, alive = await live_relays(redis, key)
    relays: dict[str, dict[str, Any]] = {
        relay: {"ttl_ms": max(0, expires - now), "ledgers": []}
        for relay, expires in sorted(alive.items())
    }
    for ledger, status in ledgers.items():
        if status["lease"] is not None:
            holder = relays.setdefault(status["lease"]["holder"], {"ttl_ms": None, "ledgers": []})
            holder["ledgers"].append(ledger)
    return relays


async def read_status(redis_url: str, ledger_key: str) -> dict[str, Any] | None:
    """relay_status of the Redis at `redis_url`; None, logged, when it cannot be reached. On a
    Redis Cluster: every partition's ledger's under `ledgers`, with the summed lag, and which
    relay holds which ledger under `relays`."""
    try:
        client, keyspace = await open_ledger_redis(redis_url, ledger_key)
    except (RedisError, OSError, NoPartitions) as exc:
        log.error("cannot reach Redis at %s: %s", redact_url(redis_url), exc)
        return None
    try:
        ledgers = keyspace.ledgers()
        if len(ledgers) == 1:
            return await relay_status(client, ledgers[0])
        each = {ledger: await relay_status(client, ledger) for ledger in ledgers}
        return {
            "entries": sum(status["entries"] for status in each.values()),
            "oldest_age_s": max(status["oldest_age_s"] for status in each.values()),
            "leases_held": sum(status["lease"] is not None for status in each.values()),
            "relays": await relays_status(client, keyspace.relays(), each),
            "ledgers": each,
        }
    except (RedisError, OSError) as exc:
        log.error("cannot reach Redis at %s: %s", redact_url(redis_url), exc)
        return None
    finally:
        await client.aclose()
