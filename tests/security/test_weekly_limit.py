"""A weekly spending limit beside the daily one: a user who caps each day cannot be walked
past the week's cap one day at a time. Week = ISO week (Monday to Sunday), UTC, Redis's time.
PUT /v1/wallets/U/limit takes either limit or both; a limit not named stays as it was."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from giftstream.server.money.refusal import Reason, Refusal
from giftstream.server.realtime.refusals import protocol_error
from tests.security.conftest import DAY_MS, Platform
from tests.server.conftest import NOW_MS

MONDAY = NOW_MS - NOW_MS % DAY_MS  # 2025-11-24 was a Monday
SUNDAY_NIGHT = MONDAY + 7 * DAY_MS - 1


async def limits(platform: Platform, body: dict[str, object]) -> dict[str, object]:
    status, view = await platform.api.call("PUT", "/v1/wallets/ann/limit", body)
    assert status == 200, view
    return dict(view)


async def test_the_week_caps_what_each_day_allows(platform: Platform) -> None:
    await platform.api.buy("ann", "coins_3500", "receipt-week-1")
    view = await limits(platform, {"daily_limit": 500, "weekly_limit": 1_200})
    assert (view["daily_limit"], view["weekly_limit"], view["spent_week"]) == (500, 1_200, 0)
    for day in range(2):  # Monday and Tuesday: 495 coins each, under the daily limit
        platform.clock.now_ms = MONDAY + day * DAY_MS + 3_600_000
        await platform.gift("ann", "cara", "hat", 5, f"gift-week-{day}")
    platform.clock.now_ms = MONDAY + 2 * DAY_MS  # Wednesday: a new day, 210 left this week
    status, view = await platform.api.call("GET", "/v1/wallets/ann")
    assert (status, view["spent_today"], view["spent_week"]) == (200, 0, 990)
    with pytest.raises(Refusal) as refused:
        await platform.gift("ann", "cara", "hat", 3, "gift-week-2")  # 297: under 500, over 1200
    assert refused.value.reason is Reason.SPENDING_LIMIT
    assert "weekly limit of 1200" in refused.value.message
    error = protocol_error(refused.value)  # the WebSocket's code stays spending_limit
    assert error is not None and error.code.value == "spending_limit"
    await platform.gift("ann", "cara", "hat", 2, "gift-week-3")  # 198: exactly to 1188
    platform.clock.now_ms = SUNDAY_NIGHT
    with pytest.raises(Refusal):
        await platform.gift("ann", "cara", "ice_cream", 2, "gift-week-4")  # 20 > 12 left
    platform.clock.now_ms = SUNDAY_NIGHT + 1  # Monday 00:00 UTC: a new ISO week
    status, view = await platform.api.call("GET", "/v1/wallets/ann")
    assert (status, view["spent_today"], view["spent_week"]) == (200, 0, 0)
    await platform.gift("ann", "cara", "ice_cream", 2, "gift-week-4")


async def test_a_limit_not_named_stays_and_r1_bodies_work_as_before(platform: Platform) -> None:
    view = await limits(platform, {"weekly_limit": 700})
    assert (view["daily_limit"], view["weekly_limit"]) == (None, 700)
    view = await limits(platform, {"daily_limit": 100})  # an r1 body: the week's limit stays
    assert (view["daily_limit"], view["weekly_limit"]) == (100, 700)
    view = await limits(platform, {"weekly_limit": None})
    assert (view["daily_limit"], view["weekly_limit"]) == (100, None)
    view = await limits(platform, {"daily_limit": None, "weekly_limit": 0})
    assert (view["daily_limit"], view["weekly_limit"]) == (None, 0)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"weekly_limit": -1}',
        b'{"weekly_limit": 1.5}',
        b'{"weekly_limit": "100"}',
        b'{"weekly_limit": true}',
        b'{"weekly_limit": 1000000000001}',
        b'{"daily_limit": 5, "weekly_limit": 2.0}',  # one bad field: neither is set
        b'{"weekly": 5}',
    ],
)
async def test_a_bad_weekly_limit_is_400_and_changes_nothing(
    platform: Platform, redis_client: aioredis.Redis, raw: bytes
) -> None:
    await limits(platform, {"daily_limit": 50, "weekly_limit": 70})
    before = await redis_client.hgetall("giftstream:wallet:ann")
    status, body = await platform.api.call("PUT", "/v1/wallets/ann/limit", raw)
    assert (status, body["error"]) == (400, "bad_request"), body
    assert await redis_client.hgetall("giftstream:wallet:ann") == before
