"""A gift whose reply was lost reaches its room and the ops feed exactly once: with the
memory broker, published by the replay of its key when its first publication never happened;
with the Redis broker, written to the room's log by the settlement itself, and never by a
replay."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from giftstream.protocol.codec import gift_json, sender_json
from giftstream.server.app import App
from giftstream.server.money import keys
from giftstream.server.money.wallet import GiftRoom
from tests.conftest import WEBHOOK_SECRET
from tests.helpers import AdminClient, Frame, TokenMaker, WsClient


def gift(key: str) -> Frame:
    return {"type": "gift", "room": "cara", "gift": "rose", "count": 1, "key": key}


async def audience(app: App, tokens: TokenMaker) -> tuple[WsClient, WsClient, WsClient]:
    """The live room `cara`, a viewer of it and an ops watcher of every room."""
    creator, _ = await WsClient.login(app.ws_url, tokens("cara", "creator"))
    await creator.request({"type": "go_live", "title": "t"})
    viewer, _ = await WsClient.login(app.ws_url, tokens("bob"))
    await viewer.request({"type": "join", "room": "cara"})
    ops, _ = await WsClient.login(app.ws_url, tokens("otto", "ops"))
    await ops.request({"type": "watch", "rooms": ["*"]})
    return creator, viewer, ops


async def times_seen(client: WsClient, event: str, marker: str) -> int:
    """How often `event` reached the client, counted once the later gift `marker` has (room
    events arrive in order, so nothing of before is still on its way)."""

    def gift_events() -> list[Frame]:
        return [e for e in client.room_events if e["type"] == "gift"]

    await client.wait_until(
        lambda: True if any(e["event"] == marker for e in gift_events()) else None,
        10,
        f"gift {marker}",
    )
    return sum(1 for e in gift_events() if e["event"] == event)


def room_of_a_dead_gateway(app: App) -> GiftRoom:
    """What the gateway that settled the gift passed its script: with the Redis broker, the
    room's log, which the settlement wrote the event to; with the memory broker, none (it
    died before its hub could publish)."""
    rose = app.catalog.gifts["rose"]
    return GiftRoom(
        record=keys.SINGLE.room("cara"),
        log=app.broker.gift_log("cara"),
        room_json=b'"cara"',
        sender_json=sender_json("ann", "Ann"),
        gift_json=gift_json(rose.id, rose.name, rose.coins, rose.animation),
        log_size=app.settings.limits.history_size,
    )


@pytest.mark.parametrize("broker", ["memory", "redis"])
@pytest.mark.parametrize("retry_joined", [True, False], ids=["joined", "not-joined"])
async def test_a_gift_settled_but_never_answered_reaches_its_room_once(
    make_app: Callable[..., App], tokens: TokenMaker, retry_joined: bool, broker: str
) -> None:
    async with make_app(broker) as app, AdminClient(app.admin_url, WEBHOOK_SECRET) as admin:
        await settled_but_never_answered(app, tokens, admin, retry_joined)


async def settled_but_never_answered(
    app: App, tokens: TokenMaker, admin: AdminClient, retry_joined: bool
) -> None:
    await admin.buy("ann", "coins_700")
    creator, viewer, ops = await audience(app, tokens)
    sender, _ = await WsClient.login(app.ws_url, tokens("ann"))
    if retry_joined:
        await sender.request({"type": "join", "room": "cara"})
    # a gateway settled it in Redis and died before publishing it or replying
    settled = await app.wallet.send_gift(
        sender="ann",
        adult=True,
        creator="cara",
        room="cara",
        gift=app.catalog.gifts["rose"],
        count=1,
        key="lost-reply-0001",
        in_room=room_of_a_dead_gateway(app),
    )
    # the client retries on a live gateway, then once more
    for _ in range(2):
        ok = await sender.request(gift("lost-reply-0001"))
        assert ok["type"] == "gift_ok" and ok["event"] == settled.event, ok
        assert ok["coins"] == 699
    if not retry_joined:
        await sender.request({"type": "join", "room": "cara"})
    marker = await sender.request(gift("marker-00001"))
    for watcher in (viewer, ops):
        assert await times_seen(watcher, settled.event, marker["event"]) == 1
    for client in (sender, ops, viewer, creator):
        await client.close()


async def test_a_retry_after_a_received_gift_ok_shows_no_second_event(
    app: App, tokens: TokenMaker, admin: AdminClient
) -> None:
    await admin.buy("ann", "coins_700")
    creator, viewer, ops = await audience(app, tokens)
    sender, _ = await WsClient.login(app.ws_url, tokens("ann"))
    await sender.request({"type": "join", "room": "cara"})
    first = await sender.request(gift("delivered-0001"))
    again = await sender.request(gift("delivered-0001"))
    assert again == first
    other, _ = await WsClient.login(app.ws_url, tokens("ann"))  # a reconnect retries too
    assert await other.request(gift("delivered-0001")) == first
    marker = await sender.request(gift("marker-00001"))
    for watcher in (viewer, ops):
        assert await times_seen(watcher, first["event"], marker["event"]) == 1
    for client in (other, sender, ops, viewer, creator):
        await client.close()
