"""Shared fixtures: a real redis-server process per test session, started on a free loopback
port in a temp dir, and flushed before each test that asks for it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from server.embedded_redis import EmbeddedRedis


@pytest.fixture(scope="session")
def redis_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    """One redis-server for the whole run (AOF on, noeviction, like production)."""
    proc = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture
def redis_url(redis_process: EmbeddedRedis) -> Iterator[str]:
    """The URL of an empty Redis: every key of earlier tests is gone."""
    import redis as syncredis

    client = syncredis.Redis.from_url(redis_process.url)
    client.flushall()
    client.script_flush()
    client.close()
    yield redis_process.url


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"
