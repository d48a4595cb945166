"""The relay's lag: the ledger entries not yet handed to JetStream, and the oldest one's age."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ResponseError

from giftstream.server.ledger.entries import stream_id_key
from giftstream.server.ledger.relay.config import GROUP
from giftstream.server.money import keys
from giftstream.server.redis_cluster import RedisClient


@dataclass(frozen=True, slots=True)
class Lag:
    """What the relay has not yet handed to JetStream."""

    entries: int  # in the stream and not yet acked by the relay
    oldest_age_s: float  # age of the oldest of them (0 when there are none)
    last_delivered: str | None  # the relay group's last-delivered id (None: no group yet)

    def as_dict(self) -> dict[str, Any]:
        return {
            "entries": self.entries,
            "oldest_age_s": round(self.oldest_age_s, 3),
            "last_delivered": self.last_delivered,
        }


async def relay_lag(redis: RedisClient, ledger_key: str = keys.LEDGER) -> Lag:
    """Entries not yet relayed and the age of the oldest, from the stream and the group."""
    now_ms = time.time() * 1000
    # The group's counts and its pending summary in one MULTI, so both describe one moment:
    # read apart, a relay acking its batch in between leaves XINFO saying "pending 3" and
    # XPENDING saying "nothing pending, oldest None".
    async with redis.pipeline(transaction=True) as pipe:
        pipe.xinfo_groups(ledger_key)
        pipe.xpending(ledger_key, GROUP)
        groups, summary = await pipe.execute(raise_on_error=False)
    if isinstance(groups, ResponseError):  # no stream yet
        return Lag(0, 0.0, None)
    group = next((g for g in groups if keys.text(g["name"]) == GROUP), None)
    if group is None:  # the relay never ran: everything is waiting (XPENDING said NOGROUP)
        length = int(await redis.xlen(ledger_key))
        first = await redis.xrange(ledger_key, count=1)
        oldest = _age_s(keys.text(first[0][0]), now_ms) if first else 0.0
        return Lag(length, oldest, None)
    last_delivered = keys.text(group["last-delivered-id"])
    pending = int(group["pending"])
    lag = group.get("lag")
    if lag is None:  # Redis cannot tell (entries deleted); count what follows
        lag = len(await redis.xrange(ledger_key, min="(" + last_delivered, count=100_000) or [])
    if isinstance(summary, Exception):
        raise summary
    oldest = 0.0
    if pending and summary["min"] is not None:  # None only if pending is 0 in this snapshot
        oldest = _age_s(keys.text(summary["min"]), now_ms)
    elif lag:
        after = await redis.xrange(ledger_key, min="(" + last_delivered, count=1)
        oldest = _age_s(keys.text(after[0][0]), now_ms) if after else 0.0
    return Lag(pending + int(lag), oldest, last_delivered)


def _age_s(stream_id: str, now_ms: float) -> float:
    return max(0.0, (now_ms - stream_id_key(stream_id)[0]) / 1000)
