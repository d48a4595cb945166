"""Gateways on separate hosts: each `giftstream serve` in its own network namespace with its
own address, all on one Redis in the root namespace reached over a link (not loopback), and
clients reaching each gateway by its address. What §6 promises holds there too: a gift sent
on one host reaches the room's viewers on every host, once, with no seq hole."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from tests.conftest import WEBHOOK_SECRET
from tests.e2e.gateways import Member, gateway, start, stop_all
from tests.e2e.netns import BridgeRedis, hosts
from tests.helpers import AdminClient, TokenMaker, WsClient

ROOM = "cara"


async def test_gateways_on_three_hosts_share_one_room(tmp_path: Path, tokens: TokenMaker) -> None:
    with hosts(3) as network:
        redis = BridgeRedis(tmp_path / "redis", host=network.bridge_address).start()
        gateways = [
            gateway(tmp_path, f"gw{n}", redis.url, host=h.address, prefix=h.prefix)
            for n, h in enumerate(network.hosts)
        ]
        members: list[Member] = []
        creator: WsClient | None = None
        try:
            await start(gateways[0])
            creator, _ = await WsClient.login(gateways[0].ws_url, tokens(ROOM, "creator"))
            assert (await creator.request({"type": "go_live", "title": "Hosts"}))["type"] == "live"
            await start(*gateways[1:])
            own_net = os.readlink("/proc/self/ns/net")
            for proc in gateways:  # each really is on a host of its own
                assert proc.proc is not None
                assert os.readlink(f"/proc/{proc.proc.pid}/ns/net") != own_net

            async with AdminClient(gateways[0].admin_url, WEBHOOK_SECRET) as admin:
                for n in range(2):
                    await admin.buy(f"s{n}", "coins_700")
            senders = [Member(f"s{n}", tokens(f"s{n}"), ROOM) for n in range(2)]
            viewers = [Member(f"v{n}", tokens(f"v{n}"), ROOM) for n in range(3)]
            placed = [(senders[0], 0), (senders[1], 1), *((v, n) for n, v in enumerate(viewers))]
            for member, n in placed:
                await member.join(gateways[n].ws_url, f"gw{n}")
                members.append(member)

            acked: set[str] = set()

            async def send(sender: Member) -> None:
                for n in range(3):
                    acked.add((await sender.gift(f"netns-{sender.user}-{n}"))["event"])

            await asyncio.gather(*(send(s) for s in senders))
            for member in members:
                await member.wait_for_gifts(acked)
                assert member.gift_events() == {event: 1 for event in acked}
                assert member.seq_hole() is None, member.seq_hole()
        finally:
            for member in members:
                await member.close()
            if creator is not None:
                await creator.close()
            stop_all(gateways)
            redis.stop()
