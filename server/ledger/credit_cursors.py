"""The credit cursors as the downstream reads them: which gifts of a ledger have reached their
creator's wallet on a Redis Cluster.

A gift is appended to its sender's partition's ledger (s) and its diamonds are credited later
in its creator's partition (c) by the crediting step (server/money/crediting.py), which moves
`keys.credit_cursors(c)` field `pSS` to the last ledger id of s it credited, in the same
script as the credit. So a gift of ledger s for a creator of partition c is in the creator's
wallet iff its id <= that cursor; with no field, nothing of s is credited in c yet. One Redis
credits in the gift's own script: every gift is credited.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from giftstream.server.ledger.entries import stream_id_key
from giftstream.server.money import keys
from giftstream.server.money.crediting import read_cursor_ids
from giftstream.server.redis_cluster import RedisClient


@dataclass(frozen=True, slots=True)
class CreditCursors:
    """Every partition's cursors at one reading. `everything` (one Redis): all is credited."""

    keyspace: keys.KeySpace
    # (target partition, source partition) -> the last credited id, as a sortable pair
    cursors: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)
    everything: bool = False

    def credited(self, source: int, creator: str, stream_id: str) -> bool:
        """Whether the gift `stream_id` of ledger `source` has been credited to `creator`."""
        if self.everything:
            return True
        last = self.cursors.get((self.keyspace.partition(creator), source))
        return last is not None and stream_id_key(stream_id) <= last


async def read_credit_cursors(redis: RedisClient, keyspace: keys.KeySpace) -> CreditCursors:
    """Every partition's cursors (one HGETALL each, pipelined; on a cluster each to its
    shard). Cursors only move forward, except when a creator's shard fails over and loses a
    credit with its cursor, which crediting then applies again."""
    if not keyspace.cluster:
        return CreditCursors(keyspace, everything=True)
    read = await read_cursor_ids(redis, keyspace)
    cursors = {(target, source): stream_id_key(last) for (source, target), last in read.items()}
    return CreditCursors(keyspace, cursors)
