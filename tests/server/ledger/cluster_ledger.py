"""Fixtures of the downstream contract on a Redis Cluster (ISSUE14-DESIGN.md): ledger entries
in their partitions' ledgers, credit cursors and wallets, written here directly in the
documented formats, as the gift script (sender's ledger), purchases (buyer's ledger), payouts
(creator's ledger) and crediting (the cursor `giftstream:{pCC}:credited` field `pSS`) leave
them. The downstream (audit, checkpoint, consume, relay, trim) must read exactly that.
"""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson
from redis.asyncio.cluster import RedisCluster

from giftstream.server.ledger.connect import open_ledger_redis
from giftstream.server.money import keys

PARTITIONS = 8
TS = 1_764_000_000_000  # every entry's `ts`: a fixed moment, ids are Redis's own


def users_by_partition(space: keys.KeySpace, wanted: int, prefix: str = "u") -> list[str]:
    """One user id in each of the first `wanted` partitions (so they spread over shards)."""
    found: dict[int, str] = {}
    for n in itertools.count():
        user = f"{prefix}{n}"
        found.setdefault(space.partition(user), user)
        if len(found) == wanted or n > 10_000:
            return [found[p] for p in sorted(found)][:wanted]
    raise AssertionError("unreachable")


@dataclass
class ClusterLedger:
    """Writes movements the way the money scripts do, and keeps the wallets they leave."""

    redis: RedisCluster
    space: keys.KeySpace
    events: itertools.count[int] = field(default_factory=itertools.count)
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:8])  # ids unique across opens
    coins: dict[str, int] = field(default_factory=dict)
    diamonds: dict[str, int] = field(default_factory=dict)

    @classmethod
    async def open(cls, url: str, partitions: int = PARTITIONS) -> ClusterLedger:
        """Over a flushed cluster: stores the partition count as the first gateway would."""
        plain = RedisCluster.from_url(url)
        await plain.set(keys.PARTITIONS, str(partitions))
        await plain.aclose()
        client, space = await open_ledger_redis(url)
        assert isinstance(client, RedisCluster) and space.partitions == partitions
        return cls(client, space)

    async def close(self) -> None:
        await self.redis.aclose()

    async def _append(self, owner: str, data: dict[str, Any]) -> str:
        data = {"event": f"ev-{self.run}-{next(self.events)}", "ts": TS, **data}
        stream_id = await self.redis.xadd(self.space.ledger_of(owner), {"data": orjson.dumps(data)})
        return keys.text(stream_id)

    async def purchase(self, user: str, coins: int) -> str:
        n = next(self.events)
        self.coins[user] = self.coins.get(user, 0) + coins
        await self.redis.hset(self.space.wallet(user), "coins", self.coins[user])
        return await self._append(
            user,
            {
                "kind": "purchase",
                "user": user,
                "receipt": f"rc-{self.run}-{n}",
                "package": "p",
                "coins": coins,
                "credited": coins,
                "debt_repaid": 0,
                "price_cents": 99,
            },
        )

    async def gift(self, sender: str, creator: str, coins: int, *, credit: bool = True) -> str:
        """The sender's debit and ledger entry; the creator's credit and cursor too when
        `credit` (crediting's round), else the gift waits past the cursor."""
        n = next(self.events)
        diamonds = coins // 2
        self.coins[sender] -= coins
        await self.redis.hset(self.space.wallet(sender), "coins", self.coins[sender])
        stream_id = await self._append(
            sender,
            {
                "kind": "gift",
                "sender": sender,
                "creator": creator,
                "room": creator,
                "gift": "heart",
                "key": f"k-{self.run}-{n}",
                "count": 1,
                "coins": coins,
                "diamonds": diamonds,
                "platform": coins - diamonds,
                "combo": 1,
            },
        )
        if credit:
            await self.credit(sender, creator, stream_id, diamonds)
        return stream_id

    async def credit(self, sender: str, creator: str, stream_id: str, diamonds: int) -> None:
        """What credit.lua does (in one script on the creator's shard): diamonds and cursor."""
        self.diamonds[creator] = self.diamonds.get(creator, 0) + diamonds
        await self.redis.hset(self.space.wallet(creator), "diamonds", self.diamonds[creator])
        await self.set_cursor(sender, creator, stream_id)

    async def set_cursor(self, sender: str, creator: str, stream_id: str) -> None:
        cursors = self.space.credit_cursors(self.space.partition(creator))
        source = self.space.credit_cursor_field(self.space.partition(sender))
        await self.redis.hset(cursors, source, stream_id)

    async def payout(self, creator: str, diamonds: int) -> str:
        n = next(self.events)
        self.diamonds[creator] -= diamonds
        await self.redis.hset(self.space.wallet(creator), "diamonds", self.diamonds[creator])
        return await self._append(
            creator,
            {
                "kind": "payout",
                "creator": creator,
                "key": f"po-{self.run}-{n}",
                "payout": f"payout-{n}",
                "diamonds": diamonds,
                "cents": diamonds,
            },
        )
