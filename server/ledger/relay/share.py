"""The relay processes' fair shares of a Redis Cluster's ledger leases.

Each relay process announces itself in one small hash (`KeySpace.relays()`, field = its relay
id, value = when its heartbeat expires, by Redis's clock) every third of the lease TTL, and
reads back every live relay. It then holds at most its fair share of the ledgers' leases
(`fair_share`): it takes a free lease only below its share, and above it (a relay joined) it
releases leases, each between two batches, once everything it published is acknowledged and
acked, so the next holder starts from exactly what JetStream holds and each ledger stays in
order. A relay killed -9 leaves both its heartbeat and its leases to expire: the others' shares
grow and they take them. The leases alone keep a ledger to one publisher; the shares only
spread them, so two relays briefly reading the heartbeats differently cost nothing but a
lease taken a beat later.

One Redis (one ledger) has no shares: the first relay holds it and the others stand by.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence

from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from giftstream.server.money import keys
from giftstream.server.redis_cluster import RedisClient
from giftstream.server.scripts import register

log = logging.getLogger(__name__)


def fair_share(ledgers: int, relays: Sequence[str], me: str) -> int:
    """How many leases `me` may hold among the live `relays`: ledgers // n each and one more
    for the first ledgers % n in id order, so the shares add up to the ledgers exactly, each
    at most ceil(ledgers / n), and every relay reading the same heartbeats computes the same
    ones. 0 for a relay not (yet) seen alive."""
    ordered = sorted(set(relays))
    if me not in ordered:
        return 0
    n = len(ordered)
    return ledgers // n + (1 if ordered.index(me) < ledgers % n else 0)


async def live_relays(redis: RedisClient, key: str) -> tuple[int, dict[str, int]]:
    """Redis's time (ms) and every live relay's heartbeat expiry, without writing any."""
    now, relays = await _beat(register(redis, "relay_beat"), key, "", 1)
    return now, relays


async def _beat(
    script: AsyncScript, key: str, relay_id: str, ttl_ms: int
) -> tuple[int, dict[str, int]]:
    reply = await script(keys=[key], args=[relay_id, ttl_ms])
    now, *fields = reply
    return int(now), {
        keys.text(relay): int(expires)
        for relay, expires in zip(fields[::2], fields[1::2], strict=True)
    }


class Share:
    """This process's heartbeat and its share of `ledgers` leases. The process's Relays ask it
    before taking a lease (`reserve`) and between batches (`give_up`); both decide without an
    await, so the Relays of one process never overshoot the share together."""

    def __init__(
        self,
        redis: RedisClient,
        key: str,
        relay_id: str,
        ledgers: int,
        ttl_ms: int,
        show: Callable[[Share], None] | None = None,
    ) -> None:
        self.redis = redis
        self.key = key
        self.relay_id = relay_id
        self.ledgers = ledgers
        self.ttl_ms = ttl_ms
        self.live: tuple[str, ...] = ()  # the live relays (ids, sorted) at the last beat
        self.held: set[str] = set()  # the ledgers whose leases this process holds or is taking
        self._show = show or (lambda share: None)
        self._script = register(redis, "relay_beat")

    @property
    def quota(self) -> int:
        return fair_share(self.ledgers, self.live, self.relay_id)

    def reserve(self, ledger: str) -> bool:
        """May this process take `ledger`'s lease now? If so it counts as held until `drop`."""
        if ledger in self.held:
            return True
        if len(self.held) >= self.quota:
            return False
        self.held.add(ledger)
        return True

    def drop(self, ledger: str) -> None:
        """`ledger`'s lease is not ours (not taken, released or lost)."""
        self.held.discard(ledger)

    def give_up(self, ledger: str) -> bool:
        """Should `ledger`'s lease be released, this process holding more than its share? If
        so it no longer counts as held (the caller releases it)."""
        if ledger in self.held and len(self.held) > self.quota:
            self.held.discard(ledger)
            return True
        return False

    async def beat(self) -> None:
        """Announce this relay for another TTL and read who else is alive."""
        _, relays = await _beat(self._script, self.key, self.relay_id, self.ttl_ms)
        live = tuple(sorted(relays))
        if live != self.live:
            before, self.live = self.live, live
            log.info(
                "relays alive: %d (%s joined, %s gone); this relay's share: %d of %d ledgers",
                len(live),
                ", ".join(sorted(set(live) - set(before))) or "none",
                ", ".join(sorted(set(before) - set(live))) or "none",
                self.quota,
                self.ledgers,
            )
        self._show(self)

    async def run(self, ended: asyncio.Event) -> None:
        """Beat every third of the TTL until `ended`; a failed beat keeps the last reading
        (the leases, not the shares, keep each ledger to one publisher)."""
        every = self.ttl_ms / 3000
        while not ended.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ended.wait(), every)
            if ended.is_set():
                return
            try:
                async with asyncio.timeout(max(every, 0.1)):
                    await self.beat()
            except (RedisError, OSError, TimeoutError) as exc:
                log.warning("cannot write the relay heartbeat (%r); retrying", exc)

    async def leave(self) -> None:
        """A clean stop: out of the heartbeats at once, so the others' shares grow now."""
        try:
            await self.redis.hdel(self.key, self.relay_id)
        except (RedisError, OSError) as exc:
            log.warning("could not remove the relay heartbeat (%s): it expires", exc)
