"""Gifts over real sockets: replies, room events, every refusal, idempotency and races."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

from giftstream.server.app import App
from giftstream.server.money.catalog import Catalog
from giftstream.server.realtime.connection import MAX_GIFTS_IN_FLIGHT
from tests.helpers import AdminClient, TokenMaker, WsClient


@pytest.fixture
async def stage(app: App, tokens: TokenMaker, admin: AdminClient) -> Any:
    """Cara is live; Ann (700 coins) and Bob (a viewer) have joined her room."""
    await admin.buy("ann", "coins_700")
    creator, _ = await WsClient.login(app.ws_url, tokens("cara", "creator", name="Cara"))
    await creator.request({"type": "go_live", "title": "Show"})
    ann, _ = await WsClient.login(app.ws_url, tokens("ann", name="Ann"))
    await ann.request({"type": "join", "room": "cara"})
    bob, _ = await WsClient.login(app.ws_url, tokens("bob", name="Bob"))
    await bob.request({"type": "join", "room": "cara"})
    yield {"creator": creator, "ann": ann, "bob": bob}
    for client in (creator, ann, bob):
        await client.close()


def gift(key: str, gift_id: str = "rose", count: int = 1, room: str = "cara") -> dict[str, Any]:
    return {"type": "gift", "room": room, "gift": gift_id, "count": count, "key": key}


async def test_gift_ok_and_room_event(app: App, stage: Any, admin: AdminClient) -> None:
    ann, bob = stage["ann"], stage["bob"]
    ok = await ann.request(gift("first-gift-key", "heart", 3))
    assert set(ok) == {"type", "key", "event", "coins", "combo"}
    assert ok["type"] == "gift_ok" and ok["key"] == "first-gift-key"
    assert ok["coins"] == 700 - 15 and ok["combo"] == 1
    (event,) = await bob.wait_for_room_events(1, kind="gift")
    ts = event.pop("ts")
    seq = event.pop("seq")
    assert isinstance(ts, int) and seq >= 1
    assert event == {
        "type": "gift",
        "room": "cara",
        "event": ok["event"],
        "sender": {"id": "ann", "name": "Ann"},
        "gift": {"id": "heart", "name": "Heart", "coins": 5, "animation": "anim.heart.v1"},
        "count": 3,
        "combo": 1,
    }
    balance = await ann.request({"type": "balance"})
    assert balance == {"type": "balance", "coins": 685, "diamonds": 0}
    creator_balance = await stage["creator"].request({"type": "balance"})
    assert creator_balance == {"type": "balance", "coins": 0, "diamonds": 7}  # 15 * 50% floored
    status, wallet = await admin.call("GET", "/v1/wallets/cara")
    assert status == 200 and wallet["diamonds"] == 7


async def test_combo_grows_with_the_same_gift(stage: Any) -> None:
    ann = stage["ann"]
    combos = [(await ann.request(gift(f"combo-key-{i}")))["combo"] for i in range(3)]
    assert combos == [1, 2, 3]
    assert (await ann.request(gift("combo-other", "heart")))["combo"] == 1
    assert (await ann.request(gift("combo-back")))["combo"] == 1


@pytest.mark.parametrize(
    ("message", "code"),
    [
        (gift("unknown-gift-k", "unicorn"), "unknown_gift"),
        (gift("count-zero-key", count=0), "bad_count"),
        (gift("count-100-key", count=100), "bad_count"),
        ({**gift("count-float-k"), "count": 1.0}, "bad_count"),
        ({**gift("count-str-key"), "count": "1"}, "bad_count"),
        ({**gift("count-bool-ke"), "count": True}, "bad_count"),
        (gift("short"), "bad_request"),
        (gift("bad key with spaces"), "bad_request"),
        (gift("unknown-room-k", room="nobody"), "unknown_room"),
        (gift("too-expensive", "universe"), "insufficient_coins"),
    ],
)
async def test_gift_refusals(stage: Any, message: dict[str, Any], code: str) -> None:
    ann = stage["ann"]
    reply = await ann.request(message)
    assert reply["type"] == "error" and reply["code"] == code, reply
    assert (await ann.request({"type": "balance"}))["coins"] == 700


async def test_not_joined_and_not_live(
    app: App, stage: Any, tokens: TokenMaker, admin: AdminClient
) -> None:
    await admin.buy("dee", "coins_70")
    dee, _ = await WsClient.login(app.ws_url, tokens("dee"))
    assert (await dee.request(gift("not-joined-key")))["code"] == "not_joined"
    await stage["creator"].request({"type": "end_live"})
    assert (await stage["ann"].request(gift("ended-room-key")))["code"] == "room_not_live"
    assert (await dee.request({"type": "balance"}))["coins"] == 70
    await dee.close()


async def test_creator_cannot_gift_own_room(stage: Any, admin: AdminClient) -> None:
    await admin.buy("cara", "coins_70")
    creator = stage["creator"]
    await creator.request({"type": "join", "room": "cara"})
    assert (await creator.request(gift("self-gift-key")))["code"] == "forbidden"


async def test_minor_cannot_gift(app: App, stage: Any, tokens: TokenMaker) -> None:
    kid, _ = await WsClient.login(app.ws_url, tokens("kid", adult=False))
    await kid.request({"type": "join", "room": "cara"})
    assert (await kid.request(gift("minor-gift-key")))["code"] == "underage"
    await kid.close()


async def test_spending_limit(stage: Any, admin: AdminClient) -> None:
    status, _ = await admin.call("PUT", "/v1/wallets/ann/limit", {"daily_limit": 10})
    assert status == 200
    ann = stage["ann"]
    assert (await ann.request(gift("limit-ok-key", "ice_cream")))["type"] == "gift_ok"
    refused = await ann.request(gift("limit-over-key"))
    assert refused["code"] == "spending_limit"
    assert (await ann.request({"type": "balance"}))["coins"] == 690


async def test_debt_blocks_gifts(
    app: App, tokens: TokenMaker, admin: AdminClient, stage: Any
) -> None:
    await admin.buy("eve", "coins_70", receipt="receipt-eve-1")
    eve, _ = await WsClient.login(app.ws_url, tokens("eve"))
    await eve.request({"type": "join", "room": "cara"})
    assert (await eve.request(gift("eve-spend-key", "doughnut", 2)))["type"] == "gift_ok"
    status, _ = await admin.call("POST", "/v1/refunds", {"receipt": "receipt-eve-1"})
    assert status == 200
    status, wallet = await admin.call("GET", "/v1/wallets/eve")
    assert wallet["coins"] == 0 and wallet["debt"] == 60
    assert (await eve.request(gift("eve-in-debt-key")))["code"] == "insufficient_coins"
    await admin.buy("eve", "coins_70", receipt="receipt-eve-2")  # pays the debt down first
    status, wallet = await admin.call("GET", "/v1/wallets/eve")
    assert wallet["coins"] == 10 and wallet["debt"] == 0
    assert (await eve.request(gift("eve-after-debt")))["type"] == "gift_ok"
    await eve.close()


async def test_key_replayed_on_same_and_other_connection(
    app: App, stage: Any, tokens: TokenMaker
) -> None:
    ann = stage["ann"]
    first = await ann.request(gift("replayed-key-1", "heart", 2))
    again = await ann.request(gift("replayed-key-1", "heart", 2))
    assert again == first
    other, _ = await WsClient.login(app.ws_url, tokens("ann"))
    await other.request({"type": "join", "room": "cara"})
    assert await other.request(gift("replayed-key-1", "heart", 2)) == first
    assert (await ann.request({"type": "balance"}))["coins"] == 690
    # a fresh gift after the replays: an event of theirs would reach Bob before its own
    fresh = await ann.request(gift("replayed-key-2", "heart"))
    events = await stage["bob"].wait_for_room_events(2, kind="gift")
    assert [e["event"] for e in events] == [first["event"], fresh["event"]]
    await other.close()


async def test_key_reused_with_other_params(stage: Any, app: App, tokens: TokenMaker) -> None:
    ann = stage["ann"]
    await ann.request(gift("reused-key-01", "heart", 2))
    for changed in (gift("reused-key-01", "rose", 2), gift("reused-key-01", "heart", 3)):
        assert (await ann.request(changed))["code"] == "key_reused"
    other_creator, _ = await WsClient.login(app.ws_url, tokens("dan", "creator"))
    await other_creator.request({"type": "go_live", "title": "x"})
    await ann.request({"type": "join", "room": "dan"})
    assert (await ann.request(gift("reused-key-01", "heart", 2, room="dan")))["code"] == (
        "key_reused"
    )
    assert (await ann.request({"type": "balance"}))["coins"] == 690
    await other_creator.close()


async def test_same_key_from_two_users_does_not_collide(stage: Any, admin: AdminClient) -> None:
    await admin.buy("bob", "coins_70")
    a = await stage["ann"].request(gift("shared-key-01"))
    b = await stage["bob"].request(gift("shared-key-01"))
    assert a["type"] == b["type"] == "gift_ok" and a["event"] != b["event"]


async def test_same_key_at_once_on_many_connections_debits_once(
    app: App, stage: Any, tokens: TokenMaker
) -> None:
    clients = [stage["ann"]]  # and 7 more: as many as one user may hold by default
    for _ in range(7):
        client, _ = await WsClient.login(app.ws_url, tokens("ann"))
        await client.request({"type": "join", "room": "cara"})
        clients.append(client)
    replies = await asyncio.gather(*(c.request(gift("racing-key-01", "doughnut")) for c in clients))
    assert all(r == replies[0] for r in replies) and replies[0]["type"] == "gift_ok"
    assert (await stage["ann"].request({"type": "balance"}))["coins"] == 670
    for client in clients[1:]:
        await client.close()


async def test_200_concurrent_gifts_end_at_the_exact_balance(
    make_app: Callable[..., App], tokens: TokenMaker
) -> None:
    async with make_app(
        gifts_per_s=1000.0,
        gifts_burst=1000,
        user_gifts_per_s=1000.0,
        user_gifts_burst=1000,
        messages_burst=1000,
        max_connections_per_user=10,
    ) as node:
        async with AdminClient(node.admin_url, "test-webhook-secret-0123456789ab") as admin:
            await admin.buy("ann", "coins_700")
            creator, _ = await WsClient.login(node.ws_url, tokens("cara", "creator"))
            await creator.request({"type": "go_live", "title": "x"})
            clients = []
            for _ in range(10):
                client, _ = await WsClient.login(node.ws_url, tokens("ann"))
                await client.request({"type": "join", "room": "cara"})
                clients.append(client)
            sends = [
                clients[i % 10].request(gift(f"concurrent-{i:04d}", "heart"), timeout=30)
                for i in range(200)
            ]
            replies = await asyncio.gather(*sends)
            accepted = [r for r in replies if r["type"] == "gift_ok"]
            refused = [r for r in replies if r["type"] == "error"]
            assert {r["code"] for r in refused} <= {"insufficient_coins"}
            assert len(accepted) == 140  # 700 coins / 5 per heart
            _, wallet = await admin.call("GET", "/v1/wallets/ann")
            assert wallet["coins"] == 0
            _, wallet = await admin.call("GET", "/v1/wallets/cara")
            assert wallet["diamonds"] == sum(5 * 5000 // 10000 for _ in accepted)
            assert len({r["event"] for r in accepted}) == 140
            for client in [*clients, creator]:
                await client.close()


async def _ann_in_caras_room(
    node: Any, tokens: TokenMaker, package: str = "coins_700"
) -> tuple[WsClient, WsClient]:
    """Cara is live on `node`; Ann bought `package` and joined her room."""
    async with AdminClient(node.admin_url, "test-webhook-secret-0123456789ab") as admin:
        await admin.buy("ann", package)
    creator, _ = await WsClient.login(node.ws_url, tokens("cara", "creator"))
    await creator.request({"type": "go_live", "title": "x"})
    ann, _ = await WsClient.login(node.ws_url, tokens("ann"))
    await ann.request({"type": "join", "room": "cara"})
    return creator, ann


async def test_a_burst_of_gifts_shares_round_trips_and_is_answered_in_order(
    make_app: Callable[..., App], tokens: TokenMaker
) -> None:
    """One connection's gifts settle while it reads on: a burst of 30 shares a few Redis
    writes (one at a time took 30), the replies keep the request order, and a request after
    them (balance) waits until every one is answered."""
    async with make_app(
        gifts_per_s=1000.0,
        gifts_burst=1000,
        user_gifts_per_s=1000.0,
        user_gifts_burst=1000,
        messages_burst=1000,
    ) as node:
        creator, ann = await _ann_in_caras_room(node, tokens)
        writes_before = node.wallet.redis_writes
        for i in range(30):
            await ann.send({**gift(f"burst-gift-{i:03d}", "heart"), "id": f"g{i}"})
        await ann.send({"type": "balance", "id": "after"})
        replies = [await ann.next(timeout=10) for _ in range(31)]
        assert [r.get("id") for r in replies] == [f"g{i}" for i in range(30)] + ["after"]
        assert [r["coins"] for r in replies[:30]] == [700 - 5 * (i + 1) for i in range(30)]
        assert replies[30]["coins"] == 550
        assert node.wallet.redis_writes - writes_before < 15
        for client in (ann, creator):
            await client.close()


async def test_a_burst_past_the_in_flight_cap_and_a_bad_frame_keep_their_order(
    make_app: Callable[..., App], tokens: TokenMaker
) -> None:
    """Past MAX_GIFTS_IN_FLIGHT the next gift waits for those before it, and a bad frame
    after them is refused only once they are all answered: replies in request order."""
    count = MAX_GIFTS_IN_FLIGHT + 8
    async with make_app(
        gifts_per_s=1000.0,
        gifts_burst=1000,
        user_gifts_per_s=1000.0,
        user_gifts_burst=1000,
        messages_burst=1000,
    ) as node:
        creator, ann = await _ann_in_caras_room(node, tokens)
        for i in range(count):
            await ann.send({**gift(f"capped-gift-{i:03d}", "heart"), "id": f"g{i}"})
        await ann.send(b"\x00")  # binary: refused bad_request, with no id to echo
        replies = [await ann.next(timeout=10) for _ in range(count + 1)]
        assert [r.get("id") for r in replies[:count]] == [f"g{i}" for i in range(count)]
        assert [r["coins"] for r in replies[:count]] == [700 - 5 * (i + 1) for i in range(count)]
        assert replies[count]["type"] == "error" and replies[count]["code"] == "bad_request"
        assert (await ann.request({"type": "balance"}))["coins"] == 700 - 5 * count
        for client in (ann, creator):
            await client.close()


async def test_a_gift_flood_is_closed_4429_without_waiting_for_another_frame(
    make_app: Callable[..., App], tokens: TokenMaker
) -> None:
    """The strike that ends the connection is taken by a gift still settling, while the
    reader waits for a frame that never comes: the close must not wait for one."""
    async with make_app(
        gifts_per_s=0.01,
        gifts_burst=1,
        messages_burst=1000,
        flood_strikes=1,
        flood_strikes_per_s=0.01,
    ) as node:
        creator, ann = await _ann_in_caras_room(node, tokens)
        for i in range(3):
            await ann.send({**gift(f"flood-gift-{i:03d}"), "id": f"g{i}"})
        replies = [await ann.next() for _ in range(3)]
        assert [(r["id"], r.get("code")) for r in replies] == [
            ("g0", None),
            ("g1", "rate_limited"),
            ("g2", "rate_limited"),
        ]
        assert await ann.closed_with(timeout=3) == 4429
        await creator.close()


async def test_no_gift_behind_the_flood_decision_is_served(
    make_app: Callable[..., App], tokens: TokenMaker
) -> None:
    """Gifts read before the flood was found, and any frame after it, move no coin. (That a
    gift after it is not served even when the gift budget would admit it again is the pure
    rule, in test_connection.py.)"""
    async with make_app(
        gifts_per_s=0.01,
        gifts_burst=1,
        messages_burst=1000,
        flood_strikes=1,
        flood_strikes_per_s=0.01,
    ) as node:
        creator, ann = await _ann_in_caras_room(node, tokens)
        for i in range(5):  # g2 is the flood; g3 and g4 were read before it was found
            await ann.send({**gift(f"flood-gift-{i:03d}"), "id": f"g{i}"})
        # g2's refusal is written only once the flood is decided: a frame now comes after it
        answered = [(await ann.next())["id"] for _ in range(3)]
        with contextlib.suppress(ConnectionClosed):
            await ann.send({**gift("after-the-flood"), "id": "late"})
        assert await ann.closed_with(timeout=3) == 4429
        answered += [f.get("id") for f in ann.unread if f.get("id")]
        assert answered == ["g0", "g1", "g2"]
        assert (await node.wallet.balance("ann"))[0] == 699
        await creator.close()


async def test_a_burst_of_retries_after_the_room_ended_is_answered_in_order(stage: Any) -> None:
    """Retries that need a Redis read before their answer (the room has ended) go one at a
    time behind the gifts before them: each gets its first result, in the order sent."""
    ann = stage["ann"]
    firsts = [await ann.request(gift(f"retry-burst-{i:03d}")) for i in range(10)]
    await stage["creator"].request({"type": "end_live"})
    for i in range(10):
        await ann.send({**gift(f"retry-burst-{i:03d}"), "id": f"again{i}"})
    await ann.send({**gift("retry-burst-new"), "id": "fresh"})
    replies = [await ann.next() for _ in range(11)]
    assert [r.get("id") for r in replies] == [f"again{i}" for i in range(10)] + ["fresh"]
    assert [{k: v for k, v in r.items() if k != "id"} for r in replies[:10]] == firsts
    assert replies[10]["code"] == "room_not_live"


async def test_key_replayed_after_room_ended_still_answers(stage: Any) -> None:
    ann = stage["ann"]
    ok = await ann.request(gift("ended-replay-key"))
    assert ok["type"] == "gift_ok"
    await stage["creator"].request({"type": "end_live"})
    assert await ann.request(gift("ended-replay-key")) == ok
    assert (await ann.request(gift("ended-replay-key", count=2)))["code"] == "key_reused"
    assert (await ann.request(gift("ended-fresh-key")))["code"] == "room_not_live"
    assert (await ann.request({"type": "balance"}))["coins"] == 699


async def test_gift_rate_limit(make_app: Callable[..., App], tokens: TokenMaker) -> None:
    async with make_app(gifts_per_s=0.01, gifts_burst=2) as node:
        creator, ann = await _ann_in_caras_room(node, tokens, "coins_70")
        replies = [await ann.request(gift(f"rate-limit-{i}")) for i in range(3)]
        assert [r["type"] for r in replies] == ["gift_ok", "gift_ok", "error"]
        assert replies[2]["code"] == "rate_limited" and replies[2]["retryable"] is True
        assert (await ann.request({"type": "balance"}))["coins"] == 68
        for client in (ann, creator):
            await client.close()


async def test_redis_down_is_internal_and_the_key_retry_settles_once(
    tmp_path: Path, catalog: Catalog, tokens: TokenMaker
) -> None:
    from giftstream.server.app import App
    from giftstream.server.embedded_redis import EmbeddedRedis
    from tests.conftest import WEBHOOK_SECRET, make_settings

    redis = EmbeddedRedis(tmp_path / "redis", appendfsync="always").start()
    try:
        async with App(make_settings(redis.url, tmp_path / "data"), catalog) as node:
            async with AdminClient(node.admin_url, WEBHOOK_SECRET) as admin:
                await admin.buy("ann", "coins_70")
            creator, _ = await WsClient.login(node.ws_url, tokens("cara", "creator"))
            await creator.request({"type": "go_live", "title": "x"})
            ann, _ = await WsClient.login(node.ws_url, tokens("ann"))
            await ann.request({"type": "join", "room": "cara"})
            redis.kill()
            down = await ann.request(gift("while-redis-down", "heart"), timeout=15)
            assert down["type"] == "error" and down["code"] == "internal"
            assert down["retryable"] is True
            redis.start()
            ok = await ann.request(gift("while-redis-down", "heart"), timeout=15)
            assert ok["type"] == "gift_ok" and ok["coins"] == 65
            assert await ann.request(gift("while-redis-down", "heart")) == ok
            for client in (ann, creator):
                await client.close()
    finally:
        redis.stop()


async def test_shutdown_finishes_money_in_flight(
    make_app: Callable[..., App], tokens: TokenMaker
) -> None:
    node = make_app(
        gifts_per_s=1000.0,
        gifts_burst=1000,
        user_gifts_per_s=1000.0,
        user_gifts_burst=1000,
        messages_burst=1000,
    )
    await node.__aenter__()
    async with AdminClient(node.admin_url, "test-webhook-secret-0123456789ab") as admin:
        await admin.buy("ann", "coins_700")
    creator, _ = await WsClient.login(node.ws_url, tokens("cara", "creator"))
    await creator.request({"type": "go_live", "title": "x"})
    clients = []
    for _ in range(5):
        client, _ = await WsClient.login(node.ws_url, tokens("ann"))
        await client.request({"type": "join", "room": "cara"})
        clients.append(client)
    for i in range(100):
        await clients[i % 5].send({**gift(f"in-flight-{i:03d}"), "id": f"g{i}"})
    deadline = asyncio.get_running_loop().time() + 30
    while node.wallet.in_flight == 0:  # shut down while some are being settled
        assert asyncio.get_running_loop().time() < deadline, "no gift reached Redis"
        await asyncio.sleep(0)
    await node.shutdown()
    assert node.wallet.in_flight == 0  # nothing was left running
    for client in clients:
        assert await client.closed_with() == 1001
    answered = [f for c in clients for f in c.unread if f.get("id", "").startswith("g")]
    assert {f["type"] for f in answered} <= {"gift_ok", "error"}
    assert {f["code"] for f in answered if f["type"] == "error"} <= {"overloaded"}
    ok_events = {f["event"] for f in answered if f["type"] == "gift_ok"}
    import redis.asyncio as aioredis

    from giftstream.server.ledger.entries import read_entries

    assert node.redis_url is not None
    check = aioredis.Redis.from_url(node.redis_url)
    ledger = {e.event async for e in read_entries(check) if e.kind == "gift"}
    ann_coins = await check.hget("giftstream:wallet:ann", "coins")
    assert ann_coins is not None
    coins = int(ann_coins)
    await check.aclose()
    assert ok_events == ledger  # every settled gift was answered before the 1001
    assert coins == 700 - len(ledger)  # and nothing else moved
