"""Rooms over real sockets: going live, joining, seq, viewer counts, `since` and the ops feed."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
import redis.asyncio as aioredis

from giftstream.server.app import App
from giftstream.server.metrics import Metrics
from giftstream.server.money import keys
from giftstream.server.money.keys import KeySpace
from giftstream.server.realtime.broker import MemoryBroker
from giftstream.server.realtime.fanout import Fanout
from giftstream.server.realtime.hub import Hub
from giftstream.server.realtime.ops import OpsFeed
from giftstream.server.realtime.opslog import OpsLog
from giftstream.server.realtime.registry import Counters, GatewayRegistry
from tests.conftest import JWT_SECRET
from tests.helpers import AdminClient, Frame, TokenMaker, WsClient


async def live_room(
    app: App, tokens: TokenMaker, creator: str = "cara", title: str = "Hi"
) -> WsClient:
    client, _ = await WsClient.login(app.ws_url, tokens(creator, "creator", name=creator.title()))
    assert await client.request({"type": "go_live", "title": title}) == {
        "type": "live",
        "room": creator,
    }
    return client


async def test_go_live_join_leave_exact_replies(app: App, tokens: TokenMaker) -> None:
    creator = await live_room(app, tokens, title="Morning show")
    viewer, _ = await WsClient.login(app.ws_url, tokens("ann"))
    joined = await viewer.request({"type": "join", "room": "cara"})
    assert joined == {
        "type": "joined",
        "room": "cara",
        "creator": "cara",
        "title": "Morning show",
        "viewers": 1,
        "seq": 0,
    }
    assert await viewer.request({"type": "leave", "room": "cara"}) == {
        "type": "left",
        "room": "cara",
    }
    again = await viewer.request({"type": "leave", "room": "cara"})
    assert again["type"] == "error" and again["code"] == "not_joined"
    await viewer.close()
    await creator.close()


async def test_join_errors(app: App, tokens: TokenMaker) -> None:
    viewer, _ = await WsClient.login(app.ws_url, tokens("ann"))
    unknown = await viewer.request({"type": "join", "room": "nobody"})
    assert unknown["type"] == "error" and unknown["code"] == "unknown_room"
    creator = await live_room(app, tokens)
    assert (await creator.request({"type": "end_live"})) == {"type": "ended", "room": "cara"}
    ended = await viewer.request({"type": "join", "room": "cara"})
    assert ended["code"] == "room_not_live"
    bad = await viewer.request({"type": "join", "room": "has space"})
    assert bad["code"] == "bad_request"
    await viewer.close()
    await creator.close()


async def test_only_creators_go_live_and_only_ops_watch(app: App, tokens: TokenMaker) -> None:
    viewer, _ = await WsClient.login(app.ws_url, tokens("ann"))
    assert (await viewer.request({"type": "go_live", "title": "x"}))["code"] == "forbidden"
    assert (await viewer.request({"type": "end_live"}))["code"] == "forbidden"
    assert (await viewer.request({"type": "watch", "rooms": ["*"]}))["code"] == "forbidden"
    creator, _ = await WsClient.login(app.ws_url, tokens("cara", "creator"))
    not_live = await creator.request({"type": "end_live"})
    assert not_live["code"] == "room_not_live"
    await viewer.close()
    await creator.close()


async def test_end_live_tells_every_viewer(app: App, tokens: TokenMaker) -> None:
    creator = await live_room(app, tokens)
    viewers = [(await WsClient.login(app.ws_url, tokens(f"v{i}")))[0] for i in range(3)]
    for viewer in viewers:
        await viewer.request({"type": "join", "room": "cara"})
    assert await creator.request({"type": "end_live"}) == {"type": "ended", "room": "cara"}
    for viewer in viewers:
        events = await viewer.wait_for_room_events(1, kind="room_ended")
        assert events[-1]["room"] == "cara" and events[-1]["seq"] >= 1
        gone = await viewer.request({"type": "leave", "room": "cara"})
        assert gone["code"] == "not_joined"
        await viewer.close()
    await creator.close()


async def test_viewer_counts_are_announced_on_change_with_seq(app: App, tokens: TokenMaker) -> None:
    creator = await live_room(app, tokens)
    await creator.request({"type": "join", "room": "cara"})
    first, _ = await WsClient.login(app.ws_url, tokens("ann"))
    await first.request({"type": "join", "room": "cara"})
    second, _ = await WsClient.login(app.ws_url, tokens("bob"))
    await second.request({"type": "join", "room": "cara"})
    events = await creator.wait_for_room_events(1, timeout=3, kind="viewers")
    assert events[-1]["count"] == 3
    await second.close()
    events = await creator.wait_for_room_events(2, timeout=3, kind="viewers")
    assert events[-1]["count"] == 2
    seqs = [e["seq"] for e in creator.room_events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    await first.close()
    await creator.close()


async def announced_until(client: WsClient, count: int) -> list[int]:
    """Every viewer count announced to `client` so far, once the last one is `count`."""

    def announced() -> list[int] | None:
        counts = [e["count"] for e in client.room_events if e["type"] == "viewers"]
        return counts if counts and counts[-1] == count else None

    return await client._wait_for(announced, 5.0, f"a viewers event of {count}")


async def test_viewer_counts_count_users_not_tabs(app: App, tokens: TokenMaker) -> None:
    creator = await live_room(app, tokens)
    await creator.request({"type": "join", "room": "cara"})
    tabs = [(await WsClient.login(app.ws_url, tokens("ann")))[0] for _ in range(2)]
    joined = [await tab.request({"type": "join", "room": "cara"}) for tab in tabs]
    assert [j["viewers"] for j in joined] == [2, 2]  # cara and ann, whose second tab adds none
    bob, _ = await WsClient.login(app.ws_url, tokens("bob"))
    assert (await bob.request({"type": "join", "room": "cara"}))["viewers"] == 3
    before = await announced_until(creator, 3)
    assert await tabs[0].request({"type": "leave", "room": "cara"}) == {
        "type": "left",
        "room": "cara",
    }
    await bob.close()  # one user fewer; ann leaving in one tab took none away
    after_bob = await announced_until(creator, 2)
    assert after_bob[len(before) :] == [2]
    await tabs[1].close()  # ann's last tab: ann is gone
    assert (await announced_until(creator, 1))[len(after_bob) :] == [1]
    await tabs[0].close()
    await creator.close()


async def test_since_recovers_missed_events_in_order(
    app: App, tokens: TokenMaker, admin: AdminClient
) -> None:
    await admin.buy("ann", "coins_700")
    creator = await live_room(app, tokens)
    sender, _ = await WsClient.login(app.ws_url, tokens("ann"))
    await sender.request({"type": "join", "room": "cara"})
    watcher, _ = await WsClient.login(app.ws_url, tokens("bob"))
    joined = await watcher.request({"type": "join", "room": "cara"})
    for i in range(3):
        ok = await sender.request(
            {"type": "gift", "room": "cara", "gift": "rose", "count": 1, "key": f"key-before-{i}"}
        )
        assert ok["type"] == "gift_ok"
    seen = await watcher.wait_for_room_events(3, kind="gift")
    last_seen = seen[-1]["seq"]
    await watcher.close()
    for i in range(4):
        await sender.request(
            {"type": "gift", "room": "cara", "gift": "rose", "count": 1, "key": f"key-missed-{i}"}
        )
    await sender.wait_for_room_events(7, kind="gift")
    back, _ = await WsClient.login(app.ws_url, tokens("bob"))
    rejoined = await back.request({"type": "join", "room": "cara", "since": last_seen})
    assert rejoined["recovered"] is True
    assert rejoined["seq"] > joined["seq"]
    missed = await back.wait_for_room_events(4, kind="gift")
    assert [e["key"] if "key" in e else e["event"] for e in missed]
    recovered = [e["seq"] for e in back.room_events if e["seq"] <= rejoined["seq"]]
    assert recovered == list(range(last_seen + 1, rejoined["seq"] + 1))
    for client in (back, sender, creator):
        await client.close()


async def test_since_past_history_says_not_recovered(make_app: Callable[..., App]) -> None:
    tokens = TokenMaker(JWT_SECRET)
    async with make_app(history_size=4) as node:
        creator = await live_room(node, tokens)
        viewer, _ = await WsClient.login(node.ws_url, tokens("ann"))
        await viewer.request({"type": "join", "room": "cara"})
        room = node.hub.rooms["cara"]
        for n in range(10):

            def viewers(seq: int, n: int = n) -> Frame:
                return {"type": "viewers", "room": "cara", "seq": seq, "count": n}

            node.hub.publish(room, viewers)
        await node.hub.flush()
        await viewer.wait_for_room_events(10)
        late, _ = await WsClient.login(node.ws_url, tokens("bob"))
        rejoined = await late.request({"type": "join", "room": "cara", "since": 1})
        assert rejoined["recovered"] is False
        events = await late.wait_for_room_events(4)
        assert [e["seq"] for e in events] == list(range(rejoined["seq"] - 3, rejoined["seq"] + 1))
        current = await late.request({"type": "join", "room": "cara", "since": rejoined["seq"]})
        assert current["recovered"] is True
        for client in (late, viewer, creator):
            await client.close()


async def test_ops_feed(app: App, tokens: TokenMaker, admin: AdminClient) -> None:
    await admin.buy("ann", "coins_700")
    ops, _ = await WsClient.login(app.ws_url, tokens("otto", "ops"))
    assert await ops.request({"type": "watch", "rooms": ["*"]}) == {
        "type": "watching",
        "rooms": ["*"],
        "live": [],
    }
    creator = await live_room(app, tokens, title="Live!")
    opened = await ops.expect("room_opened")
    assert opened == {"type": "room_opened", "room": "cara", "creator": "cara", "title": "Live!"}
    viewer, _ = await WsClient.login(app.ws_url, tokens("ann"))
    await viewer.request({"type": "join", "room": "cara"})
    ok = await viewer.request(
        {"type": "gift", "room": "cara", "gift": "heart", "count": 2, "key": "ops-feed-gift"}
    )
    gifts = await ops.wait_for_room_events(1, kind="gift")
    assert gifts[0]["event"] == ok["event"] and gifts[0]["count"] == 2
    # a line sent before the viewer came says 2 connections: wait for one that counts it
    stats = await ops.expect("stats", timeout=10, rooms=1, connections=3)
    assert set(stats) == {
        *("type", "ts", "rooms", "connections", "gifts_per_s", "coins_per_s", "refusals")
    }
    for client in (viewer, creator, ops):
        await client.close()


async def test_watching_one_room_only(app: App, tokens: TokenMaker) -> None:
    ops, _ = await WsClient.login(app.ws_url, tokens("otto", "ops"))
    await ops.request({"type": "watch", "rooms": ["dan"]})
    cara = await live_room(app, tokens, "cara")
    dan = await live_room(app, tokens, "dan")
    opened = await ops.expect("room_opened")
    assert opened["room"] == "dan"
    await cara.request({"type": "end_live"})
    await dan.request({"type": "end_live"})
    ended = await ops.wait_for_room_events(1, kind="room_ended")
    assert [e["room"] for e in ended] == ["dan"]
    for client in (cara, dan, ops):
        await client.close()


async def test_shutdown_ends_the_tick_even_if_its_cancel_is_lost(
    make_app: Callable[..., App], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shutdown cancels the tick loop and waits for it. On Python 3.11 a cancel that lands
    as an `asyncio.wait_for` completes (redis-py wraps each command's send in one) is
    swallowed; a loop that ended on the cancel alone then ticked on, and shutdown waited
    for ever. Here the tick's flush swallows the cancel, and shutdown still ends."""
    node = make_app()
    await node.__aenter__()
    real_flush = node.hub.flush
    in_tick = asyncio.Event()
    calls = 0

    async def flush_that_loses_the_cancel() -> None:
        nonlocal calls
        calls += 1
        if calls > 1:  # shutdown's own last flush, and any later tick
            await real_flush()
            return
        in_tick.set()
        try:
            await asyncio.Event().wait()  # until cancelled
        except asyncio.CancelledError:
            return  # lost, as wait_for loses it

    monkeypatch.setattr(node.hub, "flush", flush_that_loses_the_cancel)
    async with asyncio.timeout(30):
        await in_tick.wait()
    async with asyncio.timeout(30):
        await node.shutdown()


def bare_hub(redis: aioredis.Redis, keyspace: KeySpace) -> Hub:
    """A hub over the memory broker naming keys by `keyspace`, without a running server."""
    metrics = Metrics()
    registry = GatewayRegistry(redis, "g", lambda: Counters(0, 0, 0), keyspace.all_live_rooms())
    ops = OpsFeed(Fanout(1 << 20, metrics), OpsLog(redis), registry)
    return Hub(
        redis, MemoryBroker(redis, history_size=16, keyspace=keyspace), ops.fanout, ops, metrics
    )


async def test_live_rooms_are_kept_per_partition_and_read_from_every_one(
    redis_client: aioredis.Redis,
) -> None:
    """With a cluster's KeySpace (hash-tagged names work on one Redis too) each room goes into
    its creator's partition's live set, in the room's slot (room_open); a restarted node
    restores the rooms of every partition, and an end takes a room out of its own set."""
    space = KeySpace(partitions=4, cluster=True)
    creators = [
        next(f"c{i}" for i in range(200) if space.partition(f"c{i}") == p) for p in range(4)
    ]
    hub = bare_hub(redis_client, space)
    for creator in creators:
        await hub.go_live(creator, "Show", 1000)
    for creator in creators:
        assert await redis_client.smembers(space.live_rooms_of(creator)) == {creator.encode()}
    assert not await redis_client.exists(keys.LIVE_ROOMS)  # no service-wide set on a cluster
    fresh = bare_hub(redis_client, space)
    assert await fresh.restore() == 4 and sorted(fresh.rooms) == sorted(creators)
    await fresh.end_live(creators[2])
    assert not await redis_client.exists(space.live_rooms_of(creators[2]))
    assert await redis_client.scard(space.live_rooms_of(creators[1])) == 1
    assert (await fresh.ops.registry.survey()).rooms == 3
