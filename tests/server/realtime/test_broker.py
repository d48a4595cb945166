"""The Broker contract, run against every implementation on a real Redis: numbering, one
batch per tick, history for `since` at its edges, presence, and a seq that never goes back."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from giftstream.protocol.codec import encode_event
from giftstream.server.realtime.broker import Broker, History, MakeEvent, MemoryBroker
from giftstream.server.realtime.redis_broker import RedisBroker

# Each broker the hub can run on.
IMPLEMENTATIONS: dict[str, Callable[[aioredis.Redis, int], Broker]] = {
    "memory": lambda redis, history_size: MemoryBroker(redis, history_size=history_size),
    "redis": lambda redis, history_size: RedisBroker(
        redis, history_size=history_size, gateway_id="gateway-test"
    ),
}

MakeBroker = Callable[..., Broker]
Event = dict[str, Any]


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def make_broker(request: pytest.FixtureRequest, redis_client: aioredis.Redis) -> MakeBroker:
    """`async with make_broker(history_size=N) as broker`: a broker on the flushed Redis."""
    build = IMPLEMENTATIONS[request.param]

    def factory(history_size: int = 16) -> Broker:
        return build(redis_client, history_size)

    return factory


class Received:
    """A subscriber that records each delivered batch, as (room id, encoded events)."""

    def __init__(self) -> None:
        self.batches: list[tuple[str, list[bytes]]] = []
        self._arrived = asyncio.Event()

    def __call__(self, room_id: str, encoded: Sequence[bytes]) -> None:
        self.batches.append((room_id, list(encoded)))
        self._arrived.set()

    async def wait(self, count: int, timeout: float = 5.0) -> list[tuple[str, list[bytes]]]:
        """The batches once `count` have arrived."""
        try:
            async with asyncio.timeout(timeout):
                while len(self.batches) < count:
                    self._arrived.clear()
                    await self._arrived.wait()
        except TimeoutError:
            raise AssertionError(f"{len(self.batches)} of {count} batches arrived") from None
        return self.batches


def viewers(room: str, seq: int, count: int) -> Event:
    return {"type": "viewers", "room": room, "seq": seq, "count": count}


def make_viewers(room: str, count: int) -> MakeEvent:
    return lambda seq: viewers(room, seq, count)


def seqs(encoded: Sequence[bytes]) -> list[int]:
    return [orjson.loads(data)["seq"] for data in encoded]


async def test_publish_numbers_each_room_from_one_in_order(make_broker: MakeBroker) -> None:
    async with make_broker() as broker:
        got = Received()
        await broker.subscribe("cara", got)
        await broker.subscribe("dan", got)
        assert broker.top_seq("cara") == 0 and broker.top_seq("dan") == 0  # new rooms
        for n in range(3):
            broker.publish("cara", make_viewers("cara", n))
        for n in range(2):
            broker.publish("dan", make_viewers("dan", 10 + n))
        broker.publish("cara", make_viewers("cara", 3))
        await broker.flush()
        by_room = dict(await got.wait(2))
        # each event encoded exactly as the wire has it, in seq order
        assert by_room["cara"] == [encode_event(viewers("cara", s, s - 1)) for s in (1, 2, 3, 4)]
        assert by_room["dan"] == [encode_event(viewers("dan", s, 9 + s)) for s in (1, 2)]
        assert broker.top_seq("cara") == 4 and broker.top_seq("dan") == 2


async def test_a_tick_arrives_as_one_batch(make_broker: MakeBroker) -> None:
    async with make_broker() as broker:
        got = Received()
        await broker.subscribe("cara", got)
        for n in range(3):
            broker.publish("cara", make_viewers("cara", n))
        assert got.batches == []  # published is not delivered before the tick
        await broker.flush()
        (first,) = await got.wait(1)
        assert first[0] == "cara" and seqs(first[1]) == [1, 2, 3]
        await broker.flush()  # nothing queued: no batch, not even an empty one
        for n in range(2):
            broker.publish("cara", make_viewers("cara", n))
        await broker.flush()
        _, second = await got.wait(2)
        assert seqs(second[1]) == [4, 5]


async def test_flushing_some_rooms_leaves_the_others_queued(make_broker: MakeBroker) -> None:
    async with make_broker() as broker:
        got = Received()
        await broker.subscribe("cara", got)
        await broker.subscribe("dan", got)
        broker.publish("cara", make_viewers("cara", 1))
        broker.publish("dan", make_viewers("dan", 1))
        await broker.flush(["cara"])
        assert [room for room, _ in await got.wait(1)] == ["cara"]
        assert broker.top_seq("dan") == 0
        await broker.flush()
        assert [room for room, _ in await got.wait(2)] == ["cara", "dan"]


async def test_history_since_says_whether_it_reaches_back(make_broker: MakeBroker) -> None:
    async with make_broker(history_size=4) as broker:
        got = Received()
        await broker.subscribe("cara", got)
        assert broker.history("cara", 0) == History([], True, 0)  # nothing sent, nothing missed
        for n in range(10):
            broker.publish("cara", make_viewers("cara", n))
        await broker.flush()
        ((_, sent),) = await got.wait(1)
        kept = sent[6:]  # seqs 7..10: the last four
        assert seqs(kept) == [7, 8, 9, 10]
        assert broker.history("cara", 10) == History([], True, 10)
        assert broker.history("cara", 9) == History(sent[9:], True, 10)
        assert broker.history("cara", 6) == History(kept, True, 10)  # oldest kept is the next
        assert broker.history("cara", 5) == History(kept, False, 10)  # seq 6 is gone
        assert broker.history("cara", 0) == History(kept, False, 10)
        assert broker.history("cara", 11) == History([], False, 10)  # a seq never sent
        broker.publish("cara", make_viewers("cara", 10))
        # queued is not yet history: a `since` join never sees an event twice
        assert broker.history("cara", 10) == History([], True, 10)
        await broker.flush()
        _, (_, tick) = await got.wait(2)
        assert broker.history("cara", 10) == History(tick, True, 11)


async def test_presence_is_the_count_reported(make_broker: MakeBroker) -> None:
    async with make_broker() as broker:
        await broker.subscribe("cara", Received())
        await broker.subscribe("dan", Received())
        assert broker.presence("cara") == 0
        broker.report_presence("cara", 3)
        assert broker.presence("cara") == 3 and broker.presence("dan") == 0
        broker.report_presence("cara", 2)
        broker.report_presence("dan", 1)
        assert broker.presence("cara") == 2 and broker.presence("dan") == 1


async def test_seq_moves_forward_across_a_new_broker_on_the_same_redis(
    make_broker: MakeBroker,
) -> None:
    """A node that dies with the room live (no unsubscribe, nothing more written): the next
    one numbers after every seq the first sent, past several reservation blocks."""
    async with make_broker(history_size=8) as first:
        got = Received()
        await first.subscribe("cara", got)
        for ticks in (1, 2, 3):
            for n in range(1000):
                first.publish("cara", make_viewers("cara", n))
            await first.flush()
            await got.wait(ticks)
        last_sent = seqs(got.batches[-1][1])[-1]
        assert last_sent == 3000
    async with make_broker(history_size=8) as second:
        again = Received()
        await second.subscribe("cara", again)
        assert second.top_seq("cara") >= last_sent
        history = second.history("cara", last_sent)
        if history.recovered:  # a broker that keeps history across nodes
            assert all(seq > last_sent for seq in seqs(history.events))
        second.publish("cara", make_viewers("cara", 0))
        await second.flush()
        ((_, tick),) = await again.wait(1)
        assert seqs(tick)[0] > last_sent


async def test_unsubscribe_drops_the_queue_and_a_new_subscribe_moves_on(
    make_broker: MakeBroker,
) -> None:
    async with make_broker() as broker:
        got = Received()
        await broker.subscribe("cara", got)
        broker.publish("cara", make_viewers("cara", 1))
        await broker.flush()
        await got.wait(1)
        broker.publish("cara", make_viewers("cara", 2))
        await broker.unsubscribe("cara")
        await broker.flush()
        back = Received()
        await broker.subscribe("cara", back)
        assert broker.top_seq("cara") >= 1
        broker.publish("cara", make_viewers("cara", 3))
        await broker.flush()
        ((_, tick),) = await back.wait(1)
        assert seqs(tick)[0] > 1
        assert len(got.batches) == 1  # the dropped event went nowhere
