"""The ledger read back: entries in order, a page at a time from any start, and a bad entry
refused by name."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from giftstream.server.ledger.entries import LedgerError, read_entries
from giftstream.server.money import keys
from giftstream.server.money.wallet import Wallet
from tests.server.conftest import NOW_MS, Fund


async def test_read_entries_pages_in_order_from_any_start(
    wallet: Wallet, fund_coins: Fund, redis_client: aioredis.Redis
) -> None:
    for i in range(25):
        await fund_coins(f"user{i}", 1 + i)
    entries = [e async for e in read_entries(redis_client, count=10)]
    assert [e.data["coins"] for e in entries] == list(range(1, 26))
    assert all(e.kind == "purchase" and e.ts == NOW_MS for e in entries)
    tail = [e async for e in read_entries(redis_client, keys.LEDGER, start=entries[12].id, count=4)]
    assert [e.event for e in tail] == [e.event for e in entries[12:]]


async def test_read_entries_refuses_a_bad_entry(redis_client: aioredis.Redis) -> None:
    await redis_client.xadd(keys.LEDGER, {"data": b"[1, 2]"})
    with pytest.raises(LedgerError, match="not a JSON object"):
        [e async for e in read_entries(redis_client)]
