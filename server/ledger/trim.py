"""Trimming the ledger: only what every group has acked and the checkpoint has folded.

By stream id (XTRIM MINID), never by count (docs/queue.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from redis.exceptions import ResponseError

from giftstream.server.ledger.checkpoint import checkpoint_last_id
from giftstream.server.ledger.entries import next_stream_id, stream_id_key
from giftstream.server.money import keys
from giftstream.server.redis_cluster import RedisClient

log = logging.getLogger(__name__)


async def group_trim_points(
    redis: RedisClient, ledger_key: str = keys.LEDGER
) -> dict[str, str] | None:
    """Per consumer group, the oldest stream id it still needs: its oldest pending entry, or
    (nothing pending) the id right after its last delivered one. None when there is no
    stream; {} when it has no group."""
    try:
        groups = await redis.xinfo_groups(ledger_key)
    except ResponseError:  # no stream
        return None
    points: dict[str, str] = {}
    for info in groups:
        name = keys.text(info["name"])
        after_delivered = next_stream_id(keys.text(info["last-delivered-id"]))
        if int(info["pending"]):
            oldest = (await redis.xpending(ledger_key, info["name"]))["min"]
            # acked meanwhile: all it had pending was at or below its last delivered id
            points[name] = after_delivered if oldest is None else keys.text(oldest)
        else:
            points[name] = after_delivered
    return points


async def safe_trim_point(redis: RedisClient, ledger_key: str = keys.LEDGER) -> str | None:
    """The oldest stream id some consumer group still needs (see group_trim_points). None
    when the stream has no group: nothing may go, since a consumer may come later."""
    points = await group_trim_points(redis, ledger_key)
    return min(points.values(), key=stream_id_key) if points else None


@dataclass(frozen=True, slots=True)
class Trim:
    """What one trim did: `removed` entries below `min_id` (None: nothing could go), held
    there by `held_by` (a group, the checkpoint, or the entries kept), `left` entries left."""

    removed: int
    min_id: str | None
    held_by: str
    left: int

    def summary(self, ledger_key: str) -> str:
        if self.min_id is None:
            return f"trimmed nothing from {ledger_key}: {self.held_by}; {self.left} entries left"
        return (
            f"trimmed {self.removed} entries of {ledger_key} below {self.min_id} (held "
            f"there by {self.held_by}); {self.left} entries left"
        )


async def trim(redis: RedisClient, ledger_key: str = keys.LEDGER, *, keep_min_entries: int) -> Trim:
    """Remove the entries every consumer group has acked and the checkpoint has folded,
    keeping at least the last `keep_min_entries`. XTRIM MINID, exact: never MAXLEN, which
    cuts by count whoever still needs the entries. No groups, or no checkpoint yet (the
    audit replays what is not folded): nothing goes."""
    if type(keep_min_entries) is not int or keep_min_entries < 0:
        raise ValueError(f"keep_min_entries must be an integer >= 0, not {keep_min_entries!r}")

    async def nothing(why: str) -> Trim:
        return Trim(0, None, why, int(await redis.xlen(ledger_key)))

    points = await group_trim_points(redis, ledger_key)
    if points is None:
        return Trim(0, None, "no such stream", 0)
    if not points:
        return await nothing("no consumer group (one may come later)")
    folded = await checkpoint_last_id(redis, ledger_key)
    if folded is None:
        return await nothing("no checkpoint yet (run the checkpoint consumer)")
    bounds = {f"group {name}": point for name, point in points.items()}
    bounds["the checkpoint"] = next_stream_id(folded)
    if keep_min_entries:
        tail = await redis.xrevrange(ledger_key, count=keep_min_entries) or []
        if len(tail) < keep_min_entries:
            return await nothing(f"it holds fewer than the {keep_min_entries} entries kept")
        bounds[f"the last {keep_min_entries} entries kept"] = keys.text(tail[-1][0])
    held_by, min_id = min(bounds.items(), key=lambda bound: stream_id_key(bound[1]))
    removed = int(await redis.xtrim(ledger_key, minid=min_id, approximate=False))
    return Trim(removed, min_id, held_by, int(await redis.xlen(ledger_key)))


async def trim_all(
    redis: RedisClient, keyspace: keys.KeySpace, *, keep_min_entries: int
) -> dict[str, Trim]:
    """trim() of every partition's ledger (one stream on one Redis), each on its own: its
    groups, its checkpoint and its last `keep_min_entries`. Keyed by ledger stream."""
    return {
        ledger: await trim(redis, ledger, keep_min_entries=keep_min_entries)
        for ledger in keyspace.ledgers()
    }


async def trim_ledger(
    redis: RedisClient, ledger_key: str = keys.LEDGER, *, keep_min_entries: int
) -> int:
    """trim(), logged; how many entries went."""
    done = await trim(redis, ledger_key, keep_min_entries=keep_min_entries)
    if done.min_id is None and done.held_by.startswith("no checkpoint"):
        log.warning("%s", done.summary(ledger_key))
    elif done.removed:
        log.info("%s", done.summary(ledger_key))
    return done.removed
