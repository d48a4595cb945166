"""`giftstream relay --status`: the relay's lag and its lease holder, as data to print."""

from __future__ import annotations

import logging
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from giftstream.server.config import redact_url
from giftstream.server.ledger.connect import AnyRedis
from giftstream.server.ledger.lease import Holder, lease_holder
from giftstream.server.ledger.relay.config import lease_key
from giftstream.server.ledger.relay.lag import relay_lag
from giftstream.server.money import keys

log = logging.getLogger(__name__)


async def relay_status(redis: AnyRedis, ledger_key: str = keys.LEDGER) -> dict[str, Any]:
    """The relay's lag, and who holds the relay lease (None: no relay runs, or one is
    waiting to take it) with its TTL left."""
    lag = await relay_lag(redis, ledger_key)
    holder: Holder | None = await lease_holder(redis, lease_key(ledger_key))
    return {**lag.as_dict(), "lease": holder.as_dict() if holder else None}


async def read_status(redis_url: str, ledger_key: str) -> dict[str, Any] | None:
    """relay_status of the Redis at `redis_url`; None, logged, when it cannot be reached."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        return await relay_status(client, ledger_key)
    except (RedisError, OSError) as exc:
        log.error("cannot reach Redis at %s: %s", redact_url(redis_url), exc)
        return None
    finally:
        await client.aclose()
