"""Whether a Redis is safe to hold money, asked once at start (PROTOCOL.md §5 r2).

A Redis that may evict keys under memory pressure (any `maxmemory-policy` but `noeviction`)
can drop a wallet or an idempotency record: a coin would vanish, or a retried gift would be
debited twice. The server refuses such a Redis. One that keeps no AOF loses the last
acknowledged movements when it restarts: the server warns and goes on (a replica or RDB
snapshots may be the operator's choice). Managed Redis often renames or denies CONFIG: then
INFO tells, and when neither does the server warns and goes on. On a Redis Cluster every
master holds money of its slots, so each is read and judged (`read_cluster_settings`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from giftstream.server.redis_cluster import RedisClient, masters

__all__ = [
    "NOEVICTION",
    "Assessment",
    "RedisSettings",
    "assess",
    "durable_ack_refusal",
    "has_waitaof",
    "read_cluster_settings",
    "read_settings",
]

NOEVICTION = "noeviction"


@dataclass(frozen=True, slots=True)
class RedisSettings:
    """What a Redis told about itself; None where it would not say."""

    maxmemory_policy: str | None
    appendonly: bool | None
    appendfsync: str | None = None  # always / everysec / no; None: would not say


@dataclass(frozen=True, slots=True)
class Assessment:
    """`refusal`: the one line that stops start-up, or None; `warnings`: lines to log."""

    refusal: str | None
    warnings: tuple[str, ...]


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def _config_get(redis: RedisClient, name: str, **target: Any) -> str | None:
    """One CONFIG GET value, or None where CONFIG is renamed, denied or does not know it.
    `target`: a cluster client's `target_nodes`, so the one node asked answers alone."""
    try:
        found = await redis.config_get(name, **target)
    except ResponseError:  # unknown command (renamed), NOPERM (ACL)
        return None
    for key, value in found.items():
        if _text(key) == name:
            return _text(value)
    return None


async def _info(redis: RedisClient, section: str, **target: Any) -> dict[str, object]:
    try:
        info: dict[str, object] = await redis.info(section, **target)
    except ResponseError:
        return {}
    return info


async def read_settings(redis: RedisClient, **target: Any) -> RedisSettings:
    """The eviction policy and AOF setting: CONFIG GET, else INFO memory / persistence."""
    policy = await _config_get(redis, "maxmemory-policy", **target)
    if policy is None:
        found = (await _info(redis, "memory", **target)).get("maxmemory_policy")
        policy = None if found is None else _text(found)
    appendonly_text = await _config_get(redis, "appendonly", **target)
    appendonly: bool | None
    if appendonly_text is not None:
        appendonly = appendonly_text == "yes"
    else:
        enabled = (await _info(redis, "persistence", **target)).get("aof_enabled")
        appendonly = None if enabled is None else _text(enabled) == "1"
    return RedisSettings(
        maxmemory_policy=policy,
        appendonly=appendonly,
        appendfsync=await _config_get(redis, "appendfsync", **target),
    )


async def has_waitaof(redis: aioredis.Redis) -> bool:
    """Whether this Redis knows WAITAOF (7.2 and later); asked with nothing to wait for."""
    try:
        await redis.execute_command("WAITAOF", 0, 0, 1)  # type: ignore[no-untyped-call]
    except ResponseError as exc:
        if "unknown command" in str(exc).lower():
            return False
        raise
    return True


async def read_cluster_settings(redis: RedisCluster) -> dict[str, RedisSettings]:
    """Each master's settings, by its host:port: a master that may evict or keeps no AOF
    risks the money of its slots as one Redis would all of it."""
    found: dict[str, RedisSettings] = {}
    for node in masters(redis):
        found[node.name] = await read_settings(redis, target_nodes=node)
    return found


def assess(found: RedisSettings, where: str) -> Assessment:
    """Refuse an evicting Redis; warn of one without AOF, or one that would not say."""
    warnings: list[str] = []
    policy = found.maxmemory_policy
    if policy is None:
        warnings.append(
            f"cannot read the maxmemory-policy of Redis at {where} (CONFIG and INFO denied): "
            f"make sure it is {NOEVICTION}, or an evicted wallet or idempotency record would "
            "lose or double money"
        )
    elif policy != NOEVICTION:
        return Assessment(
            refusal=(
                f"Redis at {where} has maxmemory-policy {policy}: it may evict a wallet or an "
                f"idempotency record and lose or double money; set maxmemory-policy {NOEVICTION}"
            ),
            warnings=(),
        )
    if found.appendonly is False:
        warnings.append(
            f"Redis at {where} keeps no AOF (appendonly no): a Redis restart loses the money "
            "movements since its last snapshot; set appendonly yes"
        )
    return Assessment(refusal=None, warnings=tuple(warnings))


def durable_ack_refusal(found: RedisSettings, where: str, waitaof: bool) -> str | None:
    """--durable-ack on one Redis: a gift is answered once the AOF holding it is fsynced,
    by WAITAOF (Redis 7.2+) or, on an older Redis, by `appendfsync always` (which fsyncs
    before every reply). The one line that stops start-up, or None."""
    if found.appendonly is not True:
        said = "keeps no AOF (appendonly no)" if found.appendonly is False else "would not say"
        return (
            f"--durable-ack / GIFTSTREAM_DURABLE_ACK needs a Redis with AOF, and Redis at "
            f"{where} {said}: set appendonly yes, or start without --durable-ack"
        )
    if not waitaof and found.appendfsync != "always":
        return (
            f"--durable-ack / GIFTSTREAM_DURABLE_ACK needs WAITAOF (Redis 7.2+) or appendfsync "
            f"always, and Redis at {where} has neither: upgrade Redis, set appendfsync always, "
            "or start without --durable-ack"
        )
    return None
