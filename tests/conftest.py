"""Shared fixtures: a real redis-server process per test session, started on a free loopback
port in a temp dir, and flushed before each test that asks for it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from giftstream.server.app import App
from giftstream.server.config import Limits, Settings
from giftstream.server.embedded_redis import EmbeddedRedis
from giftstream.server.money.catalog import Catalog, load_catalog
from tests.cluster import ClusterUnavailable, RedisClusterProcesses
from tests.helpers import AdminClient, TokenMaker


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


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProcesses]:
    """A real Redis Cluster (3 masters, 3 replicas) for the whole run, started only when a
    test asks for it; skipped with the reason when no redis-server or redis-cli is found."""
    try:
        cluster = RedisClusterProcesses(tmp_path_factory.mktemp("cluster"))
    except ClusterUnavailable as exc:
        pytest.skip(str(exc))
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def cluster_url(redis_cluster: RedisClusterProcesses) -> str:
    """The URL of one node of an empty, healthy cluster (every key of earlier tests gone)."""
    redis_cluster.wait_ok()
    redis_cluster.flush()
    return redis_cluster.url


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


# ---- a real server on free ports -------------------------------------------------------

JWT_SECRET = "test-jwt-secret-0123456789abcdef"
WEBHOOK_SECRET = "test-webhook-secret-0123456789ab"


def make_settings(redis_url: str, data_dir: Path, broker: str = "redis", **limits: Any) -> Settings:
    """Settings for a test node: OS-chosen ports, fixed secrets, quick ticks, the default
    (Redis) broker unless told."""
    base = {"tick_s": 0.01, "viewers_interval_s": 0.2, "stats_interval_s": 0.2}
    return Settings(
        host="127.0.0.1",
        port=0,
        admin_port=0,
        redis_url=redis_url,
        data_dir=data_dir,
        jwt_secret=JWT_SECRET,
        webhook_secret=WEBHOOK_SECRET,
        broker=broker,
        limits=Limits(**{**base, **limits}),
    )


@pytest.fixture
def catalog() -> Catalog:
    return load_catalog()


@pytest.fixture
def make_app(redis_url: str, data_dir: Path, catalog: Catalog) -> Callable[..., App]:
    """`async with make_app(**limits) as node`: a node with some limits changed (and
    `broker="memory"` for the one-process broker)."""

    def factory(broker: str = "redis", **limits: Any) -> App:
        return App(make_settings(redis_url, data_dir, broker, **limits), catalog)

    return factory


@pytest.fixture
async def app(make_app: Callable[..., App]) -> AsyncIterator[App]:
    """A running node on a flushed Redis; shut down in order after the test."""
    async with make_app() as node:
        yield node


@pytest.fixture
def tokens() -> TokenMaker:
    return TokenMaker(JWT_SECRET)


@pytest.fixture
async def admin(app: App) -> AsyncIterator[AdminClient]:
    async with AdminClient(app.admin_url, WEBHOOK_SECRET) as client:
        yield client
