"""Gateways that share one Redis are one service (PROTOCOL.md §6), shown with two nodes in one
test process, each with its own ports, on the test Redis: gifts cross gateways in seq order,
`since` recovers on another gateway, viewer counts are summed and a silent gateway's drop out,
a room ends from any gateway or when its creator has been away, and the money script writes a
gift's event, byte for byte the protocol's, only into a live room."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from giftstream.protocol.codec import encode_event, gift_json, sender_json
from giftstream.protocol.events import GiftEvent
from giftstream.server.app import App
from giftstream.server.money import keys
from giftstream.server.money.catalog import Economics, Gift, Package
from giftstream.server.money.refusal import Refusal
from giftstream.server.money.wallet import GiftRoom, Wallet
from tests.conftest import WEBHOOK_SECRET
from tests.helpers import AdminClient, Frame, TokenMaker, WsClient
from tests.model.keyspace import snapshot

Nodes = tuple[App, App]


@pytest.fixture
async def two_gateways(make_app: Callable[..., App]) -> AsyncIterator[Callable[..., Any]]:
    """`a, b = await two_gateways(**limits)`: two running nodes on the one test Redis."""
    async with AsyncExitStack() as stack:

        async def start(a_limits: dict[str, Any] | None = None, **limits: Any) -> Nodes:
            a = await stack.enter_async_context(make_app(**{**limits, **(a_limits or {})}))
            b = await stack.enter_async_context(make_app(**limits))
            return a, b

        yield start


async def go_live(node: App, tokens: TokenMaker, creator: str = "cara") -> WsClient:
    client, _ = await WsClient.login(node.ws_url, tokens(creator, "creator", name="Cara"))
    assert await client.request({"type": "go_live", "title": "Show"}) == {
        "type": "live",
        "room": creator,
    }
    return client


async def viewer(node: App, tokens: TokenMaker, user: str, room: str = "cara") -> WsClient:
    client, _ = await WsClient.login(node.ws_url, tokens(user, name=user.title()))
    joined = await client.request({"type": "join", "room": room})
    assert joined["type"] == "joined", joined
    return client


def gift(key: str, count: int = 1) -> Frame:
    return {"type": "gift", "room": "cara", "gift": "rose", "count": count, "key": key}


async def counted(client: WsClient, count: int) -> list[int]:
    """The viewer counts announced to `client`, once the last one is `count`."""

    def announced() -> list[int] | None:
        counts = [e["count"] for e in client.room_events if e["type"] == "viewers"]
        return counts if counts and counts[-1] == count else None

    return await client.wait_until(announced, 20, f"a viewers event of {count}")


async def test_a_gift_on_one_gateway_reaches_viewers_on_the_other_in_seq_order(
    two_gateways: Callable[..., Any], tokens: TokenMaker
) -> None:
    a, b = await two_gateways()
    async with AdminClient(a.admin_url, WEBHOOK_SECRET) as admin:
        await admin.buy("ann", "coins_700")
    creator = await go_live(a, tokens)
    sender = await viewer(a, tokens, "ann")
    far = await viewer(b, tokens, "bob")  # b loads the room on this first join
    sent = [await sender.request(gift(f"cross-gateway-{i}")) for i in range(5)]
    assert all(ok["type"] == "gift_ok" for ok in sent)
    got = await far.wait_for_room_events(5, kind="gift")
    assert [e["event"] for e in got] == [ok["event"] for ok in sent]
    assert got[0]["sender"] == {"id": "ann", "name": "Ann"} and got[0]["room"] == "cara"
    # every event of the room, gifts and viewer counts alike, in one seq order, no gap
    near = await sender.wait_for_room_events(5, kind="gift")
    assert [e["seq"] for e in near] == [e["seq"] for e in got]
    seqs = [e["seq"] for e in far.room_events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    for client in (far, sender, creator):
        await client.close()


async def test_since_on_another_gateway_recovers_what_was_written_on_the_first(
    two_gateways: Callable[..., Any], tokens: TokenMaker
) -> None:
    a, b = await two_gateways()
    async with AdminClient(a.admin_url, WEBHOOK_SECRET) as admin:
        await admin.buy("ann", "coins_700")
    creator = await go_live(a, tokens)
    sender = await viewer(a, tokens, "ann")
    watcher = await viewer(a, tokens, "bob")
    await sender.request(gift("before-drop-1"))
    (seen,) = await watcher.wait_for_room_events(1, kind="gift")
    await watcher.close()  # bob drops; gifts go on on gateway a
    missed = [await sender.request(gift(f"while-away-{i}")) for i in range(3)]
    await sender.wait_for_room_events(4, kind="gift")
    back, _ = await WsClient.login(b.ws_url, tokens("bob"))  # and comes back on gateway b
    rejoined = await back.request({"type": "join", "room": "cara", "since": seen["seq"]})
    assert rejoined["recovered"] is True and rejoined["seq"] > seen["seq"]
    replay = await back.wait_until(
        lambda: [e for e in back.room_events if e["seq"] <= rejoined["seq"]] or None, 10, "replay"
    )
    assert [e["seq"] for e in replay] == list(range(seen["seq"] + 1, rejoined["seq"] + 1))
    replayed_gifts = [e["event"] for e in replay if e["type"] == "gift"]
    assert replayed_gifts == [ok["event"] for ok in missed]
    for client in (back, sender, creator):
        await client.close()


async def test_since_beyond_what_this_gateway_has_read_recovers(
    two_gateways: Callable[..., Any], tokens: TokenMaker
) -> None:
    """A viewer who saw newer events on gateway a than gateway b has read yet (b reads once a
    tick; here its tick is an hour) rejoins on b with `since`: b reads the log first."""
    a, b = await two_gateways(a_limits={"tick_s": 0.01}, tick_s=3600.0)
    async with AdminClient(a.admin_url, WEBHOOK_SECRET) as admin:
        await admin.buy("ann", "coins_700")
    creator = await go_live(a, tokens)
    sender = await viewer(a, tokens, "ann")
    there = await viewer(b, tokens, "cy")  # b follows the room from here on
    watcher = await viewer(a, tokens, "bob")
    await sender.request(gift("seen-on-a"))
    (seen,) = await watcher.wait_for_room_events(1, kind="gift")
    await watcher.close()
    missed = [await sender.request(gift(f"not-yet-read-by-b-{i}")) for i in range(2)]
    await sender.wait_for_room_events(3, kind="gift")
    back, _ = await WsClient.login(b.ws_url, tokens("bob"))
    rejoined = await back.request({"type": "join", "room": "cara", "since": seen["seq"]})
    assert rejoined["recovered"] is True, rejoined
    replay = await back.wait_for_room_events(2, kind="gift")
    assert [e["event"] for e in replay] == [ok["event"] for ok in missed]
    # b's own viewer got what b read for it, in seq order, with no gap
    got = await there.wait_for_room_events(3, kind="gift")
    assert [e["event"] for e in got[1:]] == [ok["event"] for ok in missed]
    seqs = [e["seq"] for e in there.room_events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    for client in (back, there, sender, creator):
        await client.close()


async def test_viewer_counts_are_summed_over_gateways(
    two_gateways: Callable[..., Any], tokens: TokenMaker
) -> None:
    a, b = await two_gateways()
    creator = await go_live(a, tokens)
    ann = await viewer(a, tokens, "ann")
    bob = await viewer(b, tokens, "bob")
    dan = await viewer(b, tokens, "dan")
    await counted(ann, 3)
    await counted(bob, 3)  # one count, the same on both gateways
    dan_again, _ = await WsClient.login(a.ws_url, tokens("dan"))
    joined = await dan_again.request({"type": "join", "room": "cara"})
    assert joined["viewers"] == 4  # per gateway, users; over gateways, summed
    await bob.close()
    await counted(ann, 3)
    await counted(dan, 3)
    for client in (dan_again, dan, ann, creator):
        await client.close()


async def test_a_gateway_that_stops_refreshing_drops_out_of_the_counts(
    two_gateways: Callable[..., Any], tokens: TokenMaker
) -> None:
    """Gateway b writes its viewers once and never refreshes them, as if killed: they leave
    the count when they expire, though b's socket is still open."""
    a, b = await two_gateways(
        a_limits={"presence_ttl_s": 15.0, "presence_refresh_s": 5.0},
        presence_ttl_s=1.0,
        presence_refresh_s=3600.0,
    )
    creator = await go_live(a, tokens)
    ann = await viewer(a, tokens, "ann")
    bob = await viewer(b, tokens, "bob")
    await counted(ann, 2)
    await counted(ann, 1)  # b's field expired: only a's viewer is counted
    for client in (bob, ann, creator):
        await client.close()


async def test_end_live_from_another_gateway(
    two_gateways: Callable[..., Any], tokens: TokenMaker
) -> None:
    a, b = await two_gateways()
    creator = await go_live(a, tokens)
    on_a = await viewer(a, tokens, "ann")
    on_b = await viewer(b, tokens, "bob")
    again, _ = await WsClient.login(b.ws_url, tokens("cara", "creator"))  # cara on b as well
    assert await again.request({"type": "end_live"}) == {"type": "ended", "room": "cara"}
    for client in (on_a, on_b):
        (ended,) = await client.wait_for_room_events(1, kind="room_ended")
        assert ended["room"] == "cara"
        seqs = [e["seq"] for e in client.room_events]
        assert ended["seq"] == max(seqs)  # the room's last event
        assert (await client.request({"type": "leave", "room": "cara"}))["code"] == "not_joined"
    assert "cara" not in a.hub.rooms and "cara" not in b.hub.rooms
    assert (await again.request({"type": "end_live"}))["code"] == "room_not_live"
    late = (await WsClient.login(a.ws_url, tokens("dan")))[0]
    assert (await late.request({"type": "join", "room": "cara"}))["code"] == "room_not_live"
    for client in (late, again, on_b, on_a, creator):
        await client.close()


async def test_a_room_whose_creator_is_away_is_ended_by_any_gateway(
    two_gateways: Callable[..., Any], tokens: TokenMaker, redis_client: aioredis.Redis
) -> None:
    a, b = await two_gateways(room_idle_s=0.5, creator_seen_s=0.1)
    creator = await go_live(a, tokens)
    watcher = await viewer(b, tokens, "bob")
    # while cara is connected (to a), a keeps her room seen
    first = int(await redis_client.hget(keys.SINGLE.room("cara"), "creator_seen") or 0)
    await watcher.wait_until(
        lambda: True if watcher.room_events else None, 10, "the first viewers event"
    )
    await creator.close()  # cara's gateway no longer sees her
    (ended,) = await watcher.wait_for_room_events(1, timeout=20, kind="room_ended")
    assert ended["room"] == "cara"
    record = await redis_client.hgetall(keys.SINGLE.room("cara"))
    assert record[b"live"] == b"0" and int(record[b"creator_seen"]) >= first
    assert not await redis_client.sismember(keys.LIVE_ROOMS, "cara")
    await watcher.close()


async def test_a_connected_creator_keeps_their_room_seen(
    two_gateways: Callable[..., Any], tokens: TokenMaker, redis_client: aioredis.Redis
) -> None:
    a, b = await two_gateways(room_idle_s=30.0, creator_seen_s=0.05)
    creator = await go_live(a, tokens)
    watcher = await viewer(b, tokens, "bob")
    first = int(await redis_client.hget(keys.SINGLE.room("cara"), "creator_seen") or 0)

    async def seen_since() -> bool:
        return int(await redis_client.hget(keys.SINGLE.room("cara"), "creator_seen") or 0) > first

    # wait on Redis telling of writes to the room's record, not on a clock
    await redis_client.config_set("notify-keyspace-events", "Kh")
    try:
        async with redis_client.pubsub() as pubsub:
            await pubsub.subscribe(f"__keyspace@0__:{keys.SINGLE.room('cara')}")
            async with asyncio.timeout(20):
                while not await seen_since():
                    await pubsub.get_message(timeout=None)
    finally:
        await redis_client.config_set("notify-keyspace-events", "")
    assert await redis_client.hget(keys.SINGLE.room("cara"), "live") == b"1"
    for client in (watcher, creator):
        await client.close()


# ---- the money script and the room --------------------------------------------------------

ZOE = 'Zoë "the" <b>ünicode</b> \\ / 🎁'
ODD_GIFT = Gift(id="odd.gift:1", name='Odd "gift" / \u2028 é', coins=3, animation="odd.webp")


async def a_wallet(redis_client: aioredis.Redis) -> Wallet:
    wallet = Wallet(redis_client, Economics(), payout_hold_days=0)
    await wallet.load_scripts()
    await wallet.purchase(
        receipt="rc-zoe", user="zoe", package=Package("p", 100, 100, "USD"), adult=True
    )
    return wallet


def in_cara(sender: str, name: str, gift: Gift) -> GiftRoom:
    return GiftRoom(
        record=keys.SINGLE.room("cara"),
        log=keys.SINGLE.room_log("cara"),
        room_json=orjson.dumps("cara"),
        sender_json=sender_json(sender, name),
        gift_json=gift_json(gift.id, gift.name, gift.coins, gift.animation),
        log_size=16,
    )


async def test_the_script_writes_the_protocol_gift_event_byte_for_byte(
    redis_client: aioredis.Redis,
) -> None:
    wallet = await a_wallet(redis_client)
    await redis_client.hset(keys.SINGLE.room("cara"), mapping={"live": "1", "seq": 41})
    settled = await wallet.send_gift(
        sender="zoe",
        adult=True,
        creator="cara",
        room="cara",
        gift=ODD_GIFT,
        count=3,
        key="odd-gift-key-1",
        in_room=in_cara("zoe", ZOE, ODD_GIFT),
    )
    logged: Any = await redis_client.xrange(keys.SINGLE.room_log("cara"))
    ((entry_id, fields),) = logged
    expected = GiftEvent(
        room="cara",
        seq=42,
        event=settled.event,
        sender_id="zoe",
        sender_name=ZOE,
        gift_id=ODD_GIFT.id,
        gift_name=ODD_GIFT.name,
        gift_coins=ODD_GIFT.coins,
        animation=ODD_GIFT.animation,
        count=3,
        combo=settled.combo,
        ts=settled.ts,
    )
    assert fields == {b"t": b"gift", b"d": encode_event(expected.as_dict())}
    assert entry_id == b"0-42" and await redis_client.hget(keys.SINGLE.room("cara"), "seq") == b"42"
    # a replay of the key settles nothing and writes no second event
    again = await wallet.send_gift(
        sender="zoe",
        adult=True,
        creator="cara",
        room="cara",
        gift=ODD_GIFT,
        count=3,
        key="odd-gift-key-1",
        in_room=in_cara("zoe", ZOE, ODD_GIFT),
    )
    assert again.replayed and await redis_client.xlen(keys.SINGLE.room_log("cara")) == 1
    await wallet.drain()


@pytest.mark.parametrize("record", [{"live": "0"}, {}], ids=["ended", "never-live"])
@pytest.mark.parametrize("log", [True, False], ids=["redis-broker", "memory-broker"])
async def test_a_gift_to_a_room_not_live_is_refused_and_changes_nothing(
    redis_client: aioredis.Redis, record: dict[str, str], log: bool
) -> None:
    wallet = await a_wallet(redis_client)
    if record:
        await redis_client.hset(keys.SINGLE.room("cara"), mapping=dict[Any, Any](record))
    room = in_cara("zoe", "Zoe", ODD_GIFT)
    if not log:
        room = GiftRoom(room.record, "", b"", b"", b"", 0)  # what the memory broker passes
    before = await snapshot(redis_client)
    with pytest.raises(Refusal) as refused:
        await wallet.send_gift(
            sender="zoe",
            adult=True,
            creator="cara",
            room="cara",
            gift=ODD_GIFT,
            count=1,
            key="not-live-key-1",
            in_room=room,
        )
    assert refused.value.code == "room_not_live"
    assert await snapshot(redis_client) == before
    await wallet.drain()


async def test_a_gift_into_a_room_ended_elsewhere_is_refused_room_not_live(
    two_gateways: Callable[..., Any], tokens: TokenMaker
) -> None:
    """The sender on gateway a, the end on gateway b: once b's end is delivered to a, the
    gift is refused there; had it raced the end, the script would have refused it."""
    a, b = await two_gateways()
    async with AdminClient(a.admin_url, WEBHOOK_SECRET) as admin:
        await admin.buy("ann", "coins_700")
    creator = await go_live(a, tokens)
    sender = await viewer(a, tokens, "ann")
    again, _ = await WsClient.login(b.ws_url, tokens("cara", "creator"))
    await again.request({"type": "end_live"})
    await sender.wait_for_room_events(1, kind="room_ended")
    refused = await sender.request(gift("after-the-end-1"))
    assert refused["code"] == "room_not_live"
    welcome = (await sender.request({"type": "balance"}))["coins"]
    assert welcome == 700
    for client in (again, sender, creator):
        await client.close()


async def test_memory_broker_gateway_still_serves_a_room(
    make_app: Callable[..., App], tokens: TokenMaker
) -> None:
    """`--broker memory`: the one-process path, gifts published by the hub."""
    async with make_app("memory") as node, AdminClient(node.admin_url, WEBHOOK_SECRET) as admin:
        await admin.buy("ann", "coins_700")
        creator = await go_live(node, tokens)
        sender = await viewer(node, tokens, "ann")
        ok = await sender.request(gift("memory-broker-1"))
        (event,) = await sender.wait_for_room_events(1, kind="gift")
        assert event["event"] == ok["event"]
        assert not await node.redis.exists(
            keys.SINGLE.room_log("cara")
        )  # nothing in Redis but the bound
        for client in (sender, creator):
            await client.close()
