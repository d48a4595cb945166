"""What the pages ask of the WebSocket beyond v1: the `catalog` request, the live rooms in
`watching` and the refusals by code in `stats` (PROTOCOL.md r2 2.2 and 2.4)."""

from __future__ import annotations

from giftstream.server.app import App
from tests.helpers import AdminClient, TokenMaker, WsClient


async def test_catalog_lists_every_gift_in_catalog_order(app: App, tokens: TokenMaker) -> None:
    client, _ = await WsClient.login(app.ws_url, tokens("ann"))
    reply = await client.request({"type": "catalog"})
    assert reply == {
        "type": "catalog",
        "gifts": [
            {"id": g.id, "name": g.name, "coins": g.coins, "animation": g.animation}
            for g in app.catalog.gifts.values()
        ],
    }
    assert reply["gifts"][0] == {
        "id": "rose",
        "name": "Rose",
        "coins": 1,
        "animation": "anim.rose.v1",
    }
    await client.close()


async def test_watching_lists_the_rooms_live_before_the_watch(app: App, tokens: TokenMaker) -> None:
    creator, _ = await WsClient.login(app.ws_url, tokens("cara", "creator", name="Cara"))
    await creator.request({"type": "go_live", "title": "Cooking <b>night</b>"})
    viewer, _ = await WsClient.login(app.ws_url, tokens("ann"))
    await viewer.request({"type": "join", "room": "cara"})
    ops, _ = await WsClient.login(app.ws_url, tokens("otto", "ops"))
    watching = await ops.request({"type": "watch", "rooms": ["*"]})
    seq = watching["live"][0]["seq"]  # the room's seq then (its `viewers` events may be in it)
    assert isinstance(seq, int) and seq >= 0
    assert watching == {
        "type": "watching",
        "rooms": ["*"],
        "live": [
            {
                "room": "cara",
                "creator": "cara",
                "title": "Cooking <b>night</b>",
                "viewers": 1,
                "coins": 0,  # no gift yet this session (tests/server/realtime/test_room_coins.py)
                "seq": seq,
            }
        ],
    }
    assert await ops.request({"type": "watch", "rooms": ["dan"]}) == {
        "type": "watching",
        "rooms": ["dan"],
        "live": [],
    }
    for client in (ops, viewer, creator):
        await client.close()


async def test_stats_count_refusals_by_code(
    app: App, tokens: TokenMaker, admin: AdminClient
) -> None:
    creator, _ = await WsClient.login(app.ws_url, tokens("cara", "creator"))
    await creator.request({"type": "go_live"})
    viewer, _ = await WsClient.login(app.ws_url, tokens("ann"))  # no coins
    await viewer.request({"type": "join", "room": "cara"})
    gift = {"type": "gift", "room": "cara", "gift": "lion", "count": 1}
    for key in ("refused-0001", "refused-0002"):
        refused = await viewer.request({**gift, "key": key})
        assert refused["code"] == "insufficient_coins"
    assert (await viewer.request({"type": "join", "room": "nobody"}))["code"] == "unknown_room"
    ops, _ = await WsClient.login(app.ws_url, tokens("otto", "ops"))
    await ops.request({"type": "watch", "rooms": ["*"]})

    def counted() -> dict[str, int] | None:
        for frame in ops.unread:
            if frame.get("type") == "stats" and frame["refusals"].get("unknown_room") == 1:
                refusals: dict[str, int] = frame["refusals"]
                return refusals
        return None

    refusals = await ops.wait_until(counted, 10, "a stats line with the refusals")
    assert refusals == {"insufficient_coins": 2, "unknown_room": 1}
    for client in (ops, viewer, creator):
        await client.close()
