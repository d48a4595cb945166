"""The audit: replaying the ledger from empty reproduces every wallet after a mixed
workload, and any wallet or entry changed behind the scripts' back is named."""

from __future__ import annotations

import orjson
import pytest
import redis.asyncio as aioredis

from giftstream.server.ledger.audit import audit
from giftstream.server.ledger.entries import read_entries
from giftstream.server.money import keys
from giftstream.server.money.catalog import Economics, Gift, Package
from giftstream.server.money.refusal import Refusal
from giftstream.server.money.wallet import Wallet
from tests.server.conftest import NOW_MS, Fund

HEART = Gift(id="heart", name="Heart", coins=5, animation="heart.webp")
CASTLE = Gift(id="castle", name="Castle", coins=10_000, animation="castle.webp")
PACK_70 = Package(id="coins_70", coins=70, price_cents=99, currency="USD")


async def mixed_workload(wallet: Wallet) -> None:
    """Every kind of movement, replays and refusals included; the totals below follow it."""

    async def buy(receipt: str, user: str, package: Package = PACK_70) -> None:
        await wallet.purchase(receipt=receipt, user=user, package=package, adult=True)

    async def gift(key: str, sender: str, gift: Gift = HEART, count: int = 1) -> None:
        await wallet.send_gift(
            sender=sender,
            adult=True,
            creator="cara",
            room="cara",
            gift=gift,
            count=count,
            key=key,
        )

    big = Package(id="coins_30000", coins=30_000, price_cents=29_999, currency="USD")
    await buy("rc-ann", "ann", big)
    await buy("rc-ann", "ann", big)  # replay
    await buy("rc-bob", "bob")
    await buy("rc-eve-1", "eve")
    await gift("gift-key-ann-1", "ann", CASTLE, 3)  # 30000 coins -> 15000 diamonds
    await gift("gift-key-ann-1", "ann", CASTLE, 3)  # replay
    await gift("gift-key-bob-1", "bob", HEART, 3)  # 15 -> 7 diamonds, 8 platform
    await gift("gift-key-eve-1", "eve", HEART, 12)  # 60 -> 30 diamonds
    with pytest.raises(Refusal):
        await gift("gift-key-ann-2", "ann")  # no coins left
    await wallet.refund(receipt="rc-eve-1")  # takes 10, 60 becomes debt
    await wallet.refund(receipt="rc-eve-1")  # replay
    await buy("rc-eve-2", "eve")  # repays 60, credits 10
    await wallet.payout(creator="cara", diamonds=12_000, key="payout-key-1")
    await wallet.payout(creator="cara", diamonds=12_000, key="payout-key-1")
    with pytest.raises(Refusal):
        await wallet.payout(creator="cara", diamonds=12_000, key="payout-key-2")
    await wallet.set_daily_limit("bob", 100)


async def add_entry(redis: aioredis.Redis, fields: dict[str, bytes]) -> str:
    """XADD behind the scripts' back; the new entry's stream id."""
    stream_id = await redis.xadd(keys.LEDGER, fields)  # type: ignore[arg-type]
    return stream_id.decode() if isinstance(stream_id, bytes) else stream_id


async def test_empty_ledger_and_no_wallets_pass(redis_client: aioredis.Redis) -> None:
    report = await audit(redis_client)
    assert report.ok and (report.entries, report.wallets) == (0, 0)


async def test_audit_passes_after_a_mixed_workload(
    wallet: Wallet, redis_client: aioredis.Redis
) -> None:
    await mixed_workload(wallet)
    report = await audit(redis_client)
    assert report.breaches == []
    assert report.ok
    assert (report.entries, report.wallets) == (9, 4)  # 4 purchases, 3 gifts, 1 refund, 1 payout
    assert (report.coins_purchased, report.debt_repaid, report.coins_refunded) == (30_210, 60, 10)
    assert (report.coins_spent, report.diamonds_credited, report.platform_share) == (
        30_075,
        15_037,
        15_038,
    )
    assert (report.diamonds_paid_out, report.cents_paid_out) == (12_000, 6000)
    assert (report.coins_held, report.diamonds_held, report.debt, report.debt_recorded) == (
        65,
        3037,
        0,
        60,
    )
    assert "9 ledger entries, 4 wallets" in report.summary()


async def test_a_wallet_changed_behind_the_ledger_is_named(
    wallet: Wallet, redis_client: aioredis.Redis
) -> None:
    await mixed_workload(wallet)
    await redis_client.hset(keys.SINGLE.wallet("bob"), "coins", 120)
    await redis_client.hset(keys.SINGLE.wallet("cara"), "debt", 5)
    report = await audit(redis_client)
    assert not report.ok
    assert report.breaches == [
        "wallet bob: coins 120 in Redis, 55 by the ledger",
        "wallet cara: debt 5 in Redis, 0 by the ledger",
    ]


async def test_a_wallet_with_no_ledger_entry_is_named(redis_client: aioredis.Redis) -> None:
    await redis_client.hset(keys.SINGLE.wallet("ghost"), mapping={"coins": -5, "daily_limit": 10})
    report = await audit(redis_client)
    assert report.breaches == [
        "wallet ghost: coins -5 in Redis, 0 by the ledger",
        "wallet ghost: coins -5 in Redis is negative",
    ]


async def test_a_limit_alone_is_not_a_breach(wallet: Wallet, redis_client: aioredis.Redis) -> None:
    await wallet.set_daily_limit("zoe", 10)
    assert (await audit(redis_client)).ok


@pytest.mark.parametrize("kind", ["gift", "purchase", "refund", "payout"])
async def test_a_deleted_entry_is_found(
    wallet: Wallet, redis_client: aioredis.Redis, kind: str
) -> None:
    await mixed_workload(wallet)
    victim = [e async for e in read_entries(redis_client) if e.kind == kind][-1]
    await redis_client.xdel(keys.LEDGER, victim.id)
    report = await audit(redis_client)
    assert not report.ok
    owner = victim.data.get("sender") or victim.data.get("user") or victim.data["creator"]
    assert any(b.startswith(f"wallet {owner}: ") for b in report.breaches), report.breaches


async def test_deleting_a_purchase_shows_a_negative_replay(
    wallet: Wallet, fund_coins: Fund, redis_client: aioredis.Redis
) -> None:
    await fund_coins("ann", 10)
    await wallet.send_gift(
        sender="ann",
        adult=True,
        creator="cara",
        room="cara",
        gift=HEART,
        count=1,
        key="gift-key-neg",
    )
    purchase, gift = [e async for e in read_entries(redis_client)]
    await redis_client.xdel(keys.LEDGER, purchase.id)
    report = await audit(redis_client)
    assert report.breaches == [
        f"event {gift.event} (gift, {gift.id}): wallet ann: coins -5 by the ledger",
        "wallet ann: coins 5 in Redis, -5 by the ledger",
    ]


async def test_forged_entries_are_named(
    wallet: Wallet, fund_coins: Fund, redis_client: aioredis.Redis
) -> None:
    await fund_coins("ann", 10)
    (purchase,) = [e async for e in read_entries(redis_client)]
    bad_ids = [
        await add_entry(redis_client, {"data": b"not json"}),
        await add_entry(redis_client, {"other": b"{}"}),
        await add_entry(redis_client, {"data": orjson.dumps({"event": "x", "kind": "tip"})}),
        await add_entry(redis_client, {"data": orjson.dumps({**purchase.data, "coins": -1})}),
    ]
    duplicate = await add_entry(redis_client, {"data": orjson.dumps(purchase.data)})
    report = await audit(redis_client)
    assert report.entries == 6
    for stream_id in bad_ids:
        assert any(f"entry {stream_id}" in b for b in report.breaches), stream_id
    assert f"event {purchase.event} (purchase, {duplicate}): event id seen before" in (
        report.breaches
    )
    assert any("receipt fund-ann-1 credited twice" in b for b in report.breaches)
    assert "wallet ann: coins 10 in Redis, 20 by the ledger" in report.breaches


async def test_a_gift_whose_split_does_not_add_up(redis_client: aioredis.Redis) -> None:
    entry = {
        "event": "e1",
        "kind": "gift",
        "ts": NOW_MS,
        "sender": "ann",
        "creator": "cara",
        "room": "cara",
        "gift": "heart",
        "key": "gift-key-forged",
        "count": 1,
        "coins": 5,
        "diamonds": 3,
        "platform": 3,
        "combo": 1,
    }
    stream_id = await add_entry(redis_client, {"data": orjson.dumps(entry)})
    report = await audit(redis_client)
    assert f"event e1 (gift, {stream_id}): coins 5 != diamonds 3 + platform 3" in report.breaches


async def test_a_configured_ledger_key(redis_client: aioredis.Redis) -> None:
    wallet = Wallet(
        redis_client,
        Economics(),
        keyspace=keys.KeySpace(ledger_key="test:ledger"),
        payout_hold_days=0,
    )
    await mixed_workload(wallet)
    assert await redis_client.exists(keys.LEDGER) == 0
    report = await audit(redis_client, keyspace=keys.KeySpace(ledger_key="test:ledger"))
    assert report.ok and report.entries == 9
    assert not (await audit(redis_client)).ok  # the default stream holds none of it
