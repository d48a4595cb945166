"""The gateway registry: the pure sums and rates of the ops stats, and heartbeats in a real
Redis (Redis's clock, expiry, clean removal) and the ops log that carries `room_opened`."""

from __future__ import annotations

import orjson
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from giftstream.server.money.keys import KeySpace
from giftstream.server.realtime.hub import LIVE_ROOMS_KEY
from giftstream.server.realtime.opslog import OPS_LOG_KEY, Notice, OpsLog
from giftstream.server.realtime.registry import (
    GATEWAYS_KEY,
    Counters,
    GatewayRegistry,
    Heartbeat,
    ServiceMeter,
    Survey,
    new_gateway_id,
)


def beat(connections: int, gifts: int, coins: int, ts: int) -> Heartbeat:
    return Heartbeat(connections=connections, gifts=gifts, coins=coins, ts=ts)


def survey(now_ms: int, rooms: int = 0, **beats: Heartbeat) -> Survey:
    return Survey(now_ms=now_ms, rooms=rooms, beats=beats)


# ---- pure: what the heartbeats sum to ------------------------------------------------


def test_connections_and_rooms_are_the_services() -> None:
    meter = ServiceMeter()
    figures = meter.update(survey(5_000, rooms=3, a=beat(10, 0, 0, 4_900), b=beat(7, 0, 0, 4_950)))
    assert (figures.ts, figures.rooms, figures.connections) == (5_000, 3, 17)
    assert (figures.gifts_per_s, figures.coins_per_s) == (0, 0)  # one heartbeat each: no rate


def test_rates_are_summed_per_gateway_between_its_own_heartbeats() -> None:
    meter = ServiceMeter()
    meter.update(survey(1_000, a=beat(1, 100, 1_000, 1_000), b=beat(1, 50, 500, 900)))
    # a: 10 gifts and 150 coins in 1 s; b: 4 gifts and 20 coins in 2 s (a slower clock)
    figures = meter.update(survey(2_000, a=beat(1, 110, 1_150, 2_000), b=beat(1, 54, 520, 2_900)))
    assert (figures.gifts_per_s, figures.coins_per_s) == (12.0, 160.0)


def test_a_reading_between_heartbeats_keeps_the_last_rate() -> None:
    """Read more often than gateways beat: a reading that sees no new heartbeat is not a dip
    to 0, and the next one is not a burst."""
    meter = ServiceMeter()
    meter.update(survey(0, a=beat(1, 0, 0, 0)))
    assert meter.update(survey(1_000, a=beat(1, 4, 40, 1_000))).gifts_per_s == 4.0
    assert meter.update(survey(1_300, a=beat(1, 4, 40, 1_000))).gifts_per_s == 4.0
    assert meter.update(survey(2_000, a=beat(1, 6, 60, 2_000))).coins_per_s == 20.0


def test_a_gateway_appearing_or_leaving_is_no_burst_or_dip() -> None:
    """A new gateway's cumulative counters are not a rate (it may have run for days before
    this reader saw it); a gone one leaves the sums at once."""
    meter = ServiceMeter()
    meter.update(survey(0, a=beat(2, 0, 0, 0)))
    figures = meter.update(survey(1_000, a=beat(2, 3, 30, 1_000), new=beat(5, 9_000, 90_000, 900)))
    assert (figures.connections, figures.gifts_per_s, figures.coins_per_s) == (7, 3.0, 30.0)
    figures = meter.update(survey(2_000, new=beat(5, 9_002, 90_020, 1_900)))
    assert (figures.connections, figures.gifts_per_s, figures.coins_per_s) == (5, 2.0, 20.0)
    # `a` back (a reader's view of it was interrupted): counted afresh, not from its old beat
    figures = meter.update(
        survey(3_000, a=beat(2, 50, 500, 3_000), new=beat(5, 9_002, 90_020, 1_900))
    )
    assert (figures.connections, figures.gifts_per_s) == (7, 2.0)


def test_reset_forgets_every_gateway() -> None:
    meter = ServiceMeter()
    meter.update(survey(0, a=beat(1, 0, 0, 0)))
    meter.update(survey(1_000, a=beat(1, 5, 50, 1_000)))
    meter.reset()
    assert meter.update(survey(60_000, a=beat(1, 600, 6_000, 60_000))).gifts_per_s == 0


def test_rates_are_rounded_to_two_decimals() -> None:
    meter = ServiceMeter()
    meter.update(survey(0, a=beat(1, 0, 0, 0)))
    figures = meter.update(survey(3_000, a=beat(1, 1, 2, 3_000)))
    assert (figures.gifts_per_s, figures.coins_per_s) == (0.33, 0.67)


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[1, 2]",
        b'{"connections": 1, "gifts": 2, "coins": 3}',
        b'{"connections": -1, "gifts": 2, "coins": 3, "ts": 4}',
        b'{"connections": 1.5, "gifts": 2, "coins": 3, "ts": 4}',
        b'{"connections": true, "gifts": 2, "coins": 3, "ts": 4}',
        b'{"connections": "1", "gifts": 2, "coins": 3, "ts": 4}',
    ],
)
def test_an_unreadable_heartbeat_is_skipped(raw: bytes) -> None:
    assert Heartbeat.parse(raw) is None


def test_a_heartbeat_reads_back() -> None:
    raw = b'{"connections":1,"gifts":2,"coins":3,"ts":4}'
    assert Heartbeat.parse(raw) == beat(1, 2, 3, 4)


def test_gateway_ids_are_12_hex_and_fresh() -> None:
    ids = {new_gateway_id() for _ in range(100)}
    assert len(ids) == 100 and all(len(i) == 12 and set(i) <= set("0123456789abcdef") for i in ids)


# ---- in Redis -----------------------------------------------------------------------


def registry(
    redis: aioredis.Redis, gateway: str, counters: Counters, expiry_s: float = 15.0
) -> GatewayRegistry:
    return GatewayRegistry(redis, gateway, lambda: counters, [LIVE_ROOMS_KEY], expiry_s=expiry_s)


async def redis_ms(redis: aioredis.Redis) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def test_a_heartbeat_is_the_counters_stamped_with_redis_time(
    redis_client: aioredis.Redis,
) -> None:
    before = await redis_ms(redis_client)
    refusals = (("insufficient_coins", 4), ("rate_limited", 1))
    await registry(redis_client, "gw1", Counters(3, 2, 150, refusals)).beat()
    after = await redis_ms(redis_client)
    raw = await redis_client.hget(GATEWAYS_KEY, "gw1")
    assert raw is not None
    stored = orjson.loads(raw)
    assert stored.keys() == {"connections", "gifts", "coins", "ts", "refusals"}
    assert (stored["connections"], stored["gifts"], stored["coins"]) == (3, 2, 150)
    assert stored["refusals"] == {"insufficient_coins": 4, "rate_limited": 1}
    assert before <= stored["ts"] <= after
    beat = Heartbeat.parse(raw)
    assert beat is not None and beat.refusals == refusals


async def test_refusals_are_summed_by_code_over_the_gateways() -> None:
    meter = ServiceMeter()
    beats = {
        "a": Heartbeat(1, 0, 0, 1000, (("internal", 1), ("rate_limited", 2))),
        "b": Heartbeat(1, 0, 0, 1000, (("rate_limited", 3),)),
        "c": Heartbeat(1, 0, 0, 1000),
    }
    figures = meter.update(Survey(now_ms=1000, rooms=0, beats=beats))
    assert figures.refusals == (("internal", 1), ("rate_limited", 5))


@pytest.mark.parametrize(
    "refusals",
    ['{"Bad-Code":1}', '{"x":-1}', '{"x":1.5}', '{"x":true}', "[]", '{"x":"1"}'],
)
def test_a_heartbeat_with_bad_refusals_is_skipped(refusals: str) -> None:
    raw = '{"connections":1,"gifts":0,"coins":0,"ts":5,"refusals":' + refusals + "}"
    assert Heartbeat.parse(raw) is None


async def test_the_heartbeat_script_refuses_a_bad_refusal_code(
    redis_client: aioredis.Redis,
) -> None:
    bad = registry(redis_client, "gw1", Counters(3, 2, 150, (("bad code", 1),)))
    with pytest.raises(ResponseError):
        await bad.beat()
    assert await redis_client.hget(GATEWAYS_KEY, "gw1") is None


async def test_survey_counts_live_gateways_and_rooms_and_cleans_the_dead(
    redis_client: aioredis.Redis,
) -> None:
    await redis_client.sadd(LIVE_ROOMS_KEY, "cara", "dan")
    await registry(redis_client, "live", Counters(4, 1, 10)).beat()
    now = await redis_ms(redis_client)
    dead = {"connections": 9, "gifts": 9, "coins": 9, "ts": now - 20_000}
    await redis_client.hset(GATEWAYS_KEY, mapping={"dead": orjson.dumps(dead), "junk": b"{"})
    found = await registry(redis_client, "reader", Counters(2, 0, 0)).survey()
    assert found.rooms == 2 and set(found.beats) == {"live", "reader"}  # the reader beats too
    assert found.beats["live"].connections == 4 and found.beats["reader"].connections == 2
    assert found.now_ms >= now
    assert sorted(await redis_client.hkeys(GATEWAYS_KEY)) == [b"live", b"reader"]  # dead gone


async def test_survey_sums_the_live_rooms_of_every_partition(
    redis_client: aioredis.Redis,
) -> None:
    """On a cluster each partition has its live-room set (in its own slot): the count is their
    sum, taken outside the scripts. Hash-tagged names work on one Redis too."""
    sets = KeySpace(partitions=4, cluster=True).all_live_rooms()
    await redis_client.sadd(sets[0], "ann")
    await redis_client.sadd(sets[2], "cara", "dan")
    await redis_client.sadd(sets[3], "eve")
    found = await GatewayRegistry(redis_client, "g", lambda: Counters(0, 0, 0), sets).survey()
    assert found.rooms == 4
    with pytest.raises(TypeError, match="list of keys"):
        GatewayRegistry(redis_client, "g", lambda: Counters(0, 0, 0), LIVE_ROOMS_KEY)


async def test_remove_takes_the_gateway_out_at_once(redis_client: aioredis.Redis) -> None:
    gone, stays = (
        registry(redis_client, "gone", Counters(1, 0, 0)),
        registry(redis_client, "stays", Counters(2, 0, 0)),
    )
    await gone.beat()
    await stays.beat()
    await gone.remove()
    assert set((await stays.survey()).beats) == {"stays"}


async def test_the_ops_log_reads_from_start_its_own_and_others_notices_once(
    redis_client: aioredis.Redis,
) -> None:
    old = OpsLog(redis_client)
    old.append(Notice(room="before", kind="room_opened", frame=b'{"x":0}'))
    await old.exchange()
    here, there = OpsLog(redis_client), OpsLog(redis_client)
    await here.start()  # what was logged before is not news
    await there.start()
    here.append(Notice(room="cara", kind="room_opened", frame=b'{"x":1}'))
    there.append(Notice(room="dan", kind="room_opened", frame=b'{"x":2}'))
    assert await there.exchange() == [Notice("dan", "room_opened", b'{"x":2}')]
    assert [n.room for n in await here.exchange()] == ["dan", "cara"]  # cara written now
    assert [n.room for n in await there.exchange()] == ["cara"]
    assert await here.exchange() == [] and await there.exchange() == []
    assert await redis_client.xlen(OPS_LOG_KEY) == 3


async def test_the_ops_log_skips_what_no_one_watched(redis_client: aioredis.Redis) -> None:
    idle, writer = OpsLog(redis_client), OpsLog(redis_client)
    await idle.start()
    writer.append(Notice(room="cara", kind="room_opened", frame=b"{}"))
    await writer.exchange(read=False)
    assert await idle.exchange(read=False) == []
    idle.skip()
    writer.append(Notice(room="dan", kind="room_opened", frame=b"{}"))
    await writer.exchange(read=False)
    assert [n.room for n in await idle.exchange()] == ["dan"]
