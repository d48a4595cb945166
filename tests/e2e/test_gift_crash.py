"""A gateway killed -9 right after it settled a gift, before it could publish anything, still
leaves the gift's room event in the room: the gift script writes the event in the same atomic
step as the debit (issue 13's design), so a viewer on another gateway sees every gift the
ledger has, exactly once, and never one it has not."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import WEBHOOK_SECRET
from tests.e2e.gateways import Member, gateway, kill9, ledger_gifts, start, stop_all
from tests.helpers import AdminClient, TokenMaker, WsClient

ROOM = "cara"
ROUNDS = 4  # even rounds kill as soon as gift_ok arrives, odd ones without waiting for it


async def test_a_kill9_after_settling_never_loses_the_room_event(
    redis_url: str, tmp_path: Path, tokens: TokenMaker
) -> None:
    a, b = gateway(tmp_path, "a", redis_url), gateway(tmp_path, "b", redis_url)
    viewer = Member("vb", tokens("vb"), ROOM)
    marker = Member("sb", tokens("sb"), ROOM)
    creator: WsClient | None = None
    sender: WsClient | None = None
    try:
        await start(b)
        creator, _ = await WsClient.login(b.ws_url, tokens(ROOM, "creator"))
        assert (await creator.request({"type": "go_live", "title": "Crash"}))["type"] == "live"
        async with AdminClient(b.admin_url, WEBHOOK_SECRET) as admin:
            await admin.buy("sa", "coins_700")
            await admin.buy("sb", "coins_700")
        await viewer.join(b.ws_url, "b")
        await marker.join(b.ws_url, "b")

        sent: list[str] = []
        for round_no in range(ROUNDS):
            await start(a)  # the same ports each round, as a restarted host would have
            sender, _ = await WsClient.login(a.ws_url, tokens("sa"))
            assert (await sender.request({"type": "join", "room": ROOM}))["type"] == "joined"
            key = f"crash-round-{round_no}"
            sent.append(key)
            gift = {"type": "gift", "room": ROOM, "gift": "heart", "count": 1, "key": key}
            if round_no % 2 == 0:
                ok = await sender.request(gift)
                assert ok["type"] == "gift_ok", ok
            else:
                await sender.send(gift)
            await kill9(a)
            await sender.closed_with(timeout=30)
            sender = None

        # A last gift on b marks the end: once the viewer has it, everything before it has
        # been delivered (one room, one seq order).
        last = (await marker.gift("crash-marker"))["event"]
        await viewer.wait_for_gifts({last})

        ledger = {str(g["event"]): str(g["key"]) for g in ledger_gifts(redis_url, ROOM)}
        settled = {key for key in ledger.values() if key in sent}
        assert {sent[n] for n in range(0, ROUNDS, 2)} <= settled  # the acked ones, at least
        await viewer.wait_for_gifts(set(ledger))
        assert viewer.gift_events() == {event: 1 for event in ledger}
        assert viewer.seq_hole() is None, viewer.seq_hole()
    finally:
        for client in (sender, creator):
            if client is not None:
                await client.close()
        await viewer.close()
        await marker.close()
        stop_all([a, b])
