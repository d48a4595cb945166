"""The relays' fair shares: the pure rule, and the heartbeats on a real Redis Cluster (a relay
killed without a word drops out when its heartbeat expires, one stopping cleanly at once)."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio.cluster import RedisCluster

from giftstream.server.ledger.relay.share import Share, fair_share, live_relays
from giftstream.server.money import keys

SPACE = keys.KeySpace(partitions=16, cluster=True)


def test_shares_add_up_to_the_ledgers_and_differ_by_one_at_most() -> None:
    assert [fair_share(16, ["a", "b", "c"], me) for me in "abc"] == [6, 5, 5]
    assert [fair_share(16, ["b", "a"], me) for me in "ab"] == [8, 8]
    assert fair_share(16, ["a"], "a") == 16
    assert fair_share(16, ["a", "b"], "c") == 0  # not seen alive yet: takes nothing
    for ledgers in (1, 2, 7, 16, 100):
        for n in range(1, 20):
            relays = [f"r{i:02d}" for i in range(n)]
            shares = [fair_share(ledgers, relays, me) for me in relays]
            assert sum(shares) == ledgers
            assert max(shares) == math.ceil(ledgers / n) and max(shares) - min(shares) <= 1


def test_keys_of_the_relays_hash() -> None:
    assert SPACE.relays() == keys.SINGLE.relays() == "giftstream:relays" == keys.RELAYS
    assert keys.KeySpace(ledger_key="other:ledger").relays() == "giftstream:relays:other:ledger"


@pytest.fixture
async def cluster(cluster_url: str) -> AsyncIterator[RedisCluster]:
    client = RedisCluster.from_url(cluster_url)
    yield client
    await client.aclose()


async def test_a_share_counts_what_its_relays_hold(cluster: RedisCluster) -> None:
    """Each Relay of a process asks before taking and between batches; neither awaits, so
    together they never hold more than the share."""
    one = Share(cluster, SPACE.relays(), "a", 16, 60_000)
    await one.beat()
    ledgers = SPACE.ledgers()
    assert [one.reserve(ledger) for ledger in ledgers] == [True] * 16  # alone: every ledger
    two = Share(cluster, SPACE.relays(), "b", 16, 60_000)
    await two.beat()
    await one.beat()
    assert (one.quota, two.quota, one.live) == (8, 8, ("a", "b"))
    given = [ledger for ledger in ledgers if one.give_up(ledger)]
    assert given == ledgers[:8] and one.held == set(ledgers[8:])
    assert not one.give_up(ledgers[8]) and not one.reserve(ledgers[0])
    assert [two.reserve(ledger) for ledger in given] == [True] * 8
    assert not two.reserve(ledgers[8])
    one.drop(ledgers[8])
    assert one.reserve(ledgers[0])


async def test_a_silent_relay_drops_out_and_a_stopped_one_at_once(cluster: RedisCluster) -> None:
    short = Share(cluster, SPACE.relays(), "short", 16, 300)
    long = Share(cluster, SPACE.relays(), "long", 16, 60_000)
    gone = Share(cluster, SPACE.relays(), "gone", 16, 60_000)
    for share in (short, long, gone):
        await share.beat()
    _, alive = await live_relays(cluster, SPACE.relays())
    assert sorted(alive) == ["gone", "long", "short"]
    await gone.leave()
    deadline = time.monotonic() + 30
    while "short" in (await live_relays(cluster, SPACE.relays()))[1]:
        assert time.monotonic() < deadline, "an expired heartbeat still counts"
        await asyncio.sleep(0.05)
    await long.beat()  # and the next beat deletes the expired field
    assert long.live == ("long",) and long.quota == 16
    assert await cluster.hkeys(SPACE.relays()) == [b"long"]
