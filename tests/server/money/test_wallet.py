"""The money path against a real Redis: every script's success with exact balances and
ledger entries, every refusal changing nothing, idempotency under retries and concurrency,
combos, NOSCRIPT recovery and cancellation."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from giftstream.server.ledger.entries import read_entries
from giftstream.server.metrics import Metrics
from giftstream.server.money import keys
from giftstream.server.money.admin import http_status
from giftstream.server.money.catalog import Economics, Gift, Package
from giftstream.server.money.refusal import Reason, Refusal
from giftstream.server.money.wallet import (
    MAX_BALANCE,
    PayoutResult,
    SettledGift,
    Wallet,
)
from giftstream.server.scripts import script_source
from tests.server.conftest import NOW_MS, Fund, MoneyClock, Snapshot

ROSE = Gift(id="rose", name="Rose", coins=1, animation="rose.webp")
HEART = Gift(id="heart", name="Heart", coins=5, animation="heart.webp")
DOUGHNUT = Gift(id="doughnut", name="Doughnut", coins=30, animation="doughnut.webp")
CASTLE = Gift(id="castle", name="Castle", coins=10_000, animation="castle.webp")
PACK_700 = Package(id="coins_700", coins=700, price_cents=499, currency="USD")
PACK_70 = Package(id="coins_70", coins=70, price_cents=99, currency="USD")
DAY_MS = 86_400_000


async def send(
    wallet: Wallet,
    key: str,
    *,
    sender: str = "ann",
    gift: Gift = HEART,
    count: int = 1,
    room: str = "cara",
    adult: bool = True,
) -> SettledGift:
    return await wallet.send_gift(
        sender=sender,
        adult=adult,
        creator=room,
        room=room,
        gift=gift,
        count=count,
        key=key,
    )


async def ledger(redis: aioredis.Redis) -> list[dict[str, Any]]:
    return [entry.data async for entry in read_entries(redis)]


async def refused_unchanged(
    snapshot: Snapshot, call: Callable[[], Awaitable[Any]], error: type[Exception] = Refusal
) -> Any:
    """Run a call that must be refused; returns the error after checking no key changed."""
    before = await snapshot()
    with pytest.raises(error) as info:
        await call()
    assert await snapshot() == before
    return info.value


# ---- gifts: success -----------------------------------------------------------------------


async def test_gift_debits_credits_and_appends_one_entry(
    wallet: Wallet, fund_coins: Fund, redis_client: aioredis.Redis
) -> None:
    await fund_coins("ann", 100)
    settled = await send(wallet, "gift-key-0001", count=3)
    assert settled == SettledGift(
        event=settled.event, coins=85, combo=1, diamonds=7, ts=NOW_MS, replayed=False
    )
    assert await wallet.balance("ann") == (85, 0)
    assert await wallet.balance("cara") == (0, 7)
    entries = await ledger(redis_client)
    assert [e["kind"] for e in entries] == ["purchase", "gift"]
    assert entries[1] == {
        "event": settled.event,
        "kind": "gift",
        "ts": NOW_MS,
        "sender": "ann",
        "creator": "cara",
        "room": "cara",
        "gift": "heart",
        "count": 3,
        "coins": 15,
        "diamonds": 7,
        "platform": 8,
        "key": "gift-key-0001",
        "combo": 1,
        "payable_at": NOW_MS,  # no hold in this fixture: payable at once
    }
    view = await wallet.wallet("ann")
    assert (view.coins, view.spent_today, view.daily_limit, view.debt) == (85, 15, None, 0)
    key_ttl = await redis_client.pttl(keys.SINGLE.gift_key("ann", "gift-key-0001"))
    assert keys.GIFT_KEY_TTL_MS - 60_000 < key_ttl <= keys.GIFT_KEY_TTL_MS
    day = keys.epoch_day(NOW_MS)
    assert await redis_client.hmget(
        keys.SINGLE.wallet("ann"),
        ["spent_day", "spent_day_coins", "spent_week", "spent_week_coins"],
    ) == [str(day).encode(), b"15", str(keys.iso_week(day)).encode(), b"15"]


async def test_creator_share_rounds_down_and_the_platform_keeps_the_rest(
    redis_client: aioredis.Redis, fund_coins: Fund
) -> None:
    wallet = Wallet(redis_client, Economics(creator_share_bp=3333))
    await fund_coins("ann", 100)
    settled = await send(wallet, "gift-key-share", gift=Gift("odd", "Odd", 7, "a"), count=1)
    assert settled.diamonds == 7 * 3333 // 10000 == 2
    (gift,) = [e for e in await ledger(redis_client) if e["kind"] == "gift"]
    assert (gift["coins"], gift["diamonds"], gift["platform"]) == (7, 2, 5)


async def test_gift_metrics(wallet: Wallet, fund_coins: Fund, wallet_metrics: Metrics) -> None:
    await fund_coins("ann", 100)
    await send(wallet, "gift-key-metrics", count=2)
    await send(wallet, "gift-key-metrics", count=2)
    sample = wallet_metrics.registry.get_sample_value
    assert sample("giftstream_gifts_settled_total") == 1
    assert sample("giftstream_coins_settled_total") == 10
    assert sample("giftstream_gift_replays_total") == 1
    assert sample("giftstream_lua_seconds_count", {"script": "send_gift"}) == 2
    assert sample("giftstream_lua_seconds_count", {"script": "purchase"}) == 1


# ---- gifts: refusals change nothing -------------------------------------------------------


async def test_insufficient_coins(
    wallet: Wallet, fund_coins: Fund, redis_snapshot: Snapshot
) -> None:
    await fund_coins("ann", 10)
    error = await refused_unchanged(
        redis_snapshot, lambda: send(wallet, "gift-key-poor", gift=DOUGHNUT)
    )
    assert error.reason is Reason.INSUFFICIENT_COINS
    assert error.message == "this gift costs 30 coins; you have 10"


async def test_unknown_sender_has_no_coins(wallet: Wallet, redis_snapshot: Snapshot) -> None:
    error = await refused_unchanged(redis_snapshot, lambda: send(wallet, "gift-key-nobody"))
    assert error.reason is Reason.INSUFFICIENT_COINS


async def test_minor_cannot_send_a_paid_gift(
    wallet: Wallet, fund_coins: Fund, redis_snapshot: Snapshot
) -> None:
    await fund_coins("kid", 100)
    error = await refused_unchanged(
        redis_snapshot, lambda: send(wallet, "gift-key-minor", sender="kid", adult=False)
    )
    assert error.reason is Reason.UNDERAGE


async def test_checks_come_in_the_contract_order(wallet: Wallet, redis_snapshot: Snapshot) -> None:
    """Debt, then age, then the daily limit, then the balance."""
    await wallet.set_daily_limit("ann", 0)
    minor = await refused_unchanged(
        redis_snapshot, lambda: send(wallet, "gift-key-ord1", adult=False)
    )
    assert minor.reason is Reason.UNDERAGE  # not the limit, not the balance
    limited = await refused_unchanged(redis_snapshot, lambda: send(wallet, "gift-key-ord2"))
    assert limited.reason is Reason.SPENDING_LIMIT  # not the balance


async def test_spending_limit_allows_exactly_the_limit(
    wallet: Wallet, fund_coins: Fund, redis_snapshot: Snapshot
) -> None:
    await fund_coins("ann", 100)
    view = await wallet.set_daily_limit("ann", 20)
    assert (view.daily_limit, view.spent_today, view.coins) == (20, 0, 100)
    assert (await send(wallet, "gift-key-lim1", count=4)).coins == 80  # 20: exactly the limit
    error = await refused_unchanged(
        redis_snapshot, lambda: send(wallet, "gift-key-lim2", gift=ROSE)
    )
    assert error.reason is Reason.SPENDING_LIMIT
    assert "daily limit of 20" in error.message
    assert (await wallet.wallet("ann")).spent_today == 20


async def test_spending_limit_counts_per_utc_day(
    wallet: Wallet, fund_coins: Fund, money_clock: MoneyClock
) -> None:
    await fund_coins("ann", 100)
    await wallet.set_daily_limit("ann", 5)
    midnight = (NOW_MS // DAY_MS + 1) * DAY_MS
    money_clock.now_ms = midnight - 1
    await send(wallet, "gift-key-day1")
    with pytest.raises(Refusal) as info:
        await send(wallet, "gift-key-day1b", gift=ROSE)
    assert info.value.reason is Reason.SPENDING_LIMIT
    assert (await wallet.wallet("ann")).spent_today == 5
    money_clock.now_ms = midnight
    assert (await wallet.wallet("ann")).spent_today == 0
    assert (await send(wallet, "gift-key-day2")).coins == 90
    assert (await wallet.wallet("ann")).spent_today == 5
    money_clock.now_ms = midnight + DAY_MS
    assert (await wallet.wallet("ann")).spent_today == 0


async def test_clearing_the_limit_lifts_it(wallet: Wallet, fund_coins: Fund) -> None:
    await fund_coins("ann", 100)
    await wallet.set_daily_limit("ann", 0)
    view = await wallet.set_daily_limit("ann", None)
    assert view.daily_limit is None
    assert (await send(wallet, "gift-key-nolimit")).coins == 95


@pytest.mark.parametrize(
    "change", [{"room": "dan"}, {"gift": ROSE}, {"count": 2}], ids=["room", "gift", "count"]
)
async def test_key_reused_with_other_params(
    wallet: Wallet, fund_coins: Fund, redis_snapshot: Snapshot, change: dict[str, Any]
) -> None:
    await fund_coins("ann", 100)
    await send(wallet, "gift-key-reuse")
    error = await refused_unchanged(
        redis_snapshot, lambda: send(wallet, "gift-key-reuse", **change)
    )
    assert error.reason is Reason.KEY_REUSED


@pytest.mark.parametrize("count", [0, 100, -1, True])
async def test_bad_count_is_refused_before_redis(
    wallet: Wallet, fund_coins: Fund, redis_snapshot: Snapshot, count: int
) -> None:
    await fund_coins("ann", 1000)
    error = await refused_unchanged(
        redis_snapshot, lambda: send(wallet, "gift-key-count", count=count)
    )
    assert error.reason is Reason.BAD_COUNT


async def test_bad_key_is_refused(
    wallet: Wallet, fund_coins: Fund, redis_snapshot: Snapshot
) -> None:
    await fund_coins("ann", 100)
    for key in ("short", "has space in it", "x" * 65, "colon:key:1"):
        error = await refused_unchanged(redis_snapshot, functools.partial(send, wallet, key))
        assert error.reason is Reason.BAD_REQUEST


async def test_a_float_never_reaches_a_balance(
    redis_client: aioredis.Redis, fund_coins: Fund, redis_snapshot: Snapshot
) -> None:
    """A buggy caller bypassing wallet.py: the script refuses the argument before any write."""
    await fund_coins("ann", 100)
    script_keys = [
        keys.SINGLE.wallet("ann"),
        keys.SINGLE.wallet("cara"),
        keys.SINGLE.gift_key("ann", "gift-key-flt"),
        keys.SINGLE.combo("ann", "cara"),
        keys.LEDGER,
        keys.SINGLE.held("cara"),
    ]
    good = [
        "ev1",
        "ann",
        "cara",
        "cara",
        "heart",
        "gift-key-flt",
        1,
        5,
        2,
        1,
        NOW_MS,
        1000,
        5000,
        1000,
        7,
    ]
    bad_args = ((6, "1.5"), (7, "5.5"), (8, "2.5"), (8, 6), (10, "1e400"), (6, "x"), (14, "7.0"))
    for position, bad in bad_args:
        args = [*good]
        args[position] = bad

        async def call(args: list[Any] = args) -> Any:
            return await redis_client.eval(script_source("send_gift"), 6, *script_keys, *args)

        await refused_unchanged(redis_snapshot, call, ResponseError)


@pytest.mark.parametrize(
    ("key", "field", "value"),
    [
        (keys.SINGLE.wallet("cara"), "diamonds", "lots"),
        (keys.SINGLE.wallet("cara"), "diamonds", "1e3"),  # tonumber takes it, HINCRBY would not
        (keys.SINGLE.wallet("ann"), "coins", " 100"),
        (keys.SINGLE.wallet("ann"), "daily_limit", "0x10"),
        (keys.SINGLE.wallet("ann"), "debt", "-0"),
        (keys.SINGLE.wallet("ann"), "coins", "0100"),
        (keys.SINGLE.wallet("ann"), "spent_day_coins", "5.0"),
        (keys.SINGLE.wallet("ann"), "weekly_limit", "1e3"),
        (keys.SINGLE.held("cara"), str(keys.epoch_day(NOW_MS) + 3), "2.5"),
    ],
)
async def test_corrupt_stored_value_stops_the_script_before_any_write(
    wallet: Wallet,
    fund_coins: Fund,
    redis_client: aioredis.Redis,
    redis_snapshot: Snapshot,
    key: str,
    field: str | None,
    value: str,
) -> None:
    await fund_coins("ann", 100)
    if field is None:
        await redis_client.set(key, value)
    else:
        await redis_client.hset(key, field, value)
    await refused_unchanged(redis_snapshot, lambda: send(wallet, "gift-key-corrupt"), ResponseError)


# ---- gifts: idempotency -------------------------------------------------------------------


async def test_replay_returns_the_first_result_even_at_zero(
    wallet: Wallet, fund_coins: Fund, redis_snapshot: Snapshot, redis_client: aioredis.Redis
) -> None:
    await fund_coins("ann", 5)
    first = await send(wallet, "gift-key-replay")
    assert first.coins == 0 and not first.replayed
    await wallet.set_daily_limit("ann", 0)
    before = await redis_snapshot()
    for again in (
        await send(wallet, "gift-key-replay"),
        await send(wallet, "gift-key-replay", adult=False),
    ):
        assert again.replayed
        assert (again.event, again.coins, again.combo, again.diamonds, again.ts) == (
            first.event,
            0,
            1,
            2,
            NOW_MS,
        )
    assert await redis_snapshot() == before
    assert len([e for e in await ledger(redis_client) if e["kind"] == "gift"]) == 1


async def test_50_concurrent_copies_of_one_key_debit_once(
    wallet: Wallet, fund_coins: Fund, redis_client: aioredis.Redis
) -> None:
    await fund_coins("ann", 100)
    results = await asyncio.gather(*(send(wallet, "gift-key-storm") for _ in range(50)))
    assert sum(not r.replayed for r in results) == 1
    assert len({(r.event, r.coins, r.combo, r.diamonds, r.ts) for r in results}) == 1
    assert await wallet.balance("ann") == (95, 0)
    assert await wallet.balance("cara") == (0, 2)
    gifts = [e for e in await ledger(redis_client) if e["kind"] == "gift"]
    assert [g["event"] for g in gifts] == [results[0].event]


async def test_equal_keys_of_two_users_do_not_collide(wallet: Wallet, fund_coins: Fund) -> None:
    await fund_coins("ann", 10)
    await fund_coins("bob", 10)
    ann = await send(wallet, "gift-key-shared", sender="ann")
    bob = await send(wallet, "gift-key-shared", sender="bob", gift=ROSE)
    assert not ann.replayed and not bob.replayed and ann.event != bob.event
    assert (await wallet.balance("ann"), await wallet.balance("bob")) == ((5, 0), (9, 0))


async def test_200_concurrent_distinct_gifts_end_at_the_exact_balance(
    redis_url: str, fund_coins: Fund, redis_client: aioredis.Redis
) -> None:
    """More calls than connections: a blocking pool queues them (the default pool would raise
    MaxConnectionsError past 100)."""
    await fund_coins("ann", 1000)
    pool = aioredis.BlockingConnectionPool.from_url(redis_url, max_connections=32)
    async with aioredis.Redis(connection_pool=pool) as client:
        wallet = Wallet(client, Economics())
        results = await asyncio.gather(*(send(wallet, f"gift-key-{i:04}") for i in range(200)))
    assert len({r.event for r in results}) == 200
    assert sorted(r.coins for r in results) == list(range(0, 1000, 5))
    assert await wallet.balance("ann") == (0, 0)
    assert await wallet.balance("cara") == (0, 400)
    assert len(await ledger(redis_client)) == 201


async def test_concurrent_gifts_past_the_balance_accept_exactly_what_fits(
    wallet: Wallet, fund_coins: Fund
) -> None:
    await fund_coins("ann", 1000)

    async def attempt(i: int) -> SettledGift | Reason:
        try:
            return await send(wallet, f"gift-key-race-{i}", gift=DOUGHNUT)
        except Refusal as exc:
            return exc.reason

    results = await asyncio.gather(*(attempt(i) for i in range(60)))
    accepted = [r for r in results if isinstance(r, SettledGift)]
    assert len(accepted) == 1000 // 30
    assert min(r.coins for r in accepted) == 1000 % 30
    assert [r for r in results if not isinstance(r, SettledGift)] == [Reason.INSUFFICIENT_COINS] * (
        60 - 1000 // 30
    )
    assert await wallet.balance("ann") == (10, 0)


# ---- combos -------------------------------------------------------------------------------


async def test_combo_grows_under_five_seconds_and_restarts(
    wallet: Wallet, fund_coins: Fund, money_clock: MoneyClock
) -> None:
    await fund_coins("ann", 1000)
    steps: list[tuple[int, Gift, str, int]] = [  # (ms after the previous, gift, room, combo)
        (0, HEART, "cara", 1),
        (4999, HEART, "cara", 2),
        (4000, HEART, "cara", 3),
        (100, HEART, "dan", 1),  # another room keeps its own streak
        (100, HEART, "cara", 4),
        (100, ROSE, "cara", 1),  # another gift restarts
        (100, HEART, "cara", 1),
        (5000, HEART, "cara", 1),  # a gap of 5 s restarts
        (1, HEART, "cara", 2),
    ]
    for i, (gap, gift, room, combo) in enumerate(steps):
        money_clock.now_ms += gap
        settled = await send(wallet, f"gift-key-combo-{i}", gift=gift, room=room)
        assert settled.combo == combo, (i, settled)
    assert (await send(wallet, "gift-key-combo-0")).combo == 1  # a replay keeps its combo


async def test_combo_is_per_sender(
    wallet: Wallet, fund_coins: Fund, money_clock: MoneyClock
) -> None:
    await fund_coins("ann", 100)
    await fund_coins("bob", 100)
    assert (await send(wallet, "gift-key-c-ann1", sender="ann")).combo == 1
    money_clock.now_ms += 1
    assert (await send(wallet, "gift-key-c-bob1", sender="bob")).combo == 1
    money_clock.now_ms += 1
    assert (await send(wallet, "gift-key-c-ann2", sender="ann")).combo == 2


# ---- resilience ---------------------------------------------------------------------------


async def test_calls_survive_noscript_after_script_flush(
    wallet: Wallet, fund_coins: Fund, redis_client: aioredis.Redis
) -> None:
    await fund_coins("ann", 100)
    await redis_client.script_flush()
    assert (
        await redis_client.script_exists(*(s.sha for s in wallet._scripts.values())) == [False] * 4
    )
    assert (await send(wallet, "gift-key-noscript")).coins == 95
    assert (await fund_coins("ann", 5)).coins == 100


async def test_cancelled_caller_still_settles_once_and_the_retry_gets_its_event(
    wallet: Wallet, fund_coins: Fund, redis_client: aioredis.Redis
) -> None:
    await fund_coins("ann", 100)
    await redis_client.client_pause(400, all=False)  # scripts that write wait in Redis
    task = asyncio.create_task(send(wallet, "gift-key-cancel"))
    await asyncio.sleep(0.1)
    assert await redis_client.xlen(keys.LEDGER) == 1  # only the purchase: the call is pending
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wallet.drain()  # the script finishes after the pause
    assert await wallet.balance("ann") == (95, 0)
    retry = await send(wallet, "gift-key-cancel")
    assert retry.replayed and retry.coins == 95
    gifts = [e for e in await ledger(redis_client) if e["kind"] == "gift"]
    assert [g["event"] for g in gifts] == [retry.event]


# ---- purchases ----------------------------------------------------------------------------


async def test_purchase_credits_once_per_receipt(
    wallet: Wallet,
    redis_client: aioredis.Redis,
    redis_snapshot: Snapshot,
    money_clock: MoneyClock,
) -> None:
    first = await wallet.purchase(receipt="rc-ann-1", user="ann", package=PACK_700, adult=True)
    assert first.as_wire() == {"coins": 700, "credited": True}
    assert (first.coins_credited, first.debt_repaid, first.debt) == (700, 0, 0)
    assert await ledger(redis_client) == [
        {
            "event": first.event,
            "kind": "purchase",
            "ts": NOW_MS,
            "user": "ann",
            "receipt": "rc-ann-1",
            "package": "coins_700",
            "coins": 700,
            "credited": 700,
            "debt_repaid": 0,
            "price_cents": 499,
            "currency": "USD",
        }
    ]
    before = await redis_snapshot()
    money_clock.now_ms += 5
    replay = await wallet.purchase(receipt="rc-ann-1", user="ann", package=PACK_700, adult=True)
    assert replay.as_wire() == {"coins": 700, "credited": False}
    assert replay.event == first.event
    assert await redis_snapshot() == before


async def test_purchase_replay_reports_the_balance_now(wallet: Wallet, fund_coins: Fund) -> None:
    await wallet.purchase(receipt="rc-ann-2", user="ann", package=PACK_70, adult=True)
    await send(wallet, "gift-key-after-buy")
    replay = await wallet.purchase(receipt="rc-ann-2", user="ann", package=PACK_70, adult=True)
    assert replay.as_wire() == {"coins": 65, "credited": False}


@pytest.mark.parametrize(
    ("user", "package"), [("bob", PACK_70), ("ann", PACK_700)], ids=["other-user", "other-package"]
)
async def test_receipt_used_for_another_user_or_package(
    wallet: Wallet, redis_snapshot: Snapshot, user: str, package: Package
) -> None:
    await wallet.purchase(receipt="rc-shared", user="ann", package=PACK_70, adult=True)
    error = await refused_unchanged(
        redis_snapshot,
        lambda: wallet.purchase(receipt="rc-shared", user=user, package=package, adult=True),
        Refusal,
    )
    assert (http_status(error), error.code) == (409, "receipt_reused")


async def test_minor_cannot_buy_coins(wallet: Wallet, redis_snapshot: Snapshot) -> None:
    error = await refused_unchanged(
        redis_snapshot,
        lambda: wallet.purchase(receipt="rc-kid", user="kid", package=PACK_70, adult=False),
        Refusal,
    )
    assert (http_status(error), error.code) == (403, "underage")


async def test_purchase_past_the_balance_cap_is_refused(
    wallet: Wallet, redis_client: aioredis.Redis, redis_snapshot: Snapshot
) -> None:
    await redis_client.hset(keys.SINGLE.wallet("whale"), "coins", MAX_BALANCE - 69)
    error = await refused_unchanged(
        redis_snapshot,
        lambda: wallet.purchase(receipt="rc-whale", user="whale", package=PACK_70, adult=True),
        Refusal,
    )
    assert (http_status(error), error.code) == (409, "balance_limit")


async def test_ledger_integers_keep_every_digit(
    wallet: Wallet, redis_client: aioredis.Redis, money_clock: MoneyClock
) -> None:
    """Redis's cjson would print 2**50 - 1 as 1.1258999068426e+15."""
    big = Package(id="big", coins=999_999_999, price_cents=999_999_999_999, currency="USD")
    ts = money_clock.now_ms = 2**50 - 1
    await wallet.purchase(receipt="rc-big", user="ann", package=big, adult=True)
    (entry,) = await ledger(redis_client)
    assert (entry["ts"], entry["coins"], entry["price_cents"]) == (ts, 999_999_999, 999_999_999_999)


# ---- refunds and debt ---------------------------------------------------------------------


async def test_refund_takes_the_coins_back_once(
    wallet: Wallet,
    redis_client: aioredis.Redis,
    redis_snapshot: Snapshot,
    money_clock: MoneyClock,
) -> None:
    bought = await wallet.purchase(receipt="rc-back", user="ann", package=PACK_700, adult=True)
    money_clock.now_ms = NOW_MS + 1
    first = await wallet.refund(receipt="rc-back")
    assert first.as_wire() == {
        "receipt": "rc-back",
        "user": "ann",
        "refunded": True,
        "coins_taken": 700,
        "debt_added": 0,
        "coins": 0,
        "debt": 0,
    }
    assert (await ledger(redis_client))[1] == {
        "event": first.event,
        "kind": "refund",
        "ts": NOW_MS + 1,
        "user": "ann",
        "receipt": "rc-back",
        "purchase": bought.event,
        "coins": 700,
        "debt": 0,
    }
    before = await redis_snapshot()
    money_clock.now_ms = NOW_MS + 2
    again = await wallet.refund(receipt="rc-back")
    assert not again.refunded
    assert (again.event, again.coins_taken, again.debt_added) == (first.event, 700, 0)
    assert await redis_snapshot() == before


async def test_refund_of_unknown_receipt(wallet: Wallet, redis_snapshot: Snapshot) -> None:
    error = await refused_unchanged(
        redis_snapshot, lambda: wallet.refund(receipt="rc-none"), Refusal
    )
    assert (http_status(error), error.code) == (404, "unknown_receipt")


async def test_refund_after_spending_records_debt_which_blocks_gifts_until_repaid(
    wallet: Wallet, redis_client: aioredis.Redis, redis_snapshot: Snapshot
) -> None:
    await wallet.purchase(receipt="rc-eve-1", user="eve", package=PACK_70, adult=True)
    await send(wallet, "gift-key-eve-1", sender="eve", gift=DOUGHNUT, count=2)
    refund = await wallet.refund(receipt="rc-eve-1")
    assert (refund.coins_taken, refund.debt_added, refund.coins, refund.debt) == (10, 60, 0, 60)
    view = await wallet.wallet("eve")
    assert (view.coins, view.debt, view.spent_today) == (0, 60, 60)

    error = await refused_unchanged(
        redis_snapshot, lambda: send(wallet, "gift-key-eve-2", sender="eve")
    )
    assert error.reason is Reason.DEBT  # the WebSocket reads it as insufficient_coins
    assert "owe 60 coins" in error.message

    repaid = await wallet.purchase(receipt="rc-eve-2", user="eve", package=PACK_70, adult=True)
    assert repaid.as_wire() == {"coins": 10, "credited": True}
    assert (repaid.coins_credited, repaid.debt_repaid, repaid.debt) == (10, 60, 0)
    entry = (await ledger(redis_client))[-1]
    assert (entry["coins"], entry["credited"], entry["debt_repaid"]) == (70, 10, 60)
    assert (await send(wallet, "gift-key-eve-3", sender="eve")).coins == 5


async def test_purchase_smaller_than_the_debt_pays_part_of_it(wallet: Wallet) -> None:
    await wallet.purchase(receipt="rc-d-1", user="dee", package=PACK_700, adult=True)
    await send(wallet, "gift-key-dee-1", sender="dee", gift=Gift("big", "Big", 700, "a"))
    await wallet.refund(receipt="rc-d-1")
    part = await wallet.purchase(receipt="rc-d-2", user="dee", package=PACK_70, adult=True)
    assert (part.coins, part.coins_credited, part.debt_repaid, part.debt) == (0, 0, 70, 630)


# ---- payouts ------------------------------------------------------------------------------


async def _creator_with_15000_diamonds(wallet: Wallet, fund_coins: Fund) -> None:
    await fund_coins("ann", 30_000)
    await send(wallet, "gift-key-castle", gift=CASTLE, count=3)
    assert await wallet.balance("cara") == (0, 15_000)


async def test_payout_once_per_key(
    wallet: Wallet, fund_coins: Fund, redis_client: aioredis.Redis, redis_snapshot: Snapshot
) -> None:
    await _creator_with_15000_diamonds(wallet, fund_coins)
    paid = await wallet.payout(creator="cara", diamonds=12_000, key="payout-key-01")
    assert paid.as_wire() == {"payout": paid.payout, "cents": 6000, "diamonds": 3000}
    assert not paid.replayed
    assert (await ledger(redis_client))[-1] == {
        "event": paid.event,
        "kind": "payout",
        "ts": NOW_MS,
        "creator": "cara",
        "key": "payout-key-01",
        "payout": paid.payout,
        "diamonds": 12_000,
        "cents": 6000,
    }
    before = await redis_snapshot()
    again = await wallet.payout(creator="cara", diamonds=12_000, key="payout-key-01")
    assert again == PayoutResult(
        payout=paid.payout,
        creator="cara",
        cents=6000,
        diamonds=3000,
        event=paid.event,
        replayed=True,
    )
    assert await redis_snapshot() == before


@pytest.mark.parametrize(
    ("creator", "diamonds", "status", "code"),
    [
        ("cara", 13_000, 409, "key_reused"),  # same key, other diamonds
        ("dan", 12_000, 409, "key_reused"),  # same key, other creator
        ("cara", 9_999, 422, "below_minimum"),
        ("cara", 0, 422, "bad_request"),
        ("cara", 10**12 + 1, 422, "bad_request"),
    ],
)
async def test_payout_refusals_with_a_used_key(
    wallet: Wallet,
    fund_coins: Fund,
    redis_snapshot: Snapshot,
    creator: str,
    diamonds: int,
    status: int,
    code: str,
) -> None:
    await _creator_with_15000_diamonds(wallet, fund_coins)
    await wallet.payout(creator="cara", diamonds=12_000, key="payout-key-01")
    error = await refused_unchanged(
        redis_snapshot,
        lambda: wallet.payout(creator=creator, diamonds=diamonds, key="payout-key-01"),
        Refusal,
    )
    assert (http_status(error), error.code) == (status, code)


async def test_payout_of_more_than_held(
    wallet: Wallet, fund_coins: Fund, redis_snapshot: Snapshot
) -> None:
    await _creator_with_15000_diamonds(wallet, fund_coins)
    error = await refused_unchanged(
        redis_snapshot,
        lambda: wallet.payout(creator="cara", diamonds=15_001, key="payout-key-02"),
        Refusal,
    )
    assert (http_status(error), error.code) == (409, "insufficient_diamonds")
    assert "cara holds 15000" in error.message


# ---- wallets and limits -------------------------------------------------------------------


async def test_unknown_wallet_is_empty(wallet: Wallet) -> None:
    assert await wallet.balance("nobody") == (0, 0)
    assert (await wallet.wallet("nobody")).as_wire() == {
        "user": "nobody",
        "coins": 0,
        "diamonds": 0,
        "spent_today": 0,
        "daily_limit": None,
        "debt": 0,
        "spent_week": 0,
        "weekly_limit": None,
        "diamonds_held": 0,
        "diamonds_payable": 0,
        "payout_left_today": 2_000_000,
    }


@pytest.mark.parametrize("limit", [-1, 10**12 + 1, True, 1.5, "5"])
async def test_bad_daily_limit(wallet: Wallet, redis_snapshot: Snapshot, limit: Any) -> None:
    error = await refused_unchanged(
        redis_snapshot, lambda: wallet.set_daily_limit("ann", limit), Refusal
    )
    assert (http_status(error), error.code) == (422, "bad_request")


async def test_daily_limit_round_trip(wallet: Wallet, fund_coins: Fund) -> None:
    await fund_coins("ann", 50)
    view = await wallet.set_daily_limit("ann", 10**12)
    assert view.as_wire() == {
        "user": "ann",
        "coins": 50,
        "diamonds": 0,
        "spent_today": 0,
        "daily_limit": 10**12,
        "debt": 0,
        "spent_week": 0,
        "weekly_limit": None,
        "diamonds_held": 0,
        "diamonds_payable": 0,
        "payout_left_today": 2_000_000,
    }
    assert (await wallet.wallet("ann")).daily_limit == 10**12
    assert (await wallet.set_daily_limit("ann", None)).daily_limit is None
