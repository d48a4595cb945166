"""A room's coins this live session over real sockets: `watching.live[].coins`, counted by the
money scripts with the session board (a replayed key once), reset when the room opens again,
and on a Redis Cluster counted when credit.lua credits the creator."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest

from giftstream.server.app import App
from giftstream.server.money.catalog import Catalog
from tests.conftest import WEBHOOK_SECRET, make_settings
from tests.helpers import AdminClient, Frame, TokenMaker, WsClient


def gift(key: str, gift_id: str = "rose", count: int = 1) -> Frame:
    return {"type": "gift", "room": "cara", "gift": gift_id, "count": count, "key": key}


async def live_entry(ops: WsClient, room: str = "cara") -> Frame:
    """The room's entry in a fresh `watching` reply."""
    reply = await ops.request({"type": "watch", "rooms": ["*"]})
    entries: list[Frame] = [live for live in reply["live"] if live["room"] == room]
    (entry,) = entries
    return entry


async def send_gifts(node: App, tokens: TokenMaker) -> tuple[WsClient, list[WsClient]]:
    """Cara live; ann gifts 10 + 1 (and replays her first key), bob 25: 36 coins."""
    creator, _ = await WsClient.login(node.ws_url, tokens("cara", "creator", name="Cara"))
    assert (await creator.request({"type": "go_live", "title": "Show"}))["type"] == "live"
    async with AdminClient(node.admin_url, WEBHOOK_SECRET) as admin:
        for user in ("ann", "bob"):
            await admin.buy(user, "coins_700")
    senders = []
    for user in ("ann", "bob"):
        client, _ = await WsClient.login(node.ws_url, tokens(user))
        assert (await client.request({"type": "join", "room": "cara"}))["type"] == "joined"
        senders.append(client)
    ann, bob = senders
    first = await ann.request(gift("ann-coins-1", "heart", 2))
    assert first["type"] == "gift_ok"
    assert (await ann.request(gift("ann-coins-1", "heart", 2)))["event"] == first["event"]
    assert (await ann.request(gift("ann-coins-2")))["type"] == "gift_ok"
    assert (await bob.request(gift("bob-coins-1", "heart", 5)))["type"] == "gift_ok"
    return creator, senders


@pytest.mark.parametrize("broker", ["redis", "memory"])
async def test_watching_carries_the_rooms_coins_this_session(
    make_app: Callable[..., App], tokens: TokenMaker, broker: str
) -> None:
    async with make_app(broker) as node:
        creator, senders = await send_gifts(node, tokens)
        ops, _ = await WsClient.login(node.ws_url, tokens("otto", "ops"))
        gifts = await senders[0].wait_for_room_events(3, kind="gift", timeout=10)
        entry = await live_entry(ops)
        assert entry["coins"] == 36
        # every gift counted in `coins` is at or below `seq`: a dashboard adds only later ones
        assert entry["seq"] >= max(g["seq"] for g in gifts)
        # a new session starts at 0, and counts its own gifts only
        assert (await creator.request({"type": "end_live"}))["type"] == "ended"
        assert (await creator.request({"type": "go_live", "title": "Again"}))["type"] == "live"
        assert (await live_entry(ops))["coins"] == 0
        for client in senders:
            assert (await client.request({"type": "join", "room": "cara"}))["type"] == "joined"
        assert (await senders[1].request(gift("bob-coins-2", "heart")))["type"] == "gift_ok"
        assert (await live_entry(ops))["coins"] == 5
        for client in (ops, creator, *senders):
            await client.close()


async def test_watching_carries_the_rooms_coins_on_a_cluster(
    cluster_url: str, data_dir: Path, catalog: Catalog, tokens: TokenMaker
) -> None:
    """On a cluster the creator's shard counts the coins when it credits (up to ~1 s after
    `gift_ok`): the figure reaches 36 and stays there (the replay never counts)."""
    settings = dataclasses.replace(make_settings(cluster_url, data_dir), partitions=16)
    async with App(settings, catalog) as node:
        creator, senders = await send_gifts(node, tokens)
        ops, _ = await WsClient.login(node.ws_url, tokens("otto", "ops"))
        gifts = await senders[0].wait_for_room_events(3, kind="gift", timeout=20)
        entry = await live_entry(ops)
        # the three gift events are appended by the same credit.lua steps that count the coins
        assert entry["coins"] == 36 and entry["seq"] >= max(g["seq"] for g in gifts)
        assert (await creator.request({"type": "end_live"}))["type"] == "ended"
        assert (await creator.request({"type": "go_live", "title": "Again"}))["type"] == "live"
        assert (await live_entry(ops))["coins"] == 0
        for client in (ops, creator, *senders):
            await client.close()
