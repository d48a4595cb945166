"""The ops feed is the whole service's (PROTOCOL.md 2.4, 6): two nodes on one Redis, each on
its own ports, and ops watchers on either see every room that opens and the sums of both."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis

from giftstream.server.app import App
from giftstream.server.realtime.hub import LIVE_ROOMS_KEY
from giftstream.server.realtime.registry import GATEWAYS_KEY, Counters, GatewayRegistry
from tests.conftest import WEBHOOK_SECRET
from tests.helpers import AdminClient, Frame, TokenMaker, WsClient

WAIT_S = 15  # generous: the machine is shared


@pytest.fixture
async def clients() -> AsyncIterator[list[WsClient]]:
    """Every client a test opens, closed after it."""
    opened: list[WsClient] = []
    yield opened
    for client in opened:
        await client.close()


async def login(
    node: App, tokens: TokenMaker, opened: list[WsClient], user: str, role: str = "viewer"
) -> WsClient:
    client, _ = await WsClient.login(node.ws_url, tokens(user, role, name=user.title()))
    opened.append(client)
    return client


async def go_live(
    node: App, tokens: TokenMaker, opened: list[WsClient], creator: str, title: str = "Hi"
) -> WsClient:
    client = await login(node, tokens, opened, creator, "creator")
    assert await client.request({"type": "go_live", "title": title}) == {
        "type": "live",
        "room": creator,
    }
    return client


async def watch(
    node: App, tokens: TokenMaker, opened: list[WsClient], user: str, rooms: list[str]
) -> WsClient:
    client = await login(node, tokens, opened, user, "ops")
    watching = await client.request({"type": "watch", "rooms": rooms})
    assert isinstance(watching.pop("live"), list)
    assert watching == {"type": "watching", "rooms": rooms}
    return client


def opened_rooms(client: WsClient) -> list[str]:
    return [f["room"] for f in client.unread if f.get("type") == "room_opened"]


async def stats_where(client: WsClient, what: str, test: Callable[[Frame], bool]) -> Frame:
    """The first stats line that passes `test`; the lines before it are dropped."""

    def pick() -> Frame | None:
        while True:
            line = next((f for f in client.unread if f.get("type") == "stats"), None)
            if line is None:
                return None
            client.unread.remove(line)
            if test(line):
                return line

    return await client.wait_until(pick, WAIT_S, what)


async def test_room_opened_on_one_node_reaches_watchers_on_both_once(
    make_app: Callable[..., App], tokens: TokenMaker, clients: list[WsClient]
) -> None:
    async with make_app() as a, make_app() as b:
        heard_on_b: list[str] = []  # what B's hub would follow for its watchers of "*"
        b.ops.on_room_opened(heard_on_b.append)
        on_a = await watch(a, tokens, clients, "otto", ["*"])
        on_b = await watch(b, tokens, clients, "olga", ["*"])
        only_cara = await watch(b, tokens, clients, "oren", ["cara"])
        await go_live(a, tokens, clients, "cara", "From A")
        expected = {"type": "room_opened", "room": "cara", "creator": "cara", "title": "From A"}
        assert await on_b.expect("room_opened", timeout=WAIT_S) == expected
        assert heard_on_b == ["cara"]  # told in the same turn as B's watchers
        assert await only_cara.expect("room_opened", timeout=WAIT_S) == expected
        assert await on_a.expect("room_opened", timeout=WAIT_S) == expected
        # a later room, opened on B: each watcher of everything sees it after cara's, and
        # no second cara in between
        await go_live(b, tokens, clients, "dan", "From B")
        for watcher in (on_a, on_b):
            await watcher.expect("room_opened", timeout=WAIT_S, room="dan")
            assert opened_rooms(watcher) == []  # taken: cara, then dan; nothing else
        # everything B wrote to the one-room watcher before this pong is in: no dan, no cara
        assert (await only_cara.request({"type": "ping"}))["type"] == "pong"
        assert opened_rooms(only_cara) == []


async def test_stats_are_the_sums_of_every_node(
    make_app: Callable[..., App],
    tokens: TokenMaker,
    clients: list[WsClient],
    redis_client: aioredis.Redis,
) -> None:
    async with make_app() as a, make_app() as b:
        async with AdminClient(a.admin_url, WEBHOOK_SECRET) as admin:
            bought = await admin.buy("ann", "coins_700")
        ops = await watch(b, tokens, clients, "otto", ["*"])
        await go_live(a, tokens, clients, "cara")
        viewer = await login(a, tokens, clients, "ann")
        await go_live(b, tokens, clients, "dan")
        # A holds cara and ann, B holds otto and dan; cara's and dan's rooms are live
        await stats_where(
            ops, "4 connections, 2 rooms", lambda s: (s["connections"], s["rooms"]) == (4, 2)
        )
        assert (await viewer.request({"type": "join", "room": "cara"}))["type"] == "joined"
        ok = await viewer.request(
            {"type": "gift", "room": "cara", "gift": "heart", "count": 2, "key": "service-stats-1"}
        )
        assert ok["type"] == "gift_ok"
        spent = bought["coins"] - ok["coins"]
        line = await stats_where(ops, "A's gift in B's stats", lambda s: s["gifts_per_s"] > 0)
        # one gift of `spent` coins, both rates over the same heartbeats of A
        assert line["coins_per_s"] == pytest.approx(spent * line["gifts_per_s"], rel=0.02)
        beat = await redis_client.hget(GATEWAYS_KEY, a.gateway_id)
        assert beat is not None and b'"gifts":1,"coins":%d' % spent in beat


async def test_a_node_that_stops_cleanly_leaves_the_stats_at_once(
    make_app: Callable[..., App],
    tokens: TokenMaker,
    clients: list[WsClient],
    redis_client: aioredis.Redis,
) -> None:
    """Gone from the hash when it stops, so out of the sums long before the expiry."""
    async with make_app(gateway_expiry_s=600) as b:
        ops = await watch(b, tokens, clients, "otto", ["*"])
        async with make_app() as a:
            await login(a, tokens, clients, "ann")
            await login(a, tokens, clients, "bob")
            await stats_where(ops, "A's 2 and B's 1", lambda s: s["connections"] == 3)
            gone = a.gateway_id
        assert not await redis_client.hexists(GATEWAYS_KEY, gone)
        await stats_where(ops, "B's 1 alone", lambda s: s["connections"] == 1)


async def test_a_gateway_that_died_leaves_the_stats_within_the_expiry(
    make_app: Callable[..., App],
    tokens: TokenMaker,
    clients: list[WsClient],
    redis_client: aioredis.Redis,
) -> None:
    """A gateway killed without a word: its last heartbeat stays in Redis and is never
    rewritten. Readers stop counting it once it is older than the expiry and delete it."""
    async with make_app(gateway_expiry_s=3) as b:
        ops = await watch(b, tokens, clients, "otto", ["*"])
        dead = GatewayRegistry(
            redis_client, "deadgateway1", lambda: Counters(5, 0, 0), [LIVE_ROOMS_KEY]
        )
        await dead.beat()  # its last words
        await stats_where(ops, "the dead one's 5 and B's 1", lambda s: s["connections"] == 6)
        await stats_where(ops, "B's 1 alone", lambda s: s["connections"] == 1)
        assert await redis_client.hkeys(GATEWAYS_KEY) == [b.gateway_id.encode()]


async def test_a_node_can_start_after_rooms_opened_and_reads_only_what_follows(
    make_app: Callable[..., App], tokens: TokenMaker, clients: list[WsClient]
) -> None:
    """The ops log outlives the nodes; a node started later does not replay it."""
    async with make_app() as a:
        on_a = await watch(a, tokens, clients, "otto", ["*"])
        await go_live(a, tokens, clients, "cara")
        await on_a.expect("room_opened", timeout=WAIT_S, room="cara")  # in the log by now
        async with make_app() as b:
            on_b = await watch(b, tokens, clients, "olga", ["*"])
            await go_live(a, tokens, clients, "dan")
            await on_b.expect("room_opened", timeout=WAIT_S, room="dan")
            assert opened_rooms(on_b) == []
