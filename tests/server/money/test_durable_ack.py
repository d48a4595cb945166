"""--durable-ack on one Redis (WAITAOF after a marker on the same connection), its flag and
variable, and the refusal of a Redis without AOF. The cluster's WAIT is in
test_cluster_gifts.py."""

from __future__ import annotations

import argparse

import pytest
import redis.asyncio as aioredis

from giftstream.server.config import ConfigError, add_options, build_settings, resolve
from giftstream.server.metrics import Metrics
from giftstream.server.money import keys
from giftstream.server.money.catalog import Economics, Gift
from giftstream.server.money.wallet import Wallet
from giftstream.server.redis_check import RedisSettings, durable_ack_refusal, has_waitaof

ROSE = Gift(id="rose", name="Rose", coins=5, animation="petals")


async def test_a_durable_gift_waits_for_the_aof_fsync(redis_client: aioredis.Redis) -> None:
    metrics = Metrics()
    durable = Wallet(redis_client, Economics(), metrics=metrics, durable_ack=True)
    await durable.load_scripts()
    await redis_client.hset(keys.SINGLE.wallet("ann"), "coins", 100)
    settled = await durable.send_gift(
        sender="ann",
        adult=True,
        creator="cara",
        room="cara",
        gift=ROSE,
        count=2,
        key="durable-key-1",
    )
    assert settled.coins == 90
    # the marker is written either way; WAITAOF then waits for it (Redis 7.2+) or, on an
    # older Redis, is found unknown once (its start needs appendfsync always instead)
    assert await redis_client.get(keys.SINGLE.durable_ack_marker()) == b"1"
    assert durable._waitaof is await has_waitaof(redis_client)
    assert metrics.durable_ack_short._value.get() == 0
    assert await redis_client.hget(keys.SINGLE.wallet("cara"), "diamonds") == b"5"
    await durable.drain()


def parse(argv: list[str], env: dict[str, str]) -> bool:
    parser = argparse.ArgumentParser()
    add_options(parser, only=("--durable-ack",))
    values = resolve(parser.parse_args(argv), env)
    return build_settings({**values, "jwt_secret": "s", "webhook_secret": "w"}).durable_ack


def test_the_flag_and_its_variable() -> None:
    assert parse([], {}) is False
    assert parse(["--durable-ack"], {}) is True
    assert parse([], {"GIFTSTREAM_DURABLE_ACK": "1"}) is True
    assert parse([], {"GIFTSTREAM_DURABLE_ACK": "off"}) is False
    with pytest.raises(ConfigError, match="GIFTSTREAM_DURABLE_ACK"):
        parse([], {"GIFTSTREAM_DURABLE_ACK": "maybe"})


def test_a_redis_without_aof_or_a_way_to_wait_for_it_is_refused() -> None:
    aof = RedisSettings("noeviction", appendonly=True, appendfsync="everysec")
    assert durable_ack_refusal(aof, "x", waitaof=True) is None
    refusal = durable_ack_refusal(aof, "x", waitaof=False)  # Redis < 7.2
    assert refusal is not None and "appendfsync always" in refusal
    always = RedisSettings("noeviction", appendonly=True, appendfsync="always")
    assert durable_ack_refusal(always, "x", waitaof=False) is None
    for appendonly in (False, None):
        refusal = durable_ack_refusal(RedisSettings("noeviction", appendonly), "x", True)
        assert refusal is not None and "appendonly yes" in refusal
