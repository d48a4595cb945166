"""Concurrent script calls share pipelines, each gets its own reply or error, and a script
Redis forgot (SCRIPT FLUSH) is loaded again."""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from server.batcher import ScriptBatcher

ECHO = "return {KEYS[1], ARGV[1]}"
FAIL_ON_X = "if ARGV[1] == 'x' then return redis.error_reply('no x') end return ARGV[1]"


class CountingBatcher(ScriptBatcher):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pipelines: list[int] = []

    async def _pipeline(self, batch: list[Any]) -> list[Any]:
        self.pipelines.append(len(batch))
        return await super()._pipeline(batch)


async def test_concurrent_calls_share_round_trips(redis_client: aioredis.Redis) -> None:
    batcher = CountingBatcher(redis_client, max_batch=64, max_inflight=2)
    echo = redis_client.register_script(ECHO)
    replies = await asyncio.gather(*(batcher.call(echo, [f"k{i}"], [i]) for i in range(300)))
    assert replies == [[f"k{i}".encode(), str(i).encode()] for i in range(300)]
    assert sum(batcher.pipelines) == 300
    assert len(batcher.pipelines) <= 300 // 64 + 2
    assert max(batcher.pipelines) == 64


async def test_each_call_gets_its_own_error(redis_client: aioredis.Redis) -> None:
    batcher = ScriptBatcher(redis_client)
    script = redis_client.register_script(FAIL_ON_X)
    results = await asyncio.gather(
        *(batcher.call(script, [], [arg]) for arg in ["a", "x", "b"]), return_exceptions=True
    )
    assert results[0] == b"a" and results[2] == b"b"
    assert isinstance(results[1], ResponseError) and "no x" in str(results[1])


async def test_flushed_scripts_are_loaded_again(redis_client: aioredis.Redis) -> None:
    batcher = ScriptBatcher(redis_client)
    echo = redis_client.register_script(ECHO)
    assert await batcher.call(echo, ["a"], [1]) == [b"a", b"1"]
    await redis_client.script_flush()
    replies = await asyncio.gather(*(batcher.call(echo, ["b"], [i]) for i in range(5)))
    assert replies == [[b"b", str(i).encode()] for i in range(5)]


async def test_connection_failure_fails_every_call_of_the_batch(tmp_path) -> None:
    from server.embedded_redis import EmbeddedRedis

    with EmbeddedRedis(tmp_path) as redis:
        client = aioredis.Redis.from_url(redis.url)
        batcher = ScriptBatcher(client)
        echo = client.register_script(ECHO)
        assert await batcher.call(echo, ["a"], [1]) == [b"a", b"1"]
        redis.kill()
        results = await asyncio.gather(
            *(batcher.call(echo, ["a"], [i]) for i in range(3)), return_exceptions=True
        )
        assert all(isinstance(r, Exception) for r in results)
        await client.aclose()
