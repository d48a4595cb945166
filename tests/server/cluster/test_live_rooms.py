"""The room scripts on a real Redis Cluster: a room's live-room set is in its creator's
partition, so room_open and room_publish touch one slot; the one service-wide set of a single
Redis would be in another slot, which a cluster refuses."""

from __future__ import annotations

import pytest
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisClusterException

from giftstream.server.money import keys
from giftstream.server.money.keys import KeySpace
from giftstream.server.scripts import script_source

SPACE = KeySpace(partitions=16, cluster=True)


async def test_room_scripts_touch_the_rooms_own_live_set(cluster_url: str) -> None:
    client = RedisCluster.from_url(cluster_url)
    opened = script_source("room_open")
    try:
        for creator in ("ann", "cara"):
            room_keys = [
                SPACE.room(creator),
                SPACE.live_rooms_of(creator),
                SPACE.board_session(creator),
            ]
            reply = await client.eval(opened, 3, *room_keys, creator, "Show", 1000, "")
            assert reply[0] == 1
        cara = [
            SPACE.room("cara"),
            SPACE.room_log("cara"),
            SPACE.room_presence("cara"),
            SPACE.live_rooms_of("cara"),
            SPACE.board_session("cara"),
            SPACE.board_names("cara"),
        ]
        publish = script_source("room_publish")
        reply = await client.eval(publish, 6, *cara, 16, "cara", '"cara"', 0, "end")
        assert reply[1] == 1  # ended by this call
        live: set[bytes | str] = set()
        for live_set in SPACE.all_live_rooms():
            live |= await client.smembers(live_set)
        assert live == {b"ann"}
        with pytest.raises(RedisClusterException, match="same key slot"):
            await client.eval(
                opened,
                3,
                SPACE.room("dan"),
                keys.LIVE_ROOMS,
                SPACE.board_session("dan"),
                "dan",
                "",
                1000,
                "",
            )
    finally:
        await client.aclose()
