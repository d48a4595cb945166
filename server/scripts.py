"""The one Lua loader: every script of server/lua/ as Redis runs it, registered with redis-py.

A script is sent as its shebang, the shared helpers of _prelude.lua, then its file. redis-py's
registered script runs by EVALSHA and loads itself again on NOSCRIPT (Redis restarted or
flushed), so callers never handle a SHA.
"""

from __future__ import annotations

from importlib import resources

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript

# Redis 7 refuses a script with a shebang whole when it is out of memory, instead of failing
# at its first write. A file that must still run then names its flags on its own first line.
SHEBANG = "#!lua"


def script_source(name: str) -> str:
    """server/lua/NAME.lua as Redis runs it: shebang, prelude, script."""
    lua = resources.files("giftstream.server").joinpath("lua")
    prelude = lua.joinpath("_prelude.lua").read_text(encoding="utf-8")
    body = lua.joinpath(f"{name}.lua").read_text(encoding="utf-8")
    shebang = SHEBANG
    if body.startswith("#!"):
        shebang, _, body = body.partition("\n")
    return shebang + "\n" + prelude + "\n" + body


def register(redis: aioredis.Redis | RedisCluster, name: str) -> AsyncScript:
    """Script NAME on `redis`, called as `await script(keys=..., args=...)`. On a Redis
    Cluster each call goes to the shard of its keys (all in one slot)."""
    return redis.register_script(script_source(name))


__all__ = ["SHEBANG", "register", "script_source"]
