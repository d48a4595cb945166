"""Three `giftstream serve` processes on one Redis are one service (PROTOCOL.md §6): viewers
and senders on every gateway see every acked gift once, in seq order with no hole; a gateway
killed -9 mid-run loses no acked gift, its viewers recover on another gateway with `since`
and leave the viewer counts; the money audit passes."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.conftest import WEBHOOK_SECRET
from tests.e2e.gateways import (
    Member,
    gateway,
    kill9,
    ledger_gifts,
    start,
    stop_all,
)
from tests.helpers import AdminClient, TokenMaker, WsClient
from tests.processes import run_cli

ROOM = "cara"
PER_GATEWAY = 2  # pure viewers on each gateway, besides its sender


async def test_three_gateways_one_room_survive_a_kill9(
    redis_url: str, tmp_path: Path, tokens: TokenMaker
) -> None:
    a, b, c = (gateway(tmp_path, name, redis_url) for name in "abc")
    gateways = {"a": a, "b": b, "c": c}
    members: list[Member] = []
    creator: WsClient | None = None
    try:
        # The room goes live on b, which will survive; a and c start after it (so that even
        # a gateway that only loads live rooms at start knows it: what is tested is delivery).
        await start(b)
        creator, _ = await WsClient.login(b.ws_url, tokens(ROOM, "creator"))
        assert (await creator.request({"type": "go_live", "title": "Three"}))["type"] == "live"
        await start(a, c)

        senders: dict[str, Member] = {}
        async with AdminClient(b.admin_url, WEBHOOK_SECRET) as admin:
            for name in gateways:
                user = f"s{name}"
                await admin.buy(user, "coins_700")
                senders[name] = Member(user, tokens(user), ROOM)
        viewers = {
            name: [Member(f"v{name}{i}", tokens(f"v{name}{i}"), ROOM) for i in range(PER_GATEWAY)]
            for name in gateways
        }
        for name, proc in gateways.items():
            for member in [senders[name], *viewers[name]]:
                await member.join(proc.ws_url, name)
                members.append(member)

        acked: dict[str, str] = {}  # key -> event id, from gift_ok

        async def send(sender: Member, keys: list[str]) -> None:
            for key in keys:
                acked[key] = (await sender.gift(key))["event"]

        # 1. Every sender sends; every member, on every gateway, sees every gift.
        await asyncio.gather(
            *(send(s, [f"gw-{s.user}-1-{n}" for n in range(4)]) for s in senders.values())
        )
        for member in members:
            await member.wait_for_gifts(set(acked.values()))

        # 2. While b and c send, a's sender sends three acked gifts and a fourth whose reply
        #    it never waits for: a is killed -9 as soon as that fourth gift is on the wire.
        sa = senders["a"]
        assert sa.client is not None
        others = asyncio.gather(
            *(send(senders[n], [f"gw-s{n}-2-{i}" for i in range(5)]) for n in ("b", "c"))
        )
        await send(sa, [f"gw-sa-2-{i}" for i in range(3)])
        in_flight = "gw-sa-2-3"
        await sa.client.send(
            {"type": "gift", "room": ROOM, "gift": "heart", "count": 1, "key": in_flight}
        )
        await kill9(a)
        await others
        for member in [sa, *viewers["a"]]:
            assert member.client is not None
            await member.client.closed_with(timeout=30)

        # 3. a's members rejoin elsewhere with `since`; the sender sends its unanswered gift
        #    again with the same key (settled once, whether or not a had settled it).
        for member, name in zip([sa, *viewers["a"]], ["c", "b", "c"], strict=True):
            await member.join(gateways[name].ws_url, name)
        acked[in_flight] = (await sa.gift(in_flight))["event"]
        await asyncio.gather(
            *(send(s, [f"gw-{s.user}-3-{n}" for n in range(3)]) for s in senders.values())
        )

        # Every acked gift is in the ledger, and every gift of the room in the ledger (one
        # per key) reached every member exactly once, with no hole in the room's seqs.
        ledger = {str(g["event"]): str(g["key"]) for g in ledger_gifts(redis_url, ROOM)}
        assert set(acked.values()) <= set(ledger)
        assert sorted(ledger.values()) == sorted(acked)  # one settlement per key
        for member in members:
            await member.wait_for_gifts(set(ledger))
        for member in members:
            seen = member.gift_events()
            assert seen == {event: 1 for event in ledger}, (member.user, seen)
            assert member.seq_hole() is None, member.seq_hole()

        # a's presence expires: every member's viewer count comes to the members that are
        # left (all of them, now on b and c), not that plus a's stale share.
        for member in members:
            await member.wait_for_viewers(len(members))

        audit = await asyncio.to_thread(run_cli, "audit", "--redis-url", redis_url)
        assert audit.returncode == 0 and "audit PASSED" in audit.stdout, audit.stdout + audit.stderr
    finally:
        for member in members:
            await member.close()
        if creator is not None:
            await creator.close()
        stop_all(gateways.values())
