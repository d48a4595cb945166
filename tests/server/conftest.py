"""Money-path fixtures: a Wallet on the flushed test Redis, a way to give a user coins, and a
snapshot of every key so a refused movement can be shown to have changed nothing."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from giftstream.server.metrics import Metrics
from giftstream.server.money.catalog import Economics, Package
from giftstream.server.money.wallet import PurchaseResult, Wallet

NOW_MS = 1_764_000_000_000  # 2025-11-24T16:00:00Z: a fixed clock the tests move by hand

Fund = Callable[..., Awaitable[PurchaseResult]]
Snapshot = Callable[[], Awaitable[dict[bytes, Any]]]


@pytest.fixture
def wallet_metrics() -> Metrics:
    return Metrics()


@pytest.fixture
async def wallet(redis_client: aioredis.Redis, wallet_metrics: Metrics) -> AsyncIterator[Wallet]:
    """A Wallet with the default economics: half to the creator, payouts from 10000."""
    money = Wallet(redis_client, Economics(), metrics=wallet_metrics)
    await money.load_scripts()
    yield money
    await money.drain()


@pytest.fixture
def fund_coins(wallet: Wallet) -> Fund:
    """`await fund_coins(user, coins)`: a purchase of exactly that many coins."""
    receipts = itertools.count(1)

    async def fund(user: str, coins: int, *, now_ms: int = NOW_MS) -> PurchaseResult:
        package = Package(id=f"pack_{coins}", coins=coins, price_cents=coins, currency="USD")
        return await wallet.purchase(
            receipt=f"fund-{user}-{next(receipts)}",
            user=user,
            package=package,
            adult=True,
            now_ms=now_ms,
        )

    return fund


@pytest.fixture
def redis_snapshot(redis_client: aioredis.Redis) -> Snapshot:
    """Every key with its value: wallets, key records, spend counters, combos, the ledger."""

    async def snapshot() -> dict[bytes, Any]:
        state: dict[bytes, Any] = {}
        async for key in redis_client.scan_iter(count=1000):
            kind = await redis_client.type(key)
            kind = kind.decode() if isinstance(kind, bytes) else kind
            if kind == "hash":
                state[key] = await redis_client.hgetall(key)
            elif kind == "string":
                state[key] = await redis_client.get(key)
            elif kind == "stream":
                state[key] = await redis_client.xrange(key)
            else:
                state[key] = kind
        return state

    return snapshot
