"""The start-up check's rule (refuse evicting, warn without AOF or without an answer), and
the embedded Redis passing it as configured."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from giftstream.server.redis_check import Assessment, RedisSettings, assess, read_settings

WHERE = "redis://127.0.0.1:6379/0"


@pytest.mark.parametrize(
    "policy", ["allkeys-lru", "allkeys-lfu", "allkeys-random", "volatile-lru", "volatile-ttl"]
)
def test_every_evicting_policy_is_refused(policy: str) -> None:
    found = assess(RedisSettings(maxmemory_policy=policy, appendonly=True), WHERE)
    assert found.refusal is not None and f"maxmemory-policy {policy}" in found.refusal
    assert "\n" not in found.refusal


def test_noeviction_with_aof_is_quiet() -> None:
    assert assess(RedisSettings("noeviction", True), WHERE) == Assessment(None, ())


def test_no_aof_or_no_answer_warns() -> None:
    no_aof = assess(RedisSettings("noeviction", False), WHERE)
    assert no_aof.refusal is None and len(no_aof.warnings) == 1
    assert "appendonly no" in no_aof.warnings[0]
    silent = assess(RedisSettings(None, None), WHERE)
    assert silent.refusal is None and len(silent.warnings) == 1
    assert "cannot read the maxmemory-policy" in silent.warnings[0]


async def test_the_embedded_redis_passes(redis_client: aioredis.Redis) -> None:
    """The fixture's Redis is an EmbeddedRedis, started as `serve` starts its own."""
    found = await read_settings(redis_client)
    assert found == RedisSettings(
        maxmemory_policy="noeviction", appendonly=True, appendfsync="everysec"
    )
    assert assess(found, WHERE) == Assessment(None, ())
