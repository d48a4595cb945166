"""Creator earnings per UTC day, for dashboards: a ledger consumer that adds each gift to its
creator's day, exactly once per event id however often the entry is delivered.

    giftstream:earnings:{C}               hash: per UTC day D of the gift's ts,
                                          D:diamonds, D:coins, D:gifts (items), D:events
    giftstream:earnings_seen:{C}:D        set: gift event ids of C's day D already counted,
                                          kept SEEN_KEEP_MS past the later of D's end and now

The `{C}` is a Redis Cluster hash tag: one creator's totals and seen sets share a slot, so
the one script that checks and counts stays legal in Cluster. User ids never hold braces.
A gift is dated by its ledger `ts` (when it was settled), never by when it was consumed, so
a redelivery lands on the same day. The seen sets bound exactly-once to SEEN_KEEP_MS: an
entry counted, then delivered again more than that later (its consumer stopped between
handling and acking for days) would count twice; raise it if consumers may stop that long.
"""

from __future__ import annotations

import re
import time
from typing import Any

from redis.commands.core import AsyncScript

from giftstream.server import scripts
from giftstream.server.ledger.entries import LedgerEntry
from giftstream.server.money import keys
from giftstream.server.redis_cluster import RedisClient

SEEN_KEEP_MS = 3 * 24 * 3600 * 1000
DAY_MS = 24 * 3600 * 1000
DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
COUNTERS = ("diamonds", "coins", "gifts", "events")


class EarningsConsumer:
    """The `earnings` handler: counts `gift` entries into their creator's day and ignores the
    other kinds. `counted` and `duplicates` say what this instance did (tests, logs)."""

    def __init__(
        self,
        redis: RedisClient,
        ledger_key: str = keys.LEDGER,
        *,
        keyspace: keys.KeySpace = keys.SINGLE,
        seen_keep_ms: int = SEEN_KEEP_MS,
    ) -> None:
        self.redis = redis
        self.ledger_key = ledger_key  # unused: every ledger's gifts count the same
        self.keyspace = keyspace  # names the counters (in the creator's partition)
        self.seen_keep_ms = seen_keep_ms
        self.counted = 0
        self.duplicates = 0
        self._script: AsyncScript = scripts.register(redis, "earnings")

    async def __call__(self, entry: LedgerEntry) -> None:
        await self.apply(entry)

    async def apply(self, entry: LedgerEntry) -> bool:
        """Count a gift once; True when it was counted now, False when before (or not a gift)."""
        if entry.kind != "gift":
            return False
        d = entry.data
        creator, day = d["creator"], keys.utc_day(entry.ts)
        day_end_ms = (entry.ts // DAY_MS + 1) * DAY_MS
        keep_until = max(day_end_ms, int(time.time() * 1000)) + self.seen_keep_ms
        counted = await self._script(
            keys=[self.keyspace.earnings_seen(creator, day), self.keyspace.earnings(creator)],
            args=[entry.event, day, d["diamonds"], d["coins"], d["count"], keep_until],
        )
        if int(counted):
            self.counted += 1
            return True
        self.duplicates += 1
        return False


async def earnings(
    redis: RedisClient, creator: str, day: str, keyspace: keys.KeySpace = keys.SINGLE
) -> dict[str, Any]:
    """A creator's earnings on one UTC day (YYYY-MM-DD): diamonds credited, coins gifted,
    gift items received and gift events; zeros for a day without gifts."""
    if not DAY.fullmatch(day):
        raise ValueError(f"day must be YYYY-MM-DD, not {day!r}")
    values = await redis.hmget(keyspace.earnings(creator), [f"{day}:{name}" for name in COUNTERS])
    totals: dict[str, Any] = {"creator": creator, "day": day}
    for name, value in zip(COUNTERS, values, strict=True):
        totals[name] = 0 if value is None else int(value)
    return totals
