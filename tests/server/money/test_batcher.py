"""Money script calls on their own pipelined connection: concurrent calls share round trips,
each gets its own reply or error in order, a script Redis forgot (SCRIPT FLUSH) is sent again,
a cancelled caller's script still runs, and a dead, refusing or stalled Redis fails the calls
instead of hanging them. Every case against a real redis-server."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from giftstream.server.embedded_redis import EmbeddedRedis
from giftstream.server.money.batcher import ScriptBatcher, pack

ECHO = "return {KEYS[1], ARGV[1]}"
FAIL_ON_X = "if ARGV[1] == 'x' then return redis.error_reply('no x') end return ARGV[1]"
INCR = "return redis.call('INCR', KEYS[1])"


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A redis-server of this test's own, free to be killed, stopped or locked."""
    with EmbeddedRedis(tmp_path / "redis") as redis:
        yield redis


async def test_concurrent_calls_share_round_trips(redis_client: aioredis.Redis) -> None:
    batcher = ScriptBatcher(redis_client, eager_batch=1000)
    echo = redis_client.register_script(ECHO)
    await batcher.call(echo, ["first"], [0])  # connected
    replies = await asyncio.gather(*(batcher.call(echo, [f"k{i}"], [i]) for i in range(300)))
    assert replies == [[f"k{i}".encode(), str(i).encode()] for i in range(300)]
    assert batcher.writes == 2  # all 300 were made in one turn of the loop


async def test_a_big_turn_is_sent_in_eager_chunks(redis_client: aioredis.Redis) -> None:
    """Redis starts on the first calls of a burst while the rest are still being made."""
    batcher = ScriptBatcher(redis_client, eager_batch=32)
    echo = redis_client.register_script(ECHO)
    await batcher.call(echo, ["first"], [0])
    replies = await asyncio.gather(*(batcher.call(echo, [f"k{i}"], [i]) for i in range(300)))
    assert replies == [[f"k{i}".encode(), str(i).encode()] for i in range(300)]
    assert batcher.writes == 1 + 300 // 32 + 1  # nine chunks of 32 as they fill, then the rest


async def test_calls_made_while_replies_are_pending_go_out_at_once(
    own_redis: EmbeddedRedis,
) -> None:
    """A second wave is written without waiting for the first wave's replies: Redis is
    stopped (SIGSTOP) so the first replies are surely pending when the second wave is made."""
    client = aioredis.Redis.from_url(own_redis.url)
    batcher = ScriptBatcher(client)
    incr = client.register_script(INCR)
    assert await batcher.call(incr, ["counter"], []) == 1  # connected, script loaded
    assert own_redis.process is not None
    own_redis.process.send_signal(signal.SIGSTOP)
    try:
        first = [asyncio.ensure_future(batcher.call(incr, ["counter"], [])) for _ in range(10)]
        await asyncio.sleep(0.05)
        second = [asyncio.ensure_future(batcher.call(incr, ["counter"], [])) for _ in range(10)]
        await asyncio.sleep(0.05)
        assert batcher.in_flight == 20 and batcher.writes == 3  # one write per wave
    finally:
        own_redis.process.send_signal(signal.SIGCONT)
    results = await asyncio.gather(*first, *second)
    assert results == list(range(2, 22))  # every call ran once, in the order made
    assert batcher.writes == 3
    await client.aclose()


async def test_each_call_gets_its_own_error(redis_client: aioredis.Redis) -> None:
    batcher = ScriptBatcher(redis_client)
    script = redis_client.register_script(FAIL_ON_X)
    results = await asyncio.gather(
        *(batcher.call(script, [], [arg]) for arg in ["a", "x", "b"]), return_exceptions=True
    )
    assert results[0] == b"a" and results[2] == b"b"
    assert isinstance(results[1], ResponseError) and "no x" in str(results[1])


async def test_on_reply_errors_reach_the_caller(redis_client: aioredis.Redis) -> None:
    batcher = ScriptBatcher(redis_client)
    echo = redis_client.register_script(ECHO)

    def refuse(reply: Any) -> Any:
        raise LookupError(f"refused {reply!r}")

    with pytest.raises(LookupError, match="refused"):
        await batcher.submit(echo, ["a"], [1], refuse)


async def test_flushed_scripts_are_sent_again(redis_client: aioredis.Redis) -> None:
    batcher = ScriptBatcher(redis_client)
    echo = redis_client.register_script(ECHO)
    assert await batcher.call(echo, ["a"], [1]) == [b"a", b"1"]
    await redis_client.script_flush()
    replies = await asyncio.gather(*(batcher.call(echo, ["b"], [i]) for i in range(5)))
    assert replies == [[b"b", str(i).encode()] for i in range(5)]


async def test_a_cancelled_caller_still_runs_its_script(redis_client: aioredis.Redis) -> None:
    batcher = ScriptBatcher(redis_client)
    incr = redis_client.register_script(INCR)
    seen: list[Any] = []

    async def caller() -> Any:
        return await batcher.submit(incr, ["cancelled"], [], seen.append)

    task = asyncio.create_task(caller())
    await asyncio.sleep(0)
    task.cancel()
    await batcher.drain()
    assert task.cancelled()
    cancelled = await redis_client.get("cancelled")
    assert seen == [1] and cancelled is not None and int(cancelled) == 1


def test_only_str_int_and_bytes_are_packed() -> None:
    assert pack("SET", "k", 5, b"v") == b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n5\r\n$1\r\nv\r\n"
    for bad in (True, 1.5, None):
        with pytest.raises(TypeError):
            pack("SET", "k", bad)  # type: ignore[arg-type]


async def test_a_bad_argument_fails_its_own_call_only(redis_client: aioredis.Redis) -> None:
    """Refused at submit, to its caller: packed at flush time, a float stranded every call
    of the turn (their futures never resolved, drain() never returned)."""
    batcher = ScriptBatcher(redis_client)
    incr = redis_client.register_script(INCR)
    before = asyncio.ensure_future(batcher.call(incr, ["counter"], []))
    for bad in (1.5, True, None):
        with pytest.raises(TypeError):
            batcher.submit(incr, ["counter"], [bad], lambda reply: reply)
    after = asyncio.ensure_future(batcher.call(incr, ["counter"], []))
    assert list(await asyncio.wait_for(asyncio.gather(before, after), 5)) == [1, 2]
    await asyncio.wait_for(batcher.drain(), 5)
    assert batcher.writes == 1


async def test_password_and_database_come_from_the_client(own_redis: EmbeddedRedis) -> None:
    admin = aioredis.Redis.from_url(own_redis.url)
    await admin.config_set("requirepass", "s3cret")
    url = f"redis://:s3cret@{own_redis.host}:{own_redis.port}/3"
    client = aioredis.Redis.from_url(url)
    try:
        batcher = ScriptBatcher(client)
        incr = client.register_script(INCR)
        assert await batcher.call(incr, ["in-db-3"], []) == 1
        in_db_3 = await client.get("in-db-3")
        assert in_db_3 is not None and int(in_db_3) == 1  # db 3, through redis-py

        wrong = aioredis.Redis.from_url(f"redis://:wrong@{own_redis.host}:{own_redis.port}/3")
        with pytest.raises(RedisConnectionError):
            await asyncio.wait_for(ScriptBatcher(wrong).call(incr, ["x"], []), 5)
        await wrong.aclose()
    finally:
        await client.aclose()
        await admin.aclose()


async def test_a_dead_redis_fails_the_calls_and_a_new_one_is_reached(
    own_redis: EmbeddedRedis,
) -> None:
    client = aioredis.Redis.from_url(own_redis.url)
    batcher = ScriptBatcher(client)
    echo = client.register_script(ECHO)
    assert await batcher.call(echo, ["a"], [1]) == [b"a", b"1"]
    own_redis.kill()
    results = await asyncio.gather(
        *(batcher.call(echo, ["a"], [i]) for i in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, RedisConnectionError) for r in results), results
    own_redis.start()  # same port, same data dir
    assert await batcher.call(echo, ["b"], [2]) == [b"b", b"2"]  # reconnected, script reloaded
    await client.aclose()


async def test_a_stalled_redis_fails_the_calls_after_the_socket_timeout(
    own_redis: EmbeddedRedis,
) -> None:
    client = aioredis.Redis.from_url(f"{own_redis.url}?socket_timeout=1")
    batcher = ScriptBatcher(client)
    echo = client.register_script(ECHO)
    assert await batcher.call(echo, ["a"], [1]) == [b"a", b"1"]
    assert own_redis.process is not None
    own_redis.process.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(RedisTimeoutError):
            await asyncio.wait_for(batcher.call(echo, ["a"], [2]), 10)
        assert time.monotonic() - started < 5
    finally:
        own_redis.process.send_signal(signal.SIGCONT)
    assert await batcher.call(echo, ["c"], [3]) == [b"c", b"3"]
    await client.aclose()
