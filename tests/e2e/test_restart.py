"""A restarted server still knows which rooms are live, and every balance is intact."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from giftstream.server.app import App
from tests.conftest import JWT_SECRET, WEBHOOK_SECRET
from tests.helpers import AdminClient, Frame, TokenMaker, WsClient
from tests.processes import ServerProcess


@pytest.mark.parametrize("broker", ["memory", "redis"])
async def test_restart_keeps_rooms_live_and_seq_moving_forward(
    make_app: Callable[..., App], tokens: TokenMaker, broker: str
) -> None:
    async with make_app(broker) as node, AdminClient(node.admin_url, WEBHOOK_SECRET) as admin:
        await admin.buy("ann", "coins_700")
        creator, _ = await WsClient.login(node.ws_url, tokens("cara", "creator"))
        await creator.request({"type": "go_live", "title": "Before"})
        ann, _ = await WsClient.login(node.ws_url, tokens("ann"))
        await ann.request({"type": "join", "room": "cara"})
        ok = await ann.request(
            {"type": "gift", "room": "cara", "gift": "heart", "count": 1, "key": "before-restart"}
        )
        seen = await ann.wait_for_room_events(1, kind="gift")
        last_seq = seen[-1]["seq"]
    async with make_app(broker) as node:
        # the memory broker loads the live rooms at start, the Redis broker on first join
        assert ("cara" in node.hub.rooms) is (broker == "memory")
        ann, welcome = await WsClient.login(node.ws_url, tokens("ann"))
        assert welcome["coins"] == 695
        joined = await ann.request({"type": "join", "room": "cara", "since": last_seq})
        assert joined["title"] == "Before" and joined["seq"] >= last_seq
        # memory history died with the process, and the gap is visible; the room's log in
        # Redis outlives any gateway
        assert joined["recovered"] is (broker == "redis")
        replay = await ann.request(
            {"type": "gift", "room": "cara", "gift": "heart", "count": 1, "key": "before-restart"}
        )
        assert replay == ok
        again = await ann.request(
            {"type": "gift", "room": "cara", "gift": "heart", "count": 1, "key": "after-restart"}
        )
        assert again["coins"] == 690
        (event,) = await ann.wait_for_room_events(1, kind="gift")
        assert event["seq"] > last_seq
        await ann.close()


def test_embedded_redis_keeps_balances_across_process_restarts(tmp_path: Path) -> None:
    """No --redis-url: the server's own Redis keeps its AOF in the data dir."""
    import asyncio

    async def buy_and_read(proc: ServerProcess, buy: bool) -> Frame:
        async with AdminClient(proc.admin_url, WEBHOOK_SECRET) as admin:
            if buy:
                await admin.buy("ann", "coins_350", receipt="embedded-receipt")
            client, welcome = await WsClient.login(proc.ws_url, TokenMaker(JWT_SECRET)("ann"))
            await client.close()
            return welcome

    first = ServerProcess(tmp_path / "data").start()
    try:
        assert asyncio.run(buy_and_read(first, True))["coins"] == 350
    finally:
        assert first.stop(signal.SIGINT) == 0
    assert (tmp_path / "data" / "redis").is_dir()
    second = ServerProcess(tmp_path / "data").start()
    try:
        assert asyncio.run(buy_and_read(second, False))["coins"] == 350
    finally:
        assert second.stop() == 0
