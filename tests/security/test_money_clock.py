"""Money time is Redis's: a gateway whose own clock is skewed (a day ahead, a day behind)
still dates every money entry, every gift's `ts` and every spend by Redis's TIME, so a user
spread over skewed gateways cannot spend into two UTC days around midnight. The production
path has no time to take from anyone: only a test Wallet's clock replaces TIME."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from giftstream.server.app import App
from giftstream.server.ledger.entries import read_entries
from giftstream.server.money import keys
from giftstream.server.money.catalog import Catalog
from giftstream.server.money.refusal import Reason, Refusal
from giftstream.server.money.wallet import Wallet
from tests.helpers import AdminClient, TokenMaker, WsClient

DAY_NS = 86_400 * 10**9


class SkewedClock:
    """The process clock (time.time, time.time_ns) moved by `skew_ns`, as on a gateway
    whose NTP is off; monotonic time, which timeouts use, is left alone."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.skew_ns = 0
        real_ns = time.time_ns
        monkeypatch.setattr(time, "time_ns", lambda: real_ns() + self.skew_ns)
        monkeypatch.setattr(time, "time", lambda: (real_ns() + self.skew_ns) / 1e9)


@pytest.fixture
def skewed(monkeypatch: pytest.MonkeyPatch) -> Iterator[SkewedClock]:
    yield SkewedClock(monkeypatch)


async def redis_ms(redis: aioredis.Redis) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def test_a_gateway_a_day_ahead_dates_gifts_by_redis(
    skewed: SkewedClock,
    app: App,
    tokens: TokenMaker,
    admin: AdminClient,
    redis_client: aioredis.Redis,
) -> None:
    """Over real sockets, on a real server whose process clock is a day ahead: the gift's
    room event, its ledger entry and the purchase's are all Redis's time; the spend counts
    on Redis's UTC day. (The skew starts after the logins: PyJWT checks tokens against
    datetime's clock, which the skew does not move.)"""
    creator, _ = await WsClient.login(app.ws_url, tokens("cara", "creator", name="Cara"))
    ann, _ = await WsClient.login(app.ws_url, tokens("ann", name="Ann"))
    skewed.skew_ns = DAY_NS
    assert time.time_ns() // 10**6 - await redis_ms(redis_client) > DAY_NS // 10**6 - 60_000
    try:
        await admin.buy("ann", "coins_700")
        await creator.request({"type": "go_live", "title": "Show"})
        await ann.request({"type": "join", "room": "cara"})
        before = await redis_ms(redis_client)
        ok = await ann.request(
            {"type": "gift", "room": "cara", "gift": "heart", "count": 1, "key": "skew-key-01"}
        )
        after = await redis_ms(redis_client)
        (event,) = await ann.wait_for_room_events(1, kind="gift")
    finally:
        await ann.close()
        await creator.close()
    entries = {e.kind: e for e in [e async for e in read_entries(redis_client)]}
    assert entries["gift"].event == ok["event"] == event["event"]
    assert event["ts"] == entries["gift"].ts  # the room event's ts is the ledger's
    assert before <= entries["gift"].ts <= after  # Redis's clock, not the gateway's
    assert entries["purchase"].ts <= before
    day = await redis_client.hget(keys.SINGLE.wallet("ann"), "spent_day")
    assert day is not None and int(day) == keys.epoch_day(entries["gift"].ts)
    status, view = await admin.call("GET", "/v1/wallets/ann")
    assert (status, view["spent_today"]) == (200, 5)  # today is Redis's today


async def test_gateways_skewed_either_way_share_one_day(
    skewed: SkewedClock, redis_client: aioredis.Redis, catalog: Catalog
) -> None:
    """Two gateways (two production Wallets), one a day ahead and one a day behind: a user
    capped at 10 coins a day spends 10 over both, then is refused on either."""
    gateways = [Wallet(redis_client, catalog.economics) for _ in range(2)]
    for wallet in gateways:
        await wallet.load_scripts()
    await gateways[0].purchase(
        receipt="skew-receipt-1", user="ann", package=catalog.packages["coins_70"], adult=True
    )
    await gateways[0].set_daily_limit("ann", 10)

    async def send(gateway: int, skew_ns: int, key: str) -> Any:
        skewed.skew_ns = skew_ns
        return await gateways[gateway].send_gift(
            sender="ann",
            adult=True,
            creator="cara",
            room="cara",
            gift=catalog.gifts["heart"],
            count=1,
            key=key,
        )

    await send(0, DAY_NS, "skew-gift-ahead")
    await send(1, -DAY_NS, "skew-gift-behind")
    for gateway, skew_ns in ((0, DAY_NS), (1, -DAY_NS)):
        with pytest.raises(Refusal) as refused:
            await send(gateway, skew_ns, f"skew-gift-over-{gateway}")
        assert refused.value.reason is Reason.SPENDING_LIMIT
    now = await redis_ms(redis_client)
    stamp = await redis_client.hmget(keys.SINGLE.wallet("ann"), ["spent_day", "spent_day_coins"])
    assert [int(v or -1) for v in stamp] == [keys.epoch_day(now), 10]
    for wallet in gateways:
        view = await wallet.wallet("ann")  # either gateway reads Redis's day
        assert (view.spent_today, view.spent_week) == (10, 10)
        await wallet.drain()
