"""A lease in Redis: at most one holder at a time, for a worker that must run alone (the
JetStream relay). Taken with SET key token NX PX ttl; renewed and released by scripts
(server/lua/lease_*.lua) that act only while the key still holds our token, so a holder that
lost it never touches the next holder's lease.

The holder believes it holds the lease until `ttl_ms` after it *sent* its last successful
take or renewal, less a margin: Redis started the key's TTL later than that, so the holder
always gives up first, even when Redis is unreachable and renewals fail.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any

from giftstream.server import scripts
from giftstream.server.redis_cluster import RedisClient


def new_token() -> str:
    """hostname:pid:random, so `--status` names the process holding the lease."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True, slots=True)
class Holder:
    token: str
    ttl_ms: int  # what is left of it

    def as_dict(self) -> dict[str, Any]:
        return {"holder": self.token, "ttl_ms": self.ttl_ms}


async def lease_holder(redis: RedisClient, key: str) -> Holder | None:
    """Who holds the lease and for how much longer; None when nobody does."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.get(key)
        pipe.pttl(key)
        token, ttl_ms = await pipe.execute()
    if token is None:
        return None
    return Holder(token.decode() if isinstance(token, bytes) else str(token), max(0, ttl_ms))


class Lease:
    """One process's claim on `key`. `held()` is what a holder checks before each step that
    only the holder may do; it turns False by itself once the lease may have expired."""

    def __init__(self, redis: RedisClient, key: str, ttl_ms: int, token: str | None = None):
        if type(ttl_ms) is not int or ttl_ms < 100:
            raise ValueError(f"the lease TTL must be an integer of at least 100 ms, not {ttl_ms!r}")
        self.redis = redis
        self.key = key
        self.ttl_ms = ttl_ms
        self.token = token or new_token()
        self.margin_s = min(ttl_ms / 10, 1000) / 1000  # clock drift and scheduling slack
        self._valid_until = float("-inf")  # monotonic
        self._renew = scripts.register(redis, "lease_renew")
        self._release = scripts.register(redis, "lease_release")

    def held(self) -> bool:
        return time.monotonic() < self._valid_until

    def remaining_s(self) -> float:
        return max(0.0, self._valid_until - time.monotonic())

    async def acquire(self) -> bool:
        """Take the lease if nobody holds it (or we already do); True if we hold it now."""
        sent = time.monotonic()
        if await self.redis.set(self.key, self.token, nx=True, px=self.ttl_ms):
            self._held_since(sent)
            return True
        return await self.renew()  # ours already (a take that timed out, say): keep it

    async def renew(self) -> bool:
        """Extend the lease if it is still ours; False (and `held()` False) if it is not."""
        sent = time.monotonic()
        if await self._renew(keys=[self.key], args=[self.token, self.ttl_ms]):
            self._held_since(sent)
            return True
        self._valid_until = float("-inf")
        return False

    def _held_since(self, sent: float) -> None:
        """Redis (re)started the TTL after `sent`: counting from then, less the margin,
        we always give up before Redis expires the key."""
        self._valid_until = sent + self.ttl_ms / 1000 - self.margin_s

    async def release(self) -> bool:
        """Give the lease up at once if it is still ours, so a waiting process takes over
        without waiting for the TTL."""
        self._valid_until = float("-inf")
        return bool(await self._release(keys=[self.key], args=[self.token]))
