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
from tests.helpers import CLOCK_KEYS

NOW_MS = 1_764_000_000_000  # 2025-11-24T16:00:00Z: a fixed clock the tests move by hand

Fund = Callable[..., Awaitable[PurchaseResult]]
Snapshot = Callable[[], Awaitable[dict[bytes, Any]]]


class MoneyClock:
    """The money path's time in a test, moved by hand: `Wallet(clock=...)` makes every script
    take it instead of Redis's TIME (which a test cannot move). Production Wallets have none."""

    def __init__(self, now_ms: int = NOW_MS) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms


@pytest.fixture
def money_clock() -> MoneyClock:
    return MoneyClock()


@pytest.fixture
def wallet_metrics() -> Metrics:
    return Metrics()


@pytest.fixture
async def wallet(
    redis_client: aioredis.Redis, wallet_metrics: Metrics, money_clock: MoneyClock
) -> AsyncIterator[Wallet]:
    """A Wallet with the default economics (half to the creator, payouts from 10000) on the
    test's money clock, and no payout hold: the hold's own tests set one."""
    money = Wallet(
        redis_client, Economics(), metrics=wallet_metrics, payout_hold_days=0, clock=money_clock
    )
    await money.load_scripts()
    yield money
    await money.drain()


@pytest.fixture
def fund_coins(wallet: Wallet) -> Fund:
    """`await fund_coins(user, coins)`: a purchase of exactly that many coins."""
    receipts = itertools.count(1)

    async def fund(user: str, coins: int) -> PurchaseResult:
        package = Package(id=f"pack_{coins}", coins=coins, price_cents=coins, currency="USD")
        return await wallet.purchase(
            receipt=f"fund-{user}-{next(receipts)}", user=user, package=package, adult=True
        )

    return fund


@pytest.fixture
def redis_snapshot(redis_client: aioredis.Redis) -> Snapshot:
    """Every key with its value: wallets, key records, spend counters, combos, the ledger."""

    async def snapshot() -> dict[bytes, Any]:
        state: dict[bytes, Any] = {}
        async for key in redis_client.scan_iter(count=1000):
            if key.decode() in CLOCK_KEYS:  # a running server's heartbeat
                continue
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
