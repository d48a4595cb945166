"""What the model tests share: a private event loop with a client and a Wallet on it (so a
sync Hypothesis test can drive the async money path), and a snapshot of the whole keyspace
(every key's type, value and whether it has a TTL, the ledger's length) to prove a refused or
failed movement wrote nothing at all."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

import redis.asyncio as aioredis

from giftstream.server.money import keys
from giftstream.server.money.catalog import Economics
from giftstream.server.money.wallet import Wallet
from tests.helpers import CLOCK_KEYS

T = TypeVar("T")

# One key as the snapshot sees it: (type, value, has a TTL). Values are decoded to str.
KeyState = tuple[str, Any, bool]
Snapshot = dict[str, KeyState]


def _s(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


class LoopRedis:
    """A loop of its own, a client built on it and a Wallet: `run(coro)` from sync code.

    One instance per Hypothesis example (or per test); `close()` drains the wallet, closes
    the client and the loop, so no connection outlives the loop that opened it."""

    def __init__(
        self, url: str, economics: Economics, *, flush: bool = True, **wallet_options: Any
    ) -> None:
        self.loop = asyncio.new_event_loop()
        self.redis: aioredis.Redis = self.run(self._connect(url))
        self.wallet = Wallet(self.redis, economics, **wallet_options)
        if flush:
            self.run(self.redis.flushall())
        self.run(self.wallet.load_scripts())

    @staticmethod
    async def _connect(url: str) -> aioredis.Redis:
        return aioredis.Redis.from_url(url)

    def run(self, coro: Awaitable[T]) -> T:
        return self.loop.run_until_complete(coro)

    def snapshot(self) -> Snapshot:
        return self.run(snapshot(self.redis))

    def close(self) -> None:
        try:
            self.run(self.wallet.drain())
            self.run(self.redis.aclose())
        finally:
            self.loop.close()


async def snapshot(redis: aioredis.Redis) -> Snapshot:
    """Every key (but a running server's heartbeat, CLOCK_KEYS): its type, its whole value
    (a stream as its entries plus XLEN) and whether a TTL is set. Three round trips whatever
    the key count, so it is cheap enough per step."""
    names = sorted(name for name in map(_s, await redis.keys("*")) if name not in CLOCK_KEYS)
    async with redis.pipeline(transaction=True) as pipe:
        for name in names:
            pipe.type(name)
            pipe.pttl(name)
        meta = await pipe.execute()
    types = [_s(t) for t in meta[0::2]]
    ttls = meta[1::2]
    async with redis.pipeline(transaction=True) as pipe:
        for name, kind in zip(names, types, strict=True):
            if kind == "hash":
                pipe.hgetall(name)
            elif kind == "string":
                pipe.get(name)
            elif kind == "list":
                pipe.lrange(name, 0, -1)
            elif kind == "set":
                pipe.smembers(name)
            elif kind == "zset":
                pipe.zrange(name, 0, -1, withscores=True)
            elif kind == "stream":
                pipe.xrange(name)
                pipe.xlen(name)
            else:  # pragma: no cover - a type these tests never create
                pipe.exists(name)
        values = iter(await pipe.execute())
    state: Snapshot = {}
    for name, kind, ttl in zip(names, types, ttls, strict=True):
        raw = next(values)
        value: Any
        if kind == "hash":
            value = {_s(f): _s(v) for f, v in raw.items()}
        elif kind == "string":
            value = _s(raw)
        elif kind in ("list", "zset"):
            value = [_s(v) if not isinstance(v, tuple) else (_s(v[0]), v[1]) for v in raw]
        elif kind == "set":
            value = sorted(_s(v) for v in raw)
        elif kind == "stream":
            entries = [(_s(i), {_s(f): _s(v) for f, v in fields.items()}) for i, fields in raw]
            value = (entries, next(values))
        else:  # pragma: no cover
            value = raw
        state[name] = (kind, value, ttl != -1)
    return state


def ledger_length(state: Snapshot) -> int:
    """The ledger's XLEN in a snapshot (0 when absent)."""
    kind, value, _ = state.get(keys.LEDGER, ("none", ([], 0), False))
    return int(value[1]) if kind == "stream" else 0
