"""The Prometheus endpoint counts what happened: connections, rooms, gifts, coins, Lua
latency, broadcast frames, errors by code, slow-consumer closes."""

from __future__ import annotations

import re

import aiohttp

from giftstream.server.app import App
from tests.helpers import AdminClient, TokenMaker, WsClient


def sample(text: str, name: str, labels: str = "") -> float:
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name}{labels} not in metrics"
    return float(match.group(1))


async def scrape(app: App) -> str:
    async with aiohttp.ClientSession() as http, http.get(app.admin_url + "/metrics") as response:
        assert response.status == 200  # unsigned
        assert response.headers["Content-Type"].startswith("text/plain")
        return await response.text()


async def test_metrics_follow_the_traffic(app: App, tokens: TokenMaker, admin: AdminClient) -> None:
    await admin.buy("ann", "coins_700")
    creator, _ = await WsClient.login(app.ws_url, tokens("cara", "creator"))
    await creator.request({"type": "go_live", "title": "m"})
    ann, _ = await WsClient.login(app.ws_url, tokens("ann"))
    await ann.request({"type": "join", "room": "cara"})
    for i in range(3):
        await ann.request(
            {"type": "gift", "room": "cara", "gift": "heart", "count": 2, "key": f"metrics-key-{i}"}
        )
    await ann.request(
        {"type": "gift", "room": "cara", "gift": "heart", "count": 2, "key": "metrics-key-0"}
    )
    await ann.request(
        {"type": "gift", "room": "cara", "gift": "nope", "count": 1, "key": "metrics-bad-1"}
    )
    await ann.wait_for_room_events(3, kind="gift")
    text = await scrape(app)
    assert sample(text, "giftstream_connections") == 2
    assert sample(text, "giftstream_rooms_live") == 1
    assert sample(text, "giftstream_gifts_settled_total") == 3
    assert sample(text, "giftstream_coins_settled_total") == 30
    assert sample(text, "giftstream_gift_replays_total") == 1
    assert sample(text, "giftstream_lua_seconds_count", '{script="send_gift"}') == 4
    assert sample(text, "giftstream_broadcast_frames_total") >= 1
    assert sample(text, "giftstream_errors_total", '{code="unknown_gift"}') == 1
    assert sample(text, "giftstream_slow_consumer_closes_total") == 0
    assert (
        sample(text, "giftstream_http_requests_total", '{route="/v1/purchases",status="200"}') == 1
    )
    await ann.close()
    await creator.close()
