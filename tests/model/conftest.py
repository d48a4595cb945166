"""Fixtures for the refusal tests of tests/model: a Wallet on the flushed test Redis, the
scripts loaded for raw EVALSHA calls, and a snapshot of everything a script could change
(every key, plus each stream's consumer groups and pending entries, which XRANGE does not
show) so a refused or failed call can be shown to have written nothing at all."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from giftstream.server.money.catalog import Economics, Package
from giftstream.server.money.wallet import PurchaseResult, Wallet
from giftstream.server.scripts import script_source
from tests.model.keyspace import Snapshot, snapshot
from tests.server.conftest import MoneyClock

SCRIPT_NAMES = (
    "send_gift",
    "purchase",
    "refund",
    "payout",
    "earnings",
    "checkpoint",
    "dead_letter",
)

State = tuple[Snapshot, dict[str, Any]]
Everything = Callable[[], Awaitable[State]]
Eval = Callable[[str, list[str], list[Any]], Awaitable[Any]]


async def everything(redis: aioredis.Redis) -> State:
    """The whole keyspace, and for each stream its groups with their pending entries."""
    keyspace = await snapshot(redis)
    groups: dict[str, Any] = {}
    for name, (kind, _, _) in keyspace.items():
        if kind != "stream":
            continue
        for info in await redis.xinfo_groups(name):
            group = info["name"].decode()
            pending = await redis.xpending_range(name, group, min="-", max="+", count=1000)
            groups[f"{name} {group}"] = (
                info["last-delivered-id"],
                [(p["message_id"], p["consumer"], p["times_delivered"]) for p in pending],
            )
    return keyspace, groups


@pytest.fixture
def state(redis_client: aioredis.Redis) -> Everything:
    return lambda: everything(redis_client)


@pytest.fixture
async def money(redis_client: aioredis.Redis) -> AsyncIterator[Wallet]:
    """A Wallet with the default economics (half to the creator, payouts from 10000), on a
    money clock at NOW_MS, without a payout hold."""
    wallet = Wallet(redis_client, Economics(), payout_hold_days=0, clock=MoneyClock())
    await wallet.load_scripts()
    yield wallet
    await wallet.drain()


async def fund(money: Wallet, user: str, coins: int, receipt: str | None = None) -> PurchaseResult:
    """A real purchase of exactly `coins` coins."""
    return await money.purchase(
        receipt=receipt or f"fund-{user}-{coins}",
        user=user,
        package=Package(id=f"pack_{coins}", coins=coins, price_cents=coins, currency="USD"),
        adult=True,
    )


@pytest.fixture
async def evalsha(redis_client: aioredis.Redis) -> Eval:
    """`await evalsha(script, keys, args)`: the script exactly as wallet.py loads it, called
    raw, as a buggy caller bypassing wallet.py would."""
    shas = {name: await redis_client.script_load(script_source(name)) for name in SCRIPT_NAMES}

    async def call(name: str, script_keys: list[str], args: list[Any]) -> Any:
        return await redis_client.evalsha(shas[name], len(script_keys), *script_keys, *args)

    return call
