"""A room whose shard lost its last events (asynchronous replication, then a failover) must not
number new events with seqs its gateways already delivered (PROTOCOL.md §6: seq order, no
gap): every gateway's `room_publish` lifts the room's numbering above what it delivered. On a
real Redis Cluster, the lost tail first made by hand on the room's master, then by a failover
that promotes a replica which never received it."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from contextlib import AsyncExitStack

import orjson
import pytest
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError, ResponseError

from giftstream.server.money.keys import KeySpace
from giftstream.server.realtime.broker import MakeEvent
from giftstream.server.realtime.redis_broker import RedisBroker
from giftstream.server.redis_cluster import cluster_client
from giftstream.server.scripts import script_source
from tests.cluster import RedisClusterProcesses

SPACE = KeySpace(partitions=16, cluster=True)
ROOM = "cara"
FLUSH_ATTEMPTS = 5


class Seqs:
    """A subscriber that keeps the seqs delivered to it, in order."""

    def __init__(self) -> None:
        self.seqs: list[int] = []

    def __call__(self, room_id: str, encoded: Sequence[bytes]) -> None:
        self.seqs.extend(orjson.loads(data)["seq"] for data in encoded)


def viewers(count: int) -> MakeEvent:
    return lambda seq: {"type": "viewers", "room": ROOM, "seq": seq, "count": count}


async def open_room(client: RedisCluster) -> None:
    keys_ = [SPACE.room(ROOM), SPACE.live_rooms_of(ROOM), SPACE.board_session(ROOM)]
    reply = await client.eval(script_source("room_open"), 3, *keys_, ROOM, "Show", 1000, "")
    assert reply[0] == 1


async def gateway(
    stack: AsyncExitStack, client: RedisCluster, name: str
) -> tuple[RedisBroker, Seqs]:
    broker = await stack.enter_async_context(
        RedisBroker(client, history_size=16, gateway_id=name, keyspace=SPACE)
    )
    got = Seqs()
    await broker.subscribe(ROOM, got)
    return broker, got


def roll_back(redis_cluster: RedisClusterProcesses, client: RedisCluster, to: int) -> None:
    """The tail a failover loses, on the room's master: the log's entries above `to` gone and
    the record's `seq` back to it (its `seq_reserved` as the replica had it, kept)."""
    master = redis_cluster.node_of(client, SPACE.room(ROOM))
    with master.client() as node:
        log = SPACE.room_log(ROOM)
        lost = [entry_id for entry_id, _ in node.xrange(log, f"(0-{to}", "+")]
        assert lost
        node.xdel(log, *lost)
        node.hset(SPACE.room(ROOM), "seq", to)


async def publish(client: RedisCluster, delivered: int | str, *ops: str) -> list[int]:
    """room_publish as a gateway calls it, with `delivered` as given."""
    keys_ = [
        SPACE.room(ROOM),
        SPACE.room_log(ROOM),
        SPACE.room_presence(ROOM),
        SPACE.live_rooms_of(ROOM),
        SPACE.board_session(ROOM),
        SPACE.board_names(ROOM),
    ]
    source = script_source("room_publish")
    reply = await client.eval(source, 6, *keys_, 16, ROOM, '"cara"', delivered, *ops)
    return [int(x) for x in reply]


async def test_the_lift_only_raises_and_a_bad_seq_writes_nothing(cluster_url: str) -> None:
    client = cluster_client(cluster_url)
    try:
        await open_room(client)
        record = SPACE.room(ROOM)
        await client.hset(record, "seq_reserved", 9)
        before = await client.hgetall(record)
        assert (await publish(client, 4, "v"))[3:] == [9, -1, 9]  # below: nothing lifted
        assert await client.hgetall(record) == before
        for bad in ("4.0", "-1", "", "9007199254740993"):
            with pytest.raises(ResponseError, match="ARGV\\[4\\]"):
                await publish(client, bad, "e", "viewers", '{"seq":', "}")
            assert await client.hgetall(record) == before
            assert await client.xlen(SPACE.room_log(ROOM)) == 0
        assert (await publish(client, 12))[3:] == [12, -1, 9]  # lifted, with no op at all
        assert await client.hget(record, "seq_reserved") == b"12"
    finally:
        await client.aclose()


async def test_a_room_stepped_back_is_numbered_above_what_its_gateways_delivered(
    cluster_url: str, redis_cluster: RedisClusterProcesses
) -> None:
    client = cluster_client(cluster_url)
    try:
        await open_room(client)
        async with AsyncExitStack() as stack:
            a, got_a = await gateway(stack, client, "a")
            b, got_b = await gateway(stack, client, "b")
            for n in range(1, 6):
                a.publish(ROOM, viewers(n))
            await a.flush()
            await b.flush()
            assert got_a.seqs == got_b.seqs == [1, 2, 3, 4, 5]

            roll_back(redis_cluster, client, to=3)
            # b's once-a-second call (presence, no event) lifts the room above its 5 ...
            b.announce_viewers(ROOM)
            await b.flush()
            assert await client.hget(SPACE.room(ROOM), "seq_reserved") == b"5"
            # ... so a gateway that joins now, and never saw 4 and 5, numbers on from 6
            c, got_c = await gateway(stack, client, "c")
            c.publish(ROOM, viewers(6))
            await c.flush()
            await a.flush()
            await b.flush()
            assert got_c.seqs == [6]
            assert got_a.seqs == got_b.seqs == [1, 2, 3, 4, 5, 6]

            roll_back(redis_cluster, client, to=5)
            # the lift and the next event in the same call: a's event is 7, not 6 again
            a.publish(ROOM, viewers(7))
            await a.flush()
            await b.flush()
            await c.flush()
            assert got_a.seqs == got_b.seqs == [1, 2, 3, 4, 5, 6, 7]
            assert got_c.seqs == [6, 7]
            assert await client.hget(SPACE.room(ROOM), "seq_reserved") == b"6"
            assert await client.hget(SPACE.room(ROOM), "seq") == b"7"
    finally:
        await client.aclose()


async def test_a_failover_that_lost_a_rooms_last_events_reuses_no_delivered_seq(
    cluster_url: str, redis_cluster: RedisClusterProcesses
) -> None:
    """The replica frozen and its link dropped by the master while the last events are
    written, the master then killed: the promoted replica never had them. The gateway that
    delivered them lifts the room on its next call, so the next event is numbered above."""
    client = cluster_client(cluster_url)
    await open_room(client)
    master = redis_cluster.node_of(client, SPACE.room(ROOM))
    try:
        async with AsyncExitStack() as stack:
            a, got_a = await gateway(stack, client, "a")
            for n in range(1, 4):
                a.publish(ROOM, viewers(n))
            await a.flush()
            [replica] = redis_cluster.replicas_of(master)
            with master.client() as node:
                assert node.wait(1, 10_000) == 1  # the replica holds 1..3
            with replica.frozen():
                with master.client() as node:
                    node.client_kill_filter(_type="replica")
                for n in range(4, 6):
                    a.publish(ROOM, viewers(n))
                await a.flush()
                assert got_a.seqs == [1, 2, 3, 4, 5]
                master.kill()  # no link left to the replica: 4 and 5 die with it
            await asyncio.to_thread(redis_cluster.wait_promoted, master, [replica])
            with replica.client() as node:
                newest = node.xrevrange(SPACE.room_log(ROOM), "+", "-", count=1)
            assert newest[0][0] == b"0-3"  # the failover lost 4 and 5

            a.publish(ROOM, viewers(6))
            for attempt in range(FLUSH_ATTEMPTS):  # the client finds the new master
                try:
                    await a.flush()
                    break
                except (RedisError, OSError):
                    if attempt == FLUSH_ATTEMPTS - 1:
                        raise
            assert got_a.seqs == [1, 2, 3, 4, 5, 6]
    finally:
        await client.aclose()
        if not master.alive():
            await asyncio.to_thread(redis_cluster.restart, master)
