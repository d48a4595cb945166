"""Chargeback fraud: coins bought with a stolen card, gifted to a colluding creator who asks
for a payout at once. The creator's diamonds are on hold for the hold's days, payouts are
capped a UTC day, the refunds leave the buyer in debt, and the audit reconciles every diamond
(on hold + payable + paid out = credited) from the ledger alone."""

from __future__ import annotations

import orjson
import pytest
import redis.asyncio as aioredis

from giftstream.server.config import ConfigError, add_options, resolve
from giftstream.server.ledger.audit import audit
from giftstream.server.ledger.checkpoint import fold_checkpoint
from giftstream.server.ledger.entries import read_entries
from giftstream.server.money import keys
from tests.security.conftest import DAY_MS, HOLD_DAYS, PAYOUT_CAP, Platform
from tests.server.conftest import NOW_MS

CREATOR = "mallory"
FRAUDSTER = "throwaway"
RECEIPTS = ("stolen-card-1", "stolen-card-2", "stolen-card-3")
MIDNIGHT = NOW_MS - NOW_MS % DAY_MS  # the start of the gifts' UTC day
RELEASE_MS = MIDNIGHT + (HOLD_DAYS + 1) * DAY_MS  # their diamonds are payable from then


async def payout(platform: Platform, diamonds: int, key: str) -> tuple[int, dict[str, object]]:
    body = {"creator": CREATOR, "diamonds": diamonds, "key": key}
    status, reply = await platform.api.call("POST", "/v1/payouts", body)
    return status, reply


async def wallet_of(platform: Platform, user: str) -> dict[str, object]:
    status, view = await platform.api.call("GET", f"/v1/wallets/{user}")
    assert status == 200, view
    return dict(view)


async def defraud(platform: Platform) -> None:
    """Three packages on a stolen card (52500 coins); 49000 gifted: 24500 diamonds."""
    for receipt in RECEIPTS:
        await platform.api.buy(FRAUDSTER, "coins_17500", receipt)
    assert await platform.gift(FRAUDSTER, CREATOR, "sports_car", 7, "launder-0001") == 3500


async def test_the_chargeback_scenario(platform: Platform, redis_client: aioredis.Redis) -> None:
    await defraud(platform)

    # At once: nothing is payable, and the answer says how much is held and until when.
    status, refused = await payout(platform, 10_000, "cash-out-0001")
    assert (status, refused["error"]) == (409, "payout_held"), refused
    message = str(refused["message"])
    assert "0 of mallory's 24500 diamonds are payable now" in message, message
    assert "24500 are still on hold" in message and "2025-12-02, 00:00 UTC" in message, message
    view = await wallet_of(platform, CREATOR)
    assert (view["diamonds"], view["diamonds_held"], view["diamonds_payable"]) == (
        24_500,
        24_500,
        0,
    )

    # A day before the hold ends: still held.
    platform.clock.now_ms = RELEASE_MS - 1
    status, refused = await payout(platform, 10_000, "cash-out-0002")
    assert (status, refused["error"]) == (409, "payout_held")

    # The card's owner disputes within the hold: every purchase is refunded. The coins were
    # gifted, so the throwaway account is left in debt (PROTOCOL.md §3), and nothing was paid.
    platform.clock.now_ms = MIDNIGHT + 3 * DAY_MS
    for receipt in RECEIPTS:
        status, refund = await platform.api.call("POST", "/v1/refunds", {"receipt": receipt})
        assert status == 200, refund
    fraudster = await wallet_of(platform, FRAUDSTER)
    assert (fraudster["coins"], fraudster["debt"]) == (0, 49_000)
    report = await audit(redis_client, now_ms=platform.clock.now_ms)
    assert report.ok, report.breaches
    assert (report.diamonds_credited, report.diamonds_on_hold, report.diamonds_paid_out) == (
        24_500,
        24_500,
        0,
    )

    # The hold is over: payouts up to the day's cap, then refused until the next UTC day.
    platform.clock.now_ms = RELEASE_MS
    view = await wallet_of(platform, CREATOR)
    assert (view["diamonds_held"], view["diamonds_payable"], view["payout_left_today"]) == (
        0,
        24_500,
        PAYOUT_CAP,
    )
    status, paid = await payout(platform, 10_000, "cash-out-0003")
    assert (status, paid["diamonds"]) == (200, 14_500), paid
    status, refused = await payout(platform, 10_000, "cash-out-0004")
    assert (status, refused["error"]) == (429, "payout_cap"), refused
    assert "at most 5000 more until 00:00 UTC" in str(refused["message"]), refused
    assert (await wallet_of(platform, CREATOR))["payout_left_today"] == 5_000
    platform.clock.now_ms = RELEASE_MS + DAY_MS
    status, paid = await payout(platform, 10_000, "cash-out-0004")  # the same request, a day on
    assert (status, paid["diamonds"]) == (200, 4_500), paid

    # Every diamond reconciles from the ledger alone: on hold + payable + paid out = credited.
    report = await audit(redis_client, now_ms=platform.clock.now_ms)
    assert report.ok, report.breaches
    assert report.diamonds_credited == 24_500
    assert report.diamonds_paid_out == 20_000
    assert report.diamonds_on_hold == 0 and report.diamonds_held == 4_500
    assert report.debt == 49_000


async def test_payable_grows_as_each_days_gifts_end_their_hold(platform: Platform) -> None:
    for receipt in RECEIPTS:
        await platform.api.buy(FRAUDSTER, "coins_17500", receipt)
    await platform.gift(FRAUDSTER, CREATOR, "sports_car", 2, "gift-day-1")  # 7000 diamonds
    platform.clock.now_ms += DAY_MS
    await platform.gift(FRAUDSTER, CREATOR, "sports_car", 4, "gift-day-2")  # 14000 diamonds
    platform.clock.now_ms = RELEASE_MS
    view = await wallet_of(platform, CREATOR)
    assert (view["diamonds_held"], view["diamonds_payable"]) == (14_000, 7_000)
    status, refused = await payout(platform, 10_000, "too-early-0001")
    assert (status, refused["error"]) == (409, "payout_held")
    platform.clock.now_ms = RELEASE_MS + DAY_MS
    status, paid = await payout(platform, 10_000, "in-time-00001")
    assert (status, paid["diamonds"]) == (200, 11_000)


async def test_every_refusal_changes_nothing(
    platform: Platform, redis_client: aioredis.Redis
) -> None:
    await defraud(platform)
    before = (
        [e.id async for e in read_entries(redis_client)],
        await redis_client.hgetall(keys.SINGLE.wallet(CREATOR)),
    )
    for diamonds in (10_000, 24_500):
        status, _ = await payout(platform, diamonds, f"refused-{diamonds}")
        assert status == 409
    assert await redis_client.exists(keys.SINGLE.payout("refused-10000")) == 0
    after = (
        [e.id async for e in read_entries(redis_client)],
        await redis_client.hgetall(keys.SINGLE.wallet(CREATOR)),
    )
    assert after == before


async def test_the_audit_names_a_payout_of_held_diamonds(
    platform: Platform, redis_client: aioredis.Redis
) -> None:
    """A payout written behind the scripts' back, while the diamonds were on hold."""
    await defraud(platform)
    entry = {
        "event": "forged-payout",
        "kind": "payout",
        "ts": NOW_MS + 1,
        "creator": CREATOR,
        "key": "forged-key-0001",
        "payout": "p-1",
        "diamonds": 10_000,
        "cents": 5_000,
    }
    await redis_client.xadd(keys.LEDGER, {"data": orjson.dumps(entry)})
    await redis_client.hincrby(keys.SINGLE.wallet(CREATOR), "diamonds", -10_000)
    report = await audit(redis_client, now_ms=NOW_MS + 2)
    assert any(
        "forged-payout" in b and "only 0 were payable, 24500 on hold" in b for b in report.breaches
    ), report.breaches


async def test_the_audit_names_a_hold_lifted_behind_its_back(
    platform: Platform, redis_client: aioredis.Redis
) -> None:
    await defraud(platform)
    assert (await audit(redis_client, now_ms=NOW_MS)).ok
    await redis_client.delete(keys.SINGLE.held(CREATOR))  # every diamond payable at once
    report = await audit(redis_client, now_ms=NOW_MS)
    assert report.breaches == [
        f"wallet {CREATOR}: 0 diamonds on hold in Redis, 24500 by the ledger "
        "({} against {'2025-12-02': 24500})"
    ]
    # After the hold, both agree again: the ledger alone dates each hold.
    assert (await audit(redis_client, now_ms=RELEASE_MS)).ok


async def test_holds_survive_the_checkpoint(
    platform: Platform, redis_client: aioredis.Redis
) -> None:
    """Folded into the checkpoint, the ledger's holds still check a payout after it."""
    await defraud(platform)
    await fold_checkpoint(redis_client)
    entry = {
        "event": "forged-after-fold",
        "kind": "payout",
        "ts": NOW_MS + 1,
        "creator": CREATOR,
        "key": "forged-key-0002",
        "payout": "p-2",
        "diamonds": 10_000,
        "cents": 5_000,
    }
    await redis_client.xadd(keys.LEDGER, {"data": orjson.dumps(entry)})
    from_checkpoint = await audit(redis_client, now_ms=NOW_MS + 2)
    from_empty = await audit(redis_client, now_ms=NOW_MS + 2, from_checkpoint=False)
    for report in (from_checkpoint, from_empty):
        assert any("forged-after-fold" in b and "24500 on hold" in b for b in report.breaches)
    assert from_checkpoint.checkpoint is not None


@pytest.mark.parametrize(
    ("env", "value"),
    [({}, (7, 2_000_000)), ({"GIFTSTREAM_PAYOUT_HOLD_DAYS": "0"}, (0, 2_000_000))],
)
def test_hold_and_cap_options(env: dict[str, str], value: tuple[int, int]) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_options(parser)
    resolved = resolve(parser.parse_args([]), env)
    assert (resolved["payout_hold_days"], resolved["payout_daily_cap"]) == value
    resolved = resolve(parser.parse_args(["--payout-daily-cap", "500"]), env)
    assert resolved["payout_daily_cap"] == 500


@pytest.mark.parametrize(
    "argv",
    [
        ["--payout-hold-days", "-1"],
        ["--payout-hold-days", "1.5"],
        ["--payout-hold-days", "3651"],
        ["--payout-daily-cap", "0"],
        ["--payout-daily-cap", "1e6"],
    ],
)
def test_bad_hold_or_cap_refuses_to_start(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_options(parser)
    with pytest.raises(ConfigError, match=argv[0]):
        resolve(parser.parse_args(argv), {})
