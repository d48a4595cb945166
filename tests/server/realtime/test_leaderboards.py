"""The leaderboards over real sockets: the `leaderboard` request and the signed
`GET /v1/leaderboards/B`, the `leaders` room event (on change, at most once a second, in
seq, one per change across two gateways, under either broker), and boards that survive a
restart."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import Any

import pytest

from giftstream.server.app import App
from tests.conftest import WEBHOOK_SECRET
from tests.helpers import AdminClient, Frame, TokenMaker, WsClient

NAMES = {"ann": "Ann", "bob": "<img src=x onerror=alert(1)>", "cat": 'Cat "C" \\ ü'}


def gift(key: str, gift_id: str = "rose", count: int = 1) -> Frame:
    return {"type": "gift", "room": "cara", "gift": gift_id, "count": count, "key": key}


async def live(node: App, tokens: TokenMaker) -> WsClient:
    creator, _ = await WsClient.login(node.ws_url, tokens("cara", "creator", name="Cara"))
    assert (await creator.request({"type": "go_live", "title": "Show"}))["type"] == "live"
    return creator


async def joined(node: App, tokens: TokenMaker, user: str) -> WsClient:
    client, _ = await WsClient.login(node.ws_url, tokens(user, name=NAMES.get(user, user)))
    assert (await client.request({"type": "join", "room": "cara"}))["type"] == "joined"
    return client


def leaders(client: WsClient) -> list[Frame]:
    return [e for e in client.room_events if e["type"] == "leaders"]


async def top_becomes(client: WsClient, top: list[Frame], timeout: float = 10) -> list[Frame]:
    """Every `leaders` event `client` saw, once the last one carries `top`."""

    def seen() -> list[Frame] | None:
        events = leaders(client)
        return events if events and events[-1]["top"] == top else None

    return await client.wait_until(seen, timeout, f"leaders {top}")


def in_seq(client: WsClient) -> None:
    seqs = [e["seq"] for e in client.room_events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs


def one_per_change(events: list[Frame]) -> None:
    tops = [e["top"] for e in events]
    assert all(a != b for a, b in itertools.pairwise(tops)), tops


async def test_request_and_route_rank_several_senders(app: App, tokens: TokenMaker) -> None:
    creator = await live(app, tokens)
    async with AdminClient(app.admin_url, WEBHOOK_SECRET) as admin:
        for user in NAMES:
            await admin.buy(user, "coins_700")
        clients = {user: await joined(app, tokens, user) for user in NAMES}
        await clients["ann"].request(gift("ann-gift-1", "heart", 3))  # 15
        await clients["bob"].request(gift("bob-gift-1", "heart", 2))  # 10
        await clients["cat"].request(gift("cat-gift-1", "rose", 10))  # 10: ties with bob
        for _ in range(2):  # the replay counts nothing
            await clients["bob"].request(gift("bob-gift-2", "rose", 1))  # bob 11
        expected = [
            {"rank": 1, "user": "ann", "name": "Ann", "coins": 15},
            {"rank": 2, "user": "bob", "name": NAMES["bob"], "coins": 11},
            {"rank": 3, "user": "cat", "name": NAMES["cat"], "coins": 10},
        ]
        creators = [{"rank": 1, "user": "cara", "name": "Cara", "coins": 36}]
        ann = clients["ann"]
        for board, room, entries in [
            ("session", "cara", expected),
            ("week", "cara", expected),
            ("creators_day", None, creators),
        ]:
            ask = {"type": "leaderboard", "board": board, **({"room": room} if room else {})}
            assert await ann.request(ask) == {
                "type": "leaderboard",
                "board": board,
                "room": room,
                "entries": entries,
            }
            path = f"/v1/leaderboards/{board}" + (f"?room={room}" if room else "")
            assert await admin.call("GET", path) == (
                200,
                {"board": board, "room": room, "entries": entries},
            )
        # refusals: bad board or room 400, an unknown room 404, a bad signature 401
        for path in [
            "/v1/leaderboards/month?room=cara",
            "/v1/leaderboards/session",
            "/v1/leaderboards/week?room=a%20b",
            "/v1/leaderboards/creators_day?room=cara",
            "/v1/leaderboards/week?room=cara&room=dan",
        ]:
            status, body = await admin.call("GET", path)
            assert (status, body["error"]) == (400, "bad_request"), path
        status, body = await admin.call("GET", "/v1/leaderboards/session?room=nobody")
        assert (status, body["error"]) == (404, "unknown_room")
        status, body = await admin.call(
            "GET", "/v1/leaderboards/session?room=cara", signature="t=1,v1=00"
        )
        assert (status, body["error"]) == (401, "bad_signature")
        error = await ann.request({"type": "leaderboard", "board": "week", "room": "nobody"})
        assert (error["type"], error["code"]) == ("error", "unknown_room")
        error = await ann.request({"type": "leaderboard", "board": "creators_day", "room": "x"})
        assert (error["type"], error["code"]) == ("error", "bad_request")
    for client in (creator, *clients.values()):
        await client.close()


@pytest.mark.parametrize("broker", ["redis", "memory"])
async def test_leaders_on_change_at_most_once_a_second_in_seq(
    make_app: Callable[..., App], tokens: TokenMaker, broker: str
) -> None:
    async with make_app(broker) as node, AdminClient(node.admin_url, WEBHOOK_SECRET) as admin:
        creator = await live(node, tokens)
        for user in NAMES:
            await admin.buy(user, "coins_700")
        ann, bob, cat = [await joined(node, tokens, user) for user in NAMES]
        watcher = await joined(node, tokens, "viewer")
        await ann.request(gift("ann-gift-1", "heart", 2))  # 10
        first = [{"user": "ann", "name": "Ann", "coins": 10}]
        await top_becomes(watcher, first)
        await bob.request(gift("bob-gift-1", "heart", 3))  # 15: a change within the second
        await cat.request(gift("cat-gift-1"))  # 1
        await ann.request(gift("ann-gift-2"))  # 11
        final = [
            {"user": "bob", "name": NAMES["bob"], "coins": 15},
            {"user": "ann", "name": "Ann", "coins": 11},
            {"user": "cat", "name": NAMES["cat"], "coins": 1},
        ]
        events = await top_becomes(watcher, final)
        assert len(events) in (2, 3), events  # coalesced by the second's wait
        one_per_change(events)
        in_seq(watcher)
        # unchanged: no more `leaders`, whatever else happens in the room; shown by the next
        # change's event coming right after these in the room's seq, with nothing between
        await bob.request({"type": "leave", "room": "cara"})
        await watcher.wait_for_room_events(1, kind="viewers", timeout=10)
        await cat.request(gift("cat-gift-2", "heart", 4))  # 21: cat leads
        marker = [final[2] | {"coins": 21}, final[0], final[1]]
        await top_becomes(watcher, marker)
        assert [e["top"] for e in leaders(watcher)] == [e["top"] for e in events] + [marker]
        assert (await watcher.request({"type": "ping"}))["type"] == "pong"
        for client in (creator, ann, bob, cat, watcher):
            await client.close()


async def test_leaders_are_at_least_a_second_apart(
    make_app: Callable[..., App], tokens: TokenMaker
) -> None:
    """Gifts that change the top every 200 ms: the events' arrivals are about 1 s apart."""
    async with make_app() as node, AdminClient(node.admin_url, WEBHOOK_SECRET) as admin:
        creator = await live(node, tokens)
        await admin.buy("ann", "coins_700")
        ann = await joined(node, tokens, "ann")
        watcher = await joined(node, tokens, "viewer")
        loop = asyncio.get_running_loop()
        arrivals: list[float] = []
        seen = 0
        for i in range(15):
            await ann.request(gift(f"ann-gift-{i:02d}"))
            deadline = loop.time() + 0.2
            while loop.time() < deadline:
                if len(leaders(watcher)) > seen:
                    seen = len(leaders(watcher))
                    arrivals.append(loop.time())
                await asyncio.sleep(0.01)
        await top_becomes(watcher, [{"user": "ann", "name": "Ann", "coins": 15}])
        gaps = [b - a for a, b in itertools.pairwise(arrivals)]
        assert arrivals and all(gap > 0.8 for gap in gaps), gaps
        one_per_change(leaders(watcher))
        for client in (creator, ann, watcher):
            await client.close()


async def test_two_gateways_publish_one_leaders_event_per_change(
    make_app: Callable[..., App], tokens: TokenMaker
) -> None:
    async with (
        make_app() as a,
        make_app() as b,
        AdminClient(a.admin_url, WEBHOOK_SECRET) as admin,
    ):
        creator = await live(a, tokens)
        for user in ("ann", "bob"):
            await admin.buy(user, "coins_700")
        ann, bob = await joined(a, tokens, "ann"), await joined(b, tokens, "bob")
        on_a, on_b = await joined(a, tokens, "va"), await joined(b, tokens, "vb")
        tops = [
            [{"user": "ann", "name": "Ann", "coins": 5}],
            [
                {"user": "bob", "name": NAMES["bob"], "coins": 10},
                {"user": "ann", "name": "Ann", "coins": 5},
            ],
            [
                {"user": "ann", "name": "Ann", "coins": 15},
                {"user": "bob", "name": NAMES["bob"], "coins": 10},
            ],
        ]
        steps = [(ann, "heart", 1), (bob, "heart", 2), (ann, "heart", 2)]
        for i, ((sender, gift_id, count), top) in enumerate(zip(steps, tops, strict=True)):
            await sender.request(gift(f"two-gift-{i}", gift_id, count))
            await top_becomes(on_a, top)
            await top_becomes(on_b, top)
        # a duplicate either gateway wrote of a change would sit before the next change's
        # event in the room's seq: one more change, and nothing else between
        await bob.request(gift("two-gift-3", "heart", 2))  # bob 20
        marker = [
            {"user": "bob", "name": NAMES["bob"], "coins": 20},
            {"user": "ann", "name": "Ann", "coins": 15},
        ]
        await top_becomes(on_a, marker)
        await top_becomes(on_b, marker)
        assert leaders(on_a) == leaders(on_b)
        assert [e["top"] for e in leaders(on_a)] == [*tops, marker]
        for viewer in (on_a, on_b):
            in_seq(viewer)
        for client in (creator, ann, bob, on_a, on_b):
            await client.close()


@pytest.mark.parametrize("broker", ["redis", "memory"])
async def test_the_boards_survive_a_restart(
    make_app: Callable[..., App], tokens: TokenMaker, broker: str
) -> None:
    async with make_app(broker) as node, AdminClient(node.admin_url, WEBHOOK_SECRET) as admin:
        creator = await live(node, tokens)
        await admin.buy("ann", "coins_700")
        ann = await joined(node, tokens, "ann")
        await ann.request(gift("before-restart", "heart", 2))
        for client in (creator, ann):
            await client.close()
    expected = [{"rank": 1, "user": "ann", "name": "Ann", "coins": 10}]
    async with make_app(broker) as node, AdminClient(node.admin_url, WEBHOOK_SECRET) as admin:
        for board in ("session", "week"):
            status, body = await admin.call("GET", f"/v1/leaderboards/{board}?room=cara")
            assert (status, body["entries"]) == (200, expected), board
        ann = await joined(node, tokens, "ann")  # the room is live again after the restart
        reply: Any = await ann.request({"type": "leaderboard", "board": "session", "room": "cara"})
        assert reply["entries"] == expected
        await ann.request(gift("before-restart", "heart", 2))  # a replay: counted once
        await ann.request(gift("after-restart"))
        reply = await ann.request({"type": "leaderboard", "board": "session", "room": "cara"})
        assert reply["entries"] == [{**expected[0], "coins": 11}]
        await ann.close()
