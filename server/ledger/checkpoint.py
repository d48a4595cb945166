"""The ledger checkpoint: the audit's replay state (server/ledger/audit.py `Replay`), folded forward
in stream order by the built-in consumer group `checkpoint` and saved in Redis, so that the
ledger can be trimmed and `giftstream audit` still checks every wallet as if it were whole.

    LEDGER:checkpoint            hash: last_id (the last entry folded), entries, the audit's
                                 totals (coins_purchased, ..., cents_paid_out), updated_ms
    LEDGER:checkpoint:wallets    hash: user -> {"coins":…,"diamonds":…,"debt":…} by the ledger,
                                 and "held": {payable_at ms: diamonds} while any are on hold
    LEDGER:checkpoint:receipts   hash: receipt -> {"user":…,"coins":…,"refunded":…} (refund checks)
    LEDGER:checkpoint:payouts    set: payout keys paid (a key paid twice is a breach)
    LEDGER:checkpoint:negative   set: "balance:user" already reported negative
    LEDGER:checkpoint:breaches   list: breaches met while folding (malformed entries, ...),
                                 kept for good: the audit reports them after a trim too

The fold runs the audit's own code, so the two cannot disagree; each chunk lands in one Lua
script that refuses it unless the checkpoint is still where the fold read it. Event ids are
checked unique within a chunk and after the checkpoint, not across it (that would keep every
id forever); receipts and payout keys, which carry the money rules, are checked for good.

On a Redis Cluster each partition's ledger has its own checkpoint (its keys carry the ledger's
name, so its tag: one script on one shard). Its wallets are that ledger's part of each wallet
(the audit sums the parts), and it folds a gift only once the gift's creator is credited (the
credit cursors, credit_cursors.py): the fold stops before the first gift crediting has not
reached, so everything folded is in the wallets and trimming (held by the checkpoint) never
removes a gift still to be credited.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import orjson
from redis.commands.core import AsyncScript

from giftstream.server import scripts
from giftstream.server.ledger.audit import AuditReport, Balances, Replay, StreamState
from giftstream.server.ledger.credit_cursors import read_credit_cursors
from giftstream.server.ledger.entries import LedgerEntry, LedgerError, parse_entry, stream_id_key
from giftstream.server.money import keys
from giftstream.server.redis_cluster import RedisClient

log = logging.getLogger(__name__)

GROUP = "checkpoint"  # its consumer group: trimming waits for it like for any group
FOLD_CHUNK = 500  # entries folded per script call
MAX_CONFLICTS = 20  # another folder moved the checkpoint this often in a row: give up
TOTALS = (
    "coins_purchased",
    "debt_repaid",
    "coins_refunded",
    "debt_recorded",
    "coins_spent",
    "diamonds_credited",
    "platform_share",
    "diamonds_paid_out",
    "cents_paid_out",
)
BALANCES = ("coins", "diamonds", "debt")


class CheckpointConflict(RuntimeError):
    """Other folders kept moving the checkpoint; the entry stays pending and is tried again."""


class CreditPending(RuntimeError):
    """A cluster's fold stopped before a gift crediting has not reached yet; the entry stays
    pending and is tried again (crediting runs every 100 ms)."""


@dataclass(frozen=True, slots=True)
class CheckpointKeys:
    main: str
    wallets: str
    receipts: str
    payouts: str
    negative: str
    breaches: str

    @classmethod
    def of(cls, ledger_key: str = keys.LEDGER) -> CheckpointKeys:
        base = keys.checkpoint(ledger_key)
        return cls(
            base,
            base + ":wallets",
            base + ":receipts",
            base + ":payouts",
            base + ":negative",
            base + ":breaches",
        )

    def all(self) -> list[str]:
        return [self.main, self.wallets, self.receipts, self.payouts, self.negative, self.breaches]


@dataclass(slots=True)
class Checkpoint:
    last_id: str  # the last ledger entry folded
    replay: Replay  # the audit's state right after that entry; its report counts entries


async def checkpoint_last_id(redis: RedisClient, ledger_key: str = keys.LEDGER) -> str | None:
    """The last entry the checkpoint has folded; None when there is no checkpoint yet."""
    value = await redis.hget(CheckpointKeys.of(ledger_key).main, "last_id")
    return None if value is None else keys.text(value)


async def snapshot(
    redis: RedisClient, ledger_key: str = keys.LEDGER, *, partitioned: bool = False
) -> tuple[Checkpoint | None, StreamState]:
    """The whole checkpoint and the stream's state, read in one MULTI so they agree.
    `partitioned`: one of a cluster's ledgers (audit.Replay)."""
    k = CheckpointKeys.of(ledger_key)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.xinfo_stream(ledger_key)
        pipe.hgetall(k.main)
        pipe.hgetall(k.wallets)
        pipe.hgetall(k.receipts)
        pipe.smembers(k.payouts)
        pipe.smembers(k.negative)
        pipe.lrange(k.breaches, 0, -1)
        info, main, wallets, receipts, payouts, negative, breaches = await pipe.execute(
            raise_on_error=False
        )
    for reply in (main, wallets, receipts, payouts, negative, breaches):
        if isinstance(reply, Exception):
            raise reply
    stream = StreamState.of(info)
    main = _names(main)
    if "last_id" not in main:
        return None, stream
    replay = _restore(main, wallets, receipts, payouts, negative, partitioned=partitioned)
    replay.report.breaches.extend(keys.text(b) for b in breaches)
    return Checkpoint(keys.text(main["last_id"]), replay), stream


class CheckpointFolder:
    """The `checkpoint` group's handler. Handed an entry, it folds the ledger in stream order
    from the checkpoint up to that entry (and a chunk past it), whatever order entries come
    in: a retried entry is then already folded, and trimming what the group acked removes
    only folded entries. Idempotent by stream id; safe to run twice at once.

    Given a cluster's `keyspace`, `ledger_key` is one of its partitions' ledgers and the fold
    waits for crediting (CreditPending when an entry handed to it is not folded for that)."""

    def __init__(
        self,
        redis: RedisClient,
        ledger_key: str = keys.LEDGER,
        *,
        chunk: int = FOLD_CHUNK,
        keyspace: keys.KeySpace = keys.SINGLE,
    ) -> None:
        if chunk < 1:
            raise ValueError("chunk must be at least 1")
        self.redis = redis
        self.ledger_key = ledger_key
        self.keyspace = keyspace
        self.partitioned = keyspace.cluster
        self.source = keyspace.ledgers().index(ledger_key) if keyspace.cluster else 0
        self._waiting = False  # the last fold stopped before a gift not credited yet
        self.keys = CheckpointKeys.of(ledger_key)
        self.chunk = chunk
        self._script: AsyncScript = scripts.register(redis, "checkpoint")
        # Highest id known folded: the checkpoint only moves forward, so this is never ahead
        # of it (unless the checkpoint is deleted: restart the folders after resetting it).
        self._folded: tuple[int, int] | None = None

    async def __call__(self, entry: LedgerEntry) -> None:
        if self._folded is None or stream_id_key(entry.id) > self._folded:
            await self.fold(through=entry.id)
            if self._waiting:
                raise CreditPending(
                    f"{self.ledger_key}: the checkpoint waits for a gift's creator credit "
                    f"before folding on to {entry.id}"
                )

    async def fold(self, through: str | None = None) -> str | None:
        """Fold until `through` is folded (None: up to the stream's last entry now); the
        checkpoint's last id after. An entry deleted before it was folded is skipped, as
        the audit would."""
        if through is None:
            newest = await self.redis.xrevrange(self.ledger_key, count=1)
            if not newest:
                return await checkpoint_last_id(self.redis, self.ledger_key)
            through = keys.text(newest[0][0])
        target = stream_id_key(through)
        conflicts = 0  # chunks in a row another folder landed first
        self._waiting = False
        while True:
            last = await checkpoint_last_id(self.redis, self.ledger_key)
            if last is not None:
                self._folded = max(self._folded or (0, 0), stream_id_key(last))
            if self._folded is not None and self._folded >= target:
                return last
            outcome = await self._fold_chunk(last)
            if outcome == "empty":
                return last  # nothing after the checkpoint: `through` is gone
            if outcome == "waiting":
                self._waiting = True
                return last  # the next entry is a gift crediting has not reached
            if outcome == "ok":
                conflicts = 0
                continue
            conflicts += 1  # 'conflict' or 'folded': another folder got there first
            if conflicts >= MAX_CONFLICTS:
                raise CheckpointConflict(f"checkpoint moved {conflicts} times under a fold")
            await asyncio.sleep(random.uniform(0, 0.002 * conflicts))  # let one folder win

    async def _fold_chunk(self, last: str | None) -> str:
        """Fold the chunk after `last`, where the checkpoint was: 'ok', 'folded' (someone
        else did), 'conflict' (it moved meanwhile), 'empty' (nothing after it) or, on a
        cluster, 'waiting' (the next entry is a gift not credited yet)."""
        k = self.keys
        start = "-" if last is None else "(" + last
        page = await self.redis.xrange(self.ledger_key, min=start, max="+", count=self.chunk)
        if not page:
            return "empty"
        entries = [(keys.text(stream_id), fields or {}) for stream_id, fields in page]
        if self.partitioned:
            entries = await self._credited_prefix(entries)
            if not entries:
                return "waiting"
        users, receipts, payout_keys = _touched(entries)
        negatives = [f"{name}:{user}" for user in users for name in BALANCES]
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(k.main)
            pipe.hmget(k.wallets, users or ["-"])
            pipe.hmget(k.receipts, receipts or ["-"])
            pipe.smismember(k.payouts, payout_keys or ["-"])
            pipe.smismember(k.negative, negatives or ["-"])
            main, wallet_values, receipt_values, paid, negative = await pipe.execute()
        main = _names(main)
        if _opt_text(main.get("last_id")) != last:
            return "conflict"
        replay = _restore(
            main,
            {u: v for u, v in zip(users, wallet_values, strict=False) if v is not None},
            {r: v for r, v in zip(receipts, receipt_values, strict=False) if v is not None},
            [key for key, flag in zip(payout_keys, paid, strict=False) if flag],
            [n for n, flag in zip(negatives, negative, strict=False) if flag],
            partitioned=self.partitioned,
        )
        for stream_id, fields in entries:
            replay.feed(stream_id, fields)
        new_last = entries[-1][0]
        outcome = keys.text(
            await self._script(keys=k.all(), args=[last or "", new_last, *_dump(replay)])
        )
        if outcome == "ok":
            self._folded = stream_id_key(new_last)
            if replay.report.breaches:
                log.warning(
                    "checkpoint folded %d breaches up to %s: %s",
                    len(replay.report.breaches),
                    new_last,
                    "; ".join(replay.report.breaches),
                )
        return outcome

    async def _credited_prefix(
        self, entries: list[tuple[str, dict[Any, Any]]]
    ) -> list[tuple[str, dict[Any, Any]]]:
        """The entries before the first gift whose creator crediting has not reached (the
        cursors read now: they only move forward)."""
        cursors = await read_credit_cursors(self.redis, self.keyspace)
        for n, (stream_id, fields) in enumerate(entries):
            try:
                entry = parse_entry(stream_id, fields)
            except LedgerError:
                continue  # folded as the breach it is
            if entry.kind == "gift" and not cursors.credited(
                self.source, entry.data["creator"], stream_id
            ):
                return entries[:n]
        return entries


async def fold_checkpoint(
    redis: RedisClient, ledger_key: str = keys.LEDGER, *, keyspace: keys.KeySpace = keys.SINGLE
) -> str | None:
    """Fold the checkpoint up to the ledger's last entry now (on a cluster: up to the first
    gift not credited yet), without the consumer group (an operator's catch-up, or a
    test's); the checkpoint's last id after."""
    return await CheckpointFolder(redis, ledger_key, keyspace=keyspace).fold()


async def fold_checkpoints(redis: RedisClient, keyspace: keys.KeySpace) -> dict[str, str | None]:
    """fold_checkpoint of every partition's ledger, keyed by ledger stream."""
    return {
        ledger: await fold_checkpoint(redis, ledger, keyspace=keyspace)
        for ledger in keyspace.ledgers()
    }


def _touched(entries: list[tuple[str, dict[Any, Any]]]) -> tuple[list[str], list[str], list[str]]:
    """The users, receipts and payout keys a chunk's entries touch: all of the stored state
    its fold needs."""
    users: dict[str, None] = {}
    receipts: dict[str, None] = {}
    payout_keys: dict[str, None] = {}
    for stream_id, fields in entries:
        try:
            data = parse_entry(stream_id, fields).data
        except LedgerError:
            continue  # a breach of its own; it touches nothing
        for name in ("sender", "creator", "user"):
            if name in data:
                users[data[name]] = None
        if data["kind"] in ("purchase", "refund"):
            receipts[data["receipt"]] = None
        if data["kind"] == "payout":
            payout_keys[data["key"]] = None
    return list(users), list(receipts), list(payout_keys)


def _restore(
    main: dict[str, Any],
    wallets: dict[Any, Any],
    receipts: dict[Any, Any],
    payouts: Any,
    negative: Any,
    *,
    partitioned: bool = False,
) -> Replay:
    """A Replay at the saved state (all of it, or the part a chunk touches)."""
    report = AuditReport()
    report.entries = int(main.get("entries", 0))
    for name in TOTALS:
        setattr(report, name, int(main.get(name, 0)))
    replay = Replay(report, partitioned=partitioned)
    for user, raw in wallets.items():
        saved = orjson.loads(raw)
        balances = Balances(
            int(saved["coins"]),
            int(saved["diamonds"]),
            int(saved["debt"]),
            {int(at): int(diamonds) for at, diamonds in saved.get("held", {}).items()},
        )
        replay.wallets[keys.text(user)] = balances
    for receipt, raw in receipts.items():
        saved = orjson.loads(raw)
        if saved.get("user") is not None:
            replay.receipts[keys.text(receipt)] = {"user": saved["user"], "coins": saved["coins"]}
        if saved.get("refunded"):
            replay.refunded.add(keys.text(receipt))
    replay.payout_keys.update(keys.text(key) for key in payouts)
    for member in negative:
        name, _, user = keys.text(member).partition(":")
        replay.negative.add((user, name))
    return replay


def _dump(replay: Replay) -> list[Any]:
    """The script's counts and items: main fields, wallets, receipts, payout keys, negatives,
    the chunk's new breaches."""
    report = replay.report
    main: list[Any] = ["entries", report.entries, "updated_ms", int(time.time() * 1000)]
    for name in TOTALS:
        main += [name, getattr(report, name)]
    wallets: list[Any] = []
    for user, balances in replay.wallets.items():
        saved_wallet: dict[str, Any] = {n: getattr(balances, n) for n in BALANCES}
        if balances.held:  # a creator's holds not over when last touched
            saved_wallet["held"] = {str(at): diamonds for at, diamonds in balances.held.items()}
        wallets += [user, orjson.dumps(saved_wallet)]
    receipts: list[Any] = []
    for receipt in replay.receipts.keys() | replay.refunded:
        purchase = replay.receipts.get(receipt)
        saved = {
            "user": None if purchase is None else purchase["user"],
            "coins": None if purchase is None else purchase["coins"],
            "refunded": receipt in replay.refunded,
        }
        receipts += [receipt, orjson.dumps(saved)]
    payouts = sorted(replay.payout_keys)
    negatives = sorted(f"{name}:{user}" for user, name in replay.negative)
    breaches = list(report.breaches)
    counts = [
        len(main) // 2,
        len(wallets) // 2,
        len(receipts) // 2,
        len(payouts),
        len(negatives),
        len(breaches),
    ]
    return [*counts, *main, *wallets, *receipts, *payouts, *negatives, *breaches]


def _names(fields: dict[Any, Any]) -> dict[str, Any]:
    """A hash's fields by name, whether the client decodes replies or not."""
    return {keys.text(name): value for name, value in fields.items()}


def _opt_text(value: Any) -> str | None:
    return None if value is None else keys.text(value)
