"""The earnings consumer: per creator and UTC day of the gift, exactly once per event id,
also for an entry from long ago, and nothing half-written when a total is corrupt."""

from __future__ import annotations

import time

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from giftstream.server.ledger.earnings import (
    SEEN_KEEP_MS,
    EarningsConsumer,
    earnings,
)
from giftstream.server.ledger.entries import LedgerEntry
from giftstream.server.money import keys
from tests.server.ledger.ledger_workload import (
    DAY1_MS,
    expected_earnings,
    ledger,
    new_wallet,
    settle,
    stored_earnings,
)


async def test_each_gift_counts_once_on_its_creators_day(redis_client: aioredis.Redis) -> None:
    await settle(await new_wallet(redis_client), 12)
    entries = await ledger(redis_client)
    consumer = EarningsConsumer(redis_client)
    for entry in entries + entries[::-1]:  # everything delivered twice, in both orders
        await consumer(entry)
    gifts = [e for e in entries if e.kind == "gift"]
    assert (consumer.counted, consumer.duplicates) == (len(gifts), len(gifts))
    expected = expected_earnings(entries)
    assert {day for _, day in expected} == {"2025-11-24", "2025-11-25"}
    assert await stored_earnings(redis_client, list(expected)) == expected
    assert expected[("cara", "2025-11-25")]["diamonds"] >= 15_000  # the castle
    assert await earnings(redis_client, "cara", "2025-11-23") == {
        "creator": "cara",
        "day": "2025-11-23",
        "diamonds": 0,
        "coins": 0,
        "gifts": 0,
        "events": 0,
    }
    with pytest.raises(ValueError):
        await earnings(redis_client, "cara", "yesterday")


async def test_seen_sets_expire_after_their_day_even_for_old_entries(
    redis_client: aioredis.Redis,
) -> None:
    await settle(await new_wallet(redis_client), 2, extras=False)
    gift = next(e for e in await ledger(redis_client) if e.kind == "gift")
    consumer = EarningsConsumer(redis_client)
    assert await consumer.apply(gift)
    ttl = await redis_client.pttl(keys.SINGLE.earnings_seen(gift.data["creator"], "2025-11-24"))
    assert SEEN_KEEP_MS - 60_000 < ttl <= SEEN_KEEP_MS  # the day is long past: from now

    # an entry from years ago, consumed for the first time (a new group reading from 0)
    old = LedgerEntry("1000-0", {**gift.data, "event": "old-event", "ts": DAY1_MS - 10**11})
    assert await consumer.apply(old) and not await consumer.apply(old)
    old_day = time.strftime("%Y-%m-%d", time.gmtime(old.ts // 1000))
    assert (
        await redis_client.pttl(keys.SINGLE.earnings_seen(gift.data["creator"], old_day))
        > SEEN_KEEP_MS - 60_000
    )


async def test_a_corrupt_total_stops_before_the_event_is_marked_seen(
    redis_client: aioredis.Redis,
) -> None:
    await settle(await new_wallet(redis_client), 1, extras=False)
    gift = next(e for e in await ledger(redis_client) if e.kind == "gift")
    creator = gift.data["creator"]
    await redis_client.hset(keys.SINGLE.earnings(creator), "2025-11-24:coins", "1e3")
    with pytest.raises(ResponseError, match="not an exact integer"):
        await EarningsConsumer(redis_client).apply(gift)
    assert not await redis_client.exists(keys.SINGLE.earnings_seen(creator, "2025-11-24"))
    await redis_client.hset(keys.SINGLE.earnings(creator), "2025-11-24:coins", "0")
    assert await EarningsConsumer(redis_client).apply(gift)  # the retry counts it


async def test_other_kinds_are_ignored(redis_client: aioredis.Redis) -> None:
    await settle(await new_wallet(redis_client), 0)
    consumer = EarningsConsumer(redis_client)
    for entry in await ledger(redis_client):
        if entry.kind != "gift":
            assert not await consumer.apply(entry)
    assert consumer.counted == consumer.duplicates == 0
