"""The one Lua loader: every script loads as Redis runs it, and the lease's scripts, moved
out of Python, still run when Redis is out of memory, as they did inline."""

from __future__ import annotations

from importlib import resources

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from giftstream.protocol.rules import MAX_AMOUNT, MAX_COUNT
from giftstream.server import scripts
from giftstream.server.ledger.lease import Lease
from giftstream.server.money.catalog import MAX_COINS

LUA = resources.files("giftstream.server").joinpath("lua")
NAMES = sorted(
    f.name.removesuffix(".lua")
    for f in LUA.iterdir()
    if f.name.endswith(".lua") and not f.name.startswith("_")
)


def test_every_script_is_found() -> None:
    assert {"send_gift", "purchase", "refund", "payout", "lease_renew", "lease_release"} <= set(
        NAMES
    )


@pytest.mark.parametrize(
    ("name", "guard", "rule"),
    [
        ("send_gift", "local count = int_arg(7, 1, 99)", MAX_COUNT == 99),
        ("purchase", "local coins = int_arg(6, 1, 1e9)", MAX_COINS == 10**9),
        ("payout", "local diamonds = int_arg(5, 1, 1e12)", MAX_AMOUNT == 10**12),
    ],
)
def test_the_scripts_own_guards_match_the_rules(name: str, guard: str, rule: bool) -> None:
    """The scripts restate a few bounds for callers that bypass wallet.py; they must not
    drift from the rules' one source."""
    assert guard in scripts.script_source(name) and rule


@pytest.mark.parametrize("name", NAMES)
async def test_every_script_compiles_in_redis(redis_client: aioredis.Redis, name: str) -> None:
    source = scripts.script_source(name)
    assert source.startswith("#!lua")
    assert len(await redis_client.script_load(source)) == 40


def test_a_script_is_shebang_prelude_then_file() -> None:
    """The money scripts' text is what wallet.py sent before the loader moved here."""
    prelude = LUA.joinpath("_prelude.lua").read_text(encoding="utf-8")
    body = LUA.joinpath("send_gift.lua").read_text(encoding="utf-8")
    assert scripts.script_source("send_gift") == "#!lua\n" + prelude + "\n" + body


def test_a_file_may_name_its_own_flags() -> None:
    source = scripts.script_source("lease_renew")
    assert source.startswith("#!lua flags=allow-oom\n-- Helpers shared by every script")
    assert source.count("#!") == 1


async def test_the_lease_renews_and_releases_when_redis_is_out_of_memory(
    redis_client: aioredis.Redis,
) -> None:
    lease = Lease(redis_client, "test:lease:oom", 60_000, "host-a:1:x")
    other = Lease(redis_client, "test:lease:oom", 60_000, "host-b:2:y")
    assert await lease.acquire()
    await redis_client.config_set("maxmemory", "1")
    try:
        with pytest.raises(ResponseError, match="maxmemory"):
            await redis_client.set("test:oom:probe", "x")  # Redis is out of memory indeed
        assert await lease.renew() and lease.held()
        assert not await other.renew() and not await other.release()
        assert await lease.release()
    finally:
        await redis_client.config_set("maxmemory", "0")
    assert await redis_client.exists("test:lease:oom") == 0
