"""A small mixed workload over real sockets and the signed API: purchases, gifts (some
refused, some replayed), a refund into debt, a limit, a payout. Tests reuse it to put money
in motion before they audit, restart or tamper."""

from __future__ import annotations

import asyncio
from pathlib import Path

from giftstream.server.app import App
from giftstream.server.money.catalog import load_catalog
from tests.conftest import JWT_SECRET, WEBHOOK_SECRET, make_settings
from tests.helpers import AdminClient, TokenMaker, WsClient


async def run_mixed_workload(redis_url: str, data_dir: Path) -> dict[str, int]:
    """Returns how many gifts were accepted and refused."""
    tokens = TokenMaker(JWT_SECRET)
    accepted = refused = 0
    settings = make_settings(
        redis_url,
        data_dir,
        gifts_per_s=500.0,
        gifts_burst=500,
        user_gifts_per_s=500.0,
        user_gifts_burst=500,
        messages_burst=500,
    )
    async with (
        App(settings, load_catalog()) as node,
        AdminClient(node.admin_url, WEBHOOK_SECRET) as admin,
    ):
        creators = []
        for name in ("cara", "dan"):
            client, _ = await WsClient.login(node.ws_url, tokens(name, "creator"))
            await client.request({"type": "go_live", "title": f"{name} live"})
            creators.append(client)
        viewers = []
        for i in range(6):
            user = f"viewer{i}"
            await admin.buy(user, "coins_3500" if i % 2 else "coins_70", receipt=f"wl-rc-{i:04d}")
            client, _ = await WsClient.login(node.ws_url, tokens(user))
            for room in ("cara", "dan"):
                await client.request({"type": "join", "room": room})
            viewers.append(client)
        await admin.call("PUT", "/v1/wallets/viewer1/limit", {"daily_limit": 500})
        gifts = ("rose", "heart", "doughnut", "corgi", "whale")
        for round_ in range(8):
            sends = []
            for i, client in enumerate(viewers):
                gift = gifts[(i + round_) % len(gifts)]
                key = f"wl-{i}-{round_}"
                message = {
                    "type": "gift",
                    "room": ("cara", "dan")[round_ % 2],
                    "gift": gift,
                    "count": 1 + round_ % 3,
                    "key": key,
                }
                sends.append(client.request(message))
                if round_ % 3 == 0:
                    sends.append(client.request(message))  # a replay
            for reply in await asyncio.gather(*sends):
                if reply["type"] == "gift_ok":
                    accepted += 1
                else:
                    refused += 1
        status, _ = await admin.call("POST", "/v1/refunds", {"receipt": "wl-rc-0003"})
        assert status == 200
        await admin.buy("viewer3", "coins_70", receipt="wl-rc-3b")
        await admin.buy("cara", "coins_17500", receipt="wl-rc-cara")
        status, wallet = await admin.call("GET", "/v1/wallets/cara")
        if wallet["diamonds"] >= node.catalog.economics.payout_min_diamonds:
            await admin.call(
                "POST",
                "/v1/payouts",
                {"creator": "cara", "diamonds": wallet["diamonds"], "key": "wl-payout-1"},
            )
        for client in [*viewers, *creators]:
            await client.close()
    return {"accepted": accepted, "refused": refused}
