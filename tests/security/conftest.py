"""Attack tests' parts: the internal API over a real socket on a real Wallet and Redis, with
the money clock a test moves (standing in for Redis's TIME) and the payout rules set."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest
import redis.asyncio as aioredis

from giftstream.server.metrics import Metrics
from giftstream.server.money.admin import AdminServer, build_admin_app
from giftstream.server.money.catalog import Catalog
from giftstream.server.money.wallet import Wallet
from tests.server.money.test_admin import SECRET, Api, Clock

HOLD_DAYS = 7
PAYOUT_CAP = 15_000  # diamonds a creator may be paid a UTC day in these tests
DAY_MS = 86_400_000


@dataclass
class Platform:
    """What an attack test drives: the API as the payments backend calls it, the wallet as
    the WebSocket sessions call it, and the money clock."""

    api: Api
    wallet: Wallet
    clock: Clock
    catalog: Catalog

    async def gift(self, sender: str, creator: str, gift_id: str, count: int, key: str) -> int:
        """A gift as a session sends it; the sender's coins after."""
        settled = await self.wallet.send_gift(
            sender=sender,
            adult=True,
            creator=creator,
            room=creator,
            gift=self.catalog.gifts[gift_id],
            count=count,
            key=key,
        )
        return settled.coins


@pytest.fixture
async def platform(redis_client: aioredis.Redis, catalog: Catalog) -> AsyncIterator[Platform]:
    clock = Clock()
    wallet = Wallet(
        redis_client,
        catalog.economics,
        payout_hold_days=HOLD_DAYS,
        payout_daily_cap=PAYOUT_CAP,
        clock=clock,
    )
    await wallet.load_scripts()
    app = build_admin_app(
        wallet=wallet,
        catalog=catalog,
        redis=redis_client,
        webhook_secret=SECRET,
        metrics=Metrics(),
        clock=clock,
    )
    async with AdminServer(app, "127.0.0.1", 0) as server, aiohttp.ClientSession() as http:
        yield Platform(Api(http, server.url, clock), wallet, clock, catalog)
    await wallet.drain()
