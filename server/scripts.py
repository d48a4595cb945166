"""The one Lua loader: every script of server/lua/ as Redis runs it, registered with redis-py.

A script is sent as its shebang, the shared helpers of _prelude.lua, then its file. redis-py's
registered script runs by EVALSHA and loads itself again on NOSCRIPT (Redis restarted or
flushed), so callers never handle a SHA, when called alone. A pipeline (one Redis's or a
cluster's) sends EVALSHA as it is: code that pipelines a script reloads it on NoScriptError
(`load`: SCRIPT LOAD goes to every master of a cluster; a promoted replica has none).
"""

from __future__ import annotations

from importlib import resources

from redis.commands.core import AsyncScript

from giftstream.server.redis_cluster import RedisClient

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


def register(redis: RedisClient, name: str) -> AsyncScript:
    """Script NAME on `redis` (one Redis, or a cluster: each call runs on the shard of its
    keys, which must share a slot), called as `await script(keys=..., args=...)`."""
    return redis.register_script(script_source(name))


async def load(redis: RedisClient, *scripts: AsyncScript) -> None:
    """Load these scripts into the Redis (each master of a cluster) before pipelining them."""
    for script in scripts:
        script.sha = await redis.script_load(script.script)


__all__ = ["SHEBANG", "load", "register", "script_source"]
