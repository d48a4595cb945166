"""Crediting creators across partitions on a Redis Cluster: exactly once, within 1 s.

On a cluster a gift's script runs on the sender's shard: it debits the sender, appends the
ledger entry and appends the creator's part to an outbox of the sender's partition s for the
creator's partition c (`keys.credit_outbox(s, c)`, same id as the ledger entry). A round here
moves those parts to the creators:

 1. `read_cursors`: every partition's cursors hash (`keys.credit_cursors(c)`, field pSS = the
    last outbox id of s credited to c), in one cluster pipeline.
 2. `take(s)`: on s's shard, credit_take.lua reads every outbox of s after its cursor and
    writes a marker, and a `WAIT n` on the same connection (same_connection.py) must then
    hear from all n replicas: a gift is never credited while a failover of its sender's shard
    could still lose it. Otherwise nothing of s is credited this round (a hold-back).
 3. `credit(s, c, ...)`: on c's shard, credit.lua credits the entries and moves the cursor in
    one step, if the cursor is still the one read in 1 (else another runner was first: a CAS
    loss, nothing written).

A crash anywhere leaves either nothing done or a credit with its cursor; the next round,
here or on any gateway, goes on from the cursors. Many runners at once are safe (the CAS),
and each gateway runs one: woken by `poke()` after each gift it settled, else every 100 ms.
Entries stay in the outbox an hour after their credit: a failover of the creator's shard
that loses a credit loses its cursor with it, and the entry is credited again.

`redis` may also be one plain Redis holding the cluster's hash-tagged names (tests, the model
test): its takes then wait for no replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from giftstream.server import scripts
from giftstream.server.metrics import Metrics
from giftstream.server.money import keys
from giftstream.server.money.same_connection import Replicas, script_then_wait
from giftstream.server.redis_cluster import RedisClient

log = logging.getLogger(__name__)

DEFAULT_BATCH = 256  # entries per outbox per round (one credit.lua call each)
DEFAULT_RETENTION_MS = 3_600_000  # an outbox keeps credited entries this long
DEFAULT_WAIT_TIMEOUT_MS = 200  # how long a take waits for its replicas before holding back
# What credit.lua takes per entry after its id, in order (the outbox's field names).
ENTRY_FIELDS = (
    "event",
    "diamonds",
    "release",
    "ts",
    "count",
    "combo",
    "room_json",
    "sender_json",
    "gift_json",
    "log_size",
    "creator",
    "sender",
    "coins",
    "name_json",
    "session",
)
# What an entry written before the leaderboards lacks: coins 0 counts it on no board.
_LEGACY_DEFAULTS = {"sender": b"", "coins": b"0", "name_json": b"", "session": b"0"}

_EVENT_PARTS = ("room_json", "sender_json", "gift_json")
Cursors = dict[tuple[int, int], str]  # (source, target) -> last outbox id credited


async def read_cursor_ids(redis: RedisClient, keyspace: keys.KeySpace) -> Cursors:
    """Every partition's cursors hash (one HGETALL each, pipelined: on a cluster each to its
    shard), as (source, target) -> the last outbox id credited; a field that names no
    partition is no cursor. The runner's step 1, and what the audit counts as credited."""
    async with redis.pipeline(transaction=False) as pipe:
        for target in range(keyspace.partitions):
            pipe.hgetall(keyspace.credit_cursors(target))
        hashes = await pipe.execute()
    by_field = {keyspace.credit_cursor_field(s): s for s in range(keyspace.partitions)}
    cursors: Cursors = {}
    for target, stored in enumerate(hashes):
        for name, value in stored.items():
            source = by_field.get(keys.text(name))
            if source is not None:
                cursors[(source, target)] = keys.text(value)
    return cursors


@dataclass(frozen=True, slots=True)
class Entry:
    """One gift's creator part, as its outbox holds it."""

    id: str
    fields: dict[str, bytes]

    @property
    def creator(self) -> str:
        return keys.text(self.fields["creator"])

    @property
    def room(self) -> str:
        return keys.text(self.fields["room"])

    @property
    def ts(self) -> int:
        return int(self.fields["ts"])


class Crediting:
    """The crediting rounds of one runner; see the module docstring. `round()` is one round,
    `run()` rounds until stopped, `poke()` asks for a round now."""

    def __init__(
        self,
        redis: RedisClient,
        keyspace: keys.KeySpace,
        metrics: Metrics | None = None,
        *,
        batch: int = DEFAULT_BATCH,
        retention_ms: int = DEFAULT_RETENTION_MS,
        wait_timeout_ms: int = DEFAULT_WAIT_TIMEOUT_MS,
    ) -> None:
        if not keyspace.cluster:
            raise ValueError("crediting is for a Redis Cluster: one Redis credits in send_gift")
        self._redis = redis
        self._keys = keyspace
        self._metrics = metrics
        self._batch = batch
        self._retention_ms = retention_ms
        self._wait_timeout_ms = wait_timeout_ms
        self._take = scripts.register(redis, "credit_take")
        self._credit = scripts.register(redis, "credit")
        self._replicas = Replicas(redis) if isinstance(redis, RedisCluster) else None
        self._poked = asyncio.Event()
        self._more = False  # the last round left entries behind (a full batch)

    def poke(self) -> None:
        """A gift was settled here: credit it now rather than at the next tick."""
        self._poked.set()

    async def run(self, stop: asyncio.Event, interval_s: float = 0.1) -> None:
        """Round after round until `stop` is set: at once after a full batch, else on a
        poke or after `interval_s`. A failed round is logged and the next one tries again."""
        while not stop.is_set():
            self._poked.clear()
            try:
                await self.round()
            except (RedisError, OSError) as exc:
                log.warning("crediting: round failed, trying again: %s", exc)
            if self._more:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poked.wait(), interval_s)

    async def round(self) -> int:
        """One round over every partition; returns how many gifts it credited."""
        cursors = await self.read_cursors()
        taken = await asyncio.gather(*(self.take(s, cursors) for s in self._partitions))
        credits = []
        oldest: int | None = None
        self._more = False
        for s, per_target in enumerate(taken):
            for c, entries in (per_target or {}).items():
                first = entries[0].ts
                oldest = first if oldest is None else min(oldest, first)
                self._more = self._more or len(entries) >= self._batch
                credits.append(self.credit(s, c, cursors.get((s, c), ""), entries))
        applied = sum(await asyncio.gather(*credits))
        if self._metrics is not None:
            lag = 0 if oldest is None else max(int(time.time() * 1000) - oldest, 0)
            self._metrics.credit_lag_ms.set(lag)
        return applied

    @property
    def _partitions(self) -> range:
        return range(self._keys.partitions)

    async def read_cursors(self) -> Cursors:
        """Step 1: every (source, target) cursor, read in one cluster pipeline."""
        return await read_cursor_ids(self._redis, self._keys)

    async def take(self, source: int, cursors: Cursors) -> dict[int, list[Entry]] | None:
        """Step 2: the uncredited entries of `source`, by target partition (only those with
        entries), once its replicas hold them; None: hold back `source` this round."""
        outboxes = [self._keys.credit_outbox(source, c) for c in self._partitions]
        marker = self._keys.credit_take_marker(source)
        args: list[Any] = [cursors.get((source, c), "") for c in self._partitions]
        args += [self._batch, self._retention_ms]
        try:
            if isinstance(self._redis, RedisCluster):
                assert self._replicas is not None
                node, replicas = await self._replicas.of(marker)
                reply, acked = await script_then_wait(
                    node, self._take, [*outboxes, marker], args, replicas, self._wait_timeout_ms
                )
            else:
                replicas = 0
                reply = await self._take(keys=[*outboxes, marker], args=args)
                acked = 0
        except RedisError as exc:  # MOVED after a failover, a lost connection, ...
            log.info("crediting: partition %d held back: %s", source, exc)
            self._held_back()
            await self._let_client_find(marker)
            return None
        found = {c: [_entry(raw) for raw in read] for c, read in enumerate(reply) if read}
        if found and acked < replicas:
            log.info(
                "crediting: partition %d held back: %d of %d replicas", source, acked, replicas
            )
            self._held_back()
            return None
        return found

    async def credit(
        self, source: int, target: int, expected: str, entries: Sequence[Entry]
    ) -> int:
        """Step 3: credit `entries` (read after cursor `expected`) in `target`; returns how
        many were credited (0: another runner moved the cursor first)."""
        script_keys = [self._keys.credit_cursors(target)]
        args: list[Any] = [self._keys.credit_cursor_field(source), expected]
        for entry in entries:
            entry_keys, event = self._entry_keys(target, entry)
            script_keys += entry_keys
            args.append(entry.id)
            args += [
                entry.fields.get(name, _LEGACY_DEFAULTS.get(name, b""))
                if event or name not in _EVENT_PARTS
                else b""
                for name in ENTRY_FIELDS
            ]
        reply = await self._credit(keys=script_keys, args=args)
        if keys.text(reply[0]) != "ok":
            if self._metrics is not None:
                self._metrics.credit_cas_losses.inc()
            return 0
        if self._metrics is not None:
            self._metrics.credits_applied.inc(len(entries))
        return len(entries)

    def _entry_keys(self, target: int, entry: Entry) -> tuple[list[str], bool]:
        """(creator wallet, held, room record, room log, session board, then the creator's
        boards and names; whether the room gets the event). A room of another partition than
        its creator (never from the gateway: a room id is its creator's id) gets no event and
        no session count: its keys would sit on another slot and stop this source for good,
        so its record, log and session board are the wallet's name, untouched."""
        ks = self._keys
        creator = entry.creator
        if ks.partition(creator) != target:
            raise ValueError(f"outbox of partition {target} holds creator {creator}")
        wallet, held = ks.wallet(creator), ks.held(creator)
        boards = [
            ks.board_week_prefix(creator),
            ks.board_names(creator),
            ks.board_creators_day_prefix(target),
            ks.board_creator_names(target),
        ]
        room = entry.room
        if ks.partition(room) != target:
            return [wallet, held, wallet, wallet, wallet, *boards], False
        room_keys = [ks.room(room), ks.room_log(room), ks.board_session(room)]
        return [wallet, held, *room_keys, *boards], bool(entry.fields.get("room_json"))

    def _held_back(self) -> None:
        if self._metrics is not None:
            self._metrics.credit_wait_holdbacks.inc()

    async def _let_client_find(self, key: str) -> None:
        """A routed read of `key`: redis-py follows a MOVED or a dead node there and renews
        its slot map, so the next round's take goes to the shard's master now."""
        with contextlib.suppress(RedisError):
            await self._redis.exists(key)


def _entry(raw: Sequence[Any]) -> Entry:
    """An XRANGE entry [id, [field, value, ...]] as Lua handed it back."""
    flat = raw[1]
    return Entry(
        id=keys.text(raw[0]),
        fields={keys.text(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)},
    )
