"""Real ledger entries for the consumer, earnings, checkpoint and trimming tests, made by
server.wallet.Wallet (purchases, gifts to two creators over two UTC days, a refund, a payout),
and what the ledger alone says each creator earned."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis

from giftstream.server.ledger.earnings import earnings
from giftstream.server.ledger.entries import LedgerEntry, read_entries
from giftstream.server.money import keys
from giftstream.server.money.catalog import Economics, Gift, Package
from giftstream.server.money.wallet import Wallet
from tests.server.conftest import MoneyClock

DAY_MS = 24 * 3600 * 1000
DAY1_MS = 1_764_000_000_000  # 2025-11-24T16:00:00Z
DAY2_MS = DAY1_MS + DAY_MS
HEART = Gift(id="heart", name="Heart", coins=5, animation="heart.webp")
CASTLE = Gift(id="castle", name="Castle", coins=10_000, animation="castle.webp")
BIG = Package(id="coins_30000", coins=30_000, price_cents=29_999, currency="USD")
SMALL = Package(id="coins_70", coins=70, price_cents=99, currency="USD")
SENDERS = 5
CREATORS = ("cara", "dan")


class ClockedWallet(Wallet):
    """A Wallet on a money clock the workload moves over its two UTC days, without a payout
    hold (the hold's own tests are tests/security/test_payout_hold.py)."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.clock = MoneyClock(DAY1_MS)
        super().__init__(redis, Economics(), payout_hold_days=0, clock=self.clock)


async def new_wallet(redis: aioredis.Redis) -> ClockedWallet:
    wallet = ClockedWallet(redis)
    await wallet.load_scripts()
    return wallet


async def settle(
    wallet: ClockedWallet, gifts: int, *, prefix: str = "q", extras: bool = True
) -> int:
    """`gifts` heart gifts (counts 1-3) from five senders to two creators over two UTC days,
    after the senders' purchases; with `extras`, also a castle gift, a payout and a refund
    that leaves debt. Returns how many ledger entries it added."""
    added = 0

    async def buy(receipt: str, user: str, package: Package = BIG) -> None:
        nonlocal added
        wallet.clock.now_ms = DAY1_MS
        await wallet.purchase(receipt=f"{prefix}-{receipt}", user=user, package=package, adult=True)
        added += 1

    async def gift(i: int, sender: str, creator: str, gift: Gift, count: int, ts: int) -> None:
        nonlocal added
        wallet.clock.now_ms = ts
        await wallet.send_gift(
            sender=sender,
            adult=True,
            creator=creator,
            room=creator,
            gift=gift,
            count=count,
            key=f"{prefix}-gift-{i:06d}",
        )
        added += 1

    for s in range(SENDERS):
        await buy(f"rc-{s}", f"{prefix}s{s}")
    for i in range(gifts):
        day = DAY1_MS if i % 4 < 2 else DAY2_MS
        await gift(i, f"{prefix}s{i % SENDERS}", CREATORS[i % 2], HEART, 1 + i % 3, day + i)
    if extras:
        await buy("rc-castle", f"{prefix}whale")
        await gift(gifts, f"{prefix}whale", "cara", CASTLE, 3, DAY2_MS + gifts)
        wallet.clock.now_ms = DAY2_MS
        await wallet.payout(creator="cara", diamonds=10_000, key=f"{prefix}-payout-1")
        added += 1
        await buy("rc-refunded", f"{prefix}poor", SMALL)  # 70 coins, 65 spent, 65 owed after
        await gift(gifts + 1, f"{prefix}poor", "dan", HEART, 13, DAY2_MS + gifts + 1)
        wallet.clock.now_ms = DAY2_MS
        await wallet.refund(receipt=f"{prefix}-rc-refunded")
        added += 1
    return added


async def ledger(redis: aioredis.Redis, ledger_key: str = keys.LEDGER) -> list[LedgerEntry]:
    return [e async for e in read_entries(redis, ledger_key)]


def expected_earnings(
    entries: list[LedgerEntry], skip: frozenset[str] = frozenset()
) -> dict[tuple[str, str], dict[str, int]]:
    """(creator, UTC day) -> the sums the earnings consumer must reach, by the ledger alone."""
    sums: dict[tuple[str, str], Counter[str]] = {}
    for e in entries:
        if e.kind != "gift" or e.event in skip:
            continue
        day = sums.setdefault((e.data["creator"], keys.utc_day(e.ts)), Counter())
        day.update(
            diamonds=e.data["diamonds"], coins=e.data["coins"], gifts=e.data["count"], events=1
        )
    return {k: {n: v[n] for n in ("diamonds", "coins", "gifts", "events")} for k, v in sums.items()}


async def stored_earnings(
    redis: aioredis.Redis, days: list[tuple[str, str]]
) -> dict[tuple[str, str], dict[str, int]]:
    stored = {}
    for creator, day in days:
        totals = await earnings(redis, creator, day)
        stored[(creator, day)] = {n: totals[n] for n in ("diamonds", "coins", "gifts", "events")}
    return stored


async def until(
    check: Callable[[], Awaitable[bool]], timeout: float = 10.0, what: str = "condition"
) -> None:
    """Poll `check` until it holds; fail after `timeout` seconds (no unbounded waits)."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not hold within {timeout}s")
        await asyncio.sleep(0.02)


def text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
