"""The audit: replay the ledger and compare every wallet in Redis with it (DESIGN.md §2).

The replay starts from the checkpoint (server/ledger/checkpoint.py) when there is one, so a
trimmed ledger still audits as if it were whole; the money invariants are checked on the way.

Diamonds on hold: each gift entry says when its diamonds become payable (`payable_at`), so
the ledger alone says, at any time, how many of a creator's diamonds are on hold; no payout
may take more than the rest (credited - paid out - on hold, at the payout's ts), and the
holds in Redis must match the ledger's at the audit's time (Redis's clock).

On a Redis Cluster each partition has its ledger and its checkpoint. A movement changes only
wallets of its own ledger's partition, except a gift's creator credit, which crediting applies
later in the creator's partition and records by a credit cursor (credit_cursors.py): each
ledger is replayed on its own, a gift counting for its creator iff the cursor says it is
credited, and the per-ledger wallets are summed. A creator's diamonds then come from every
ledger, so the checks on diamonds that need them all (none negative; a payout's payable
diamonds) are made on the sum: the none-negative one at the audit's end, the payable one by
the payout script alone (the sum at a payout's moment depends on crediting's timing).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from giftstream.server.ledger.credit_cursors import read_credit_cursors
from giftstream.server.ledger.entries import LedgerEntry, LedgerError, parse_entry, read_raw
from giftstream.server.money import keys
from giftstream.server.redis_cluster import RedisClient


@dataclass(slots=True)
class Balances:
    coins: int = 0
    diamonds: int = 0
    debt: int = 0
    held: dict[int, int] = field(default_factory=dict)  # payable_at ms -> diamonds on hold

    def add(self, other: Balances) -> None:
        """Sum in another ledger's part of the same wallet (a cluster's partitions)."""
        self.coins += other.coins
        self.diamonds += other.diamonds
        self.debt += other.debt
        for at, diamonds in other.held.items():
            self.held[at] = self.held.get(at, 0) + diamonds

    def mature(self, now_ms: int) -> int:
        """Drop the holds over at now_ms; the diamonds still on hold."""
        for at in [at for at in self.held if at <= now_ms]:
            del self.held[at]
        return sum(self.held.values())


@dataclass(frozen=True, slots=True)
class StreamState:
    """What Redis says of the stream itself: the audit replays up to `last_id`, and counts
    entries against `entries_added` (XADDs ever, trims and deletions included)."""

    last_id: str | None  # last-generated-id; None: no stream
    entries_added: int | None  # None: a Redis before 7.0, which does not count

    @classmethod
    def of(cls, info: Any) -> StreamState:
        """From an XINFO STREAM reply, or the error it gave for a missing stream."""
        if isinstance(info, Exception):
            if "no such key" not in str(info).lower():
                raise info
            return cls(None, 0)
        added = info.get("entries-added")
        return cls(keys.text(info["last-generated-id"]), None if added is None else int(added))


async def stream_state(redis: RedisClient, ledger_key: str = keys.LEDGER) -> StreamState:
    try:
        return StreamState.of(await redis.xinfo_stream(ledger_key))
    except ResponseError as exc:
        return StreamState.of(exc)


@dataclass(slots=True)
class AuditReport:
    entries: int = 0  # ever in the ledger: folded into the checkpoint, plus replayed
    wallets: int = 0
    breaches: list[str] = field(default_factory=list)
    coins_purchased: int = 0  # package coins of every purchase
    debt_repaid: int = 0  # of those, coins that paid debt down instead of reaching a balance
    coins_refunded: int = 0  # taken back by refunds
    debt_recorded: int = 0  # refunds could not take back
    coins_spent: int = 0  # on gifts
    diamonds_credited: int = 0
    diamonds_uncredited: int = 0  # of gifts whose creator crediting has not reached (cluster)
    platform_share: int = 0
    diamonds_paid_out: int = 0
    cents_paid_out: int = 0
    coins_held: int = 0  # in Redis wallets now
    diamonds_held: int = 0
    diamonds_on_hold: int = 0  # of diamonds_held, those not payable yet (Redis, at the audit)
    debt: int = 0  # owed in Redis wallets now
    checkpoint: str | None = None  # the last entry the checkpoint had folded; None: no checkpoint
    # (on a cluster: how many of the partitions' ledgers had a checkpoint, e.g. "3 of 16 ledgers")
    replayed: int = 0  # entries read from the stream by this audit

    @property
    def ok(self) -> bool:
        return not self.breaches

    def summary(self) -> str:
        return (
            f"{self.entries} ledger entries, {self.wallets} wallets; "
            f"coins: {self.coins_purchased} purchased, {self.coins_refunded} refunded, "
            f"{self.coins_spent} spent, {self.coins_held} held; "
            f"diamonds: {self.diamonds_credited} credited"
            + (
                f" ({self.diamonds_uncredited} more not yet credited)"
                if self.diamonds_uncredited
                else ""
            )
            + f", {self.diamonds_paid_out} paid out "
            f"({self.cents_paid_out} cents), {self.diamonds_held} held "
            f"({self.diamonds_on_hold} of them on hold); "
            f"platform share {self.platform_share} coins; debt {self.debt}"
            + (
                f"; from the checkpoint at {self.checkpoint}, {self.replayed} entries replayed"
                if self.checkpoint is not None
                else ""
            )
        )


AUDIT_ATTEMPTS = 3  # a trim racing the audit (see below) is retried this often


async def audit(
    redis: RedisClient,
    *,
    keyspace: keys.KeySpace = keys.SINGLE,
    from_checkpoint: bool = True,
    now_ms: int | None = None,
) -> AuditReport:
    """Replay the ledger and compare every wallet (coins, diamonds, debt).

    With a checkpoint (and `from_checkpoint`), the replay starts from its folded state and
    reads only the entries after it, which trimming never removes; it also counts entries
    against the stream's `entries-added`, so an entry deleted or trimmed before it was
    folded is named even when no wallet shows it. `from_checkpoint=False` replays from empty:
    the checkpoint itself can be checked against that while nothing has been trimmed.
    Holds are judged at now_ms: Redis's time unless a test's money clock says otherwise.
    The ledger is `keyspace.ledgers()`: one stream on one Redis, one per partition on a
    cluster, each with its own checkpoint; the wallets its keys.

    Read in this order: the credit cursors, then the ledgers, then the wallets, so every id
    a cursor names is in the ledger read (on a quiet system; a live one may show movements
    made between the reads)."""
    cursors = await read_credit_cursors(redis, keyspace)
    replays: list[Replay] = []
    for source, ledger_key in enumerate(keyspace.ledgers()):

        def credited(entry: LedgerEntry, source: int = source) -> bool:
            return cursors.credited(source, entry.data["creator"], entry.id)

        replays.append(
            await _audit_ledger(
                redis,
                ledger_key,
                from_checkpoint,
                partitioned=keyspace.cluster,
                credited=None if cursors.everything else credited,
            )
        )
    replay = replays[0] if len(replays) == 1 else merge(replays)
    if now_ms is None:
        seconds, micros = await _time(redis)
        now_ms = int(seconds) * 1000 + int(micros) // 1000
    replay.compare(await _stored_wallets(redis, keyspace, replay.report, now_ms), now_ms)
    return replay.report


async def _time(redis: RedisClient) -> tuple[int, int]:
    """Redis's clock: one node's on a cluster (the masters' clocks agree well enough for
    holds counted in days)."""
    if isinstance(redis, aioredis.Redis):
        seconds, micros = await redis.time()
    else:
        seconds, micros = await redis.time(target_nodes=redis.get_random_node())
    return int(seconds), int(micros)


async def _audit_ledger(
    redis: RedisClient,
    ledger_key: str,
    from_checkpoint: bool,
    *,
    partitioned: bool = False,
    credited: Callable[[LedgerEntry], bool] | None = None,
) -> Replay:
    """One ledger's replay, with the breach its entry count shows, if any."""
    from giftstream.server.ledger.checkpoint import checkpoint_last_id  # it builds on Replay, below

    for attempt in range(1, AUDIT_ATTEMPTS + 1):
        replay, gap = await _replay(redis, ledger_key, from_checkpoint, partitioned, credited)
        # A gap may also be the checkpoint folding on, and a trim removing entries past the
        # state we loaded, while we read: then the count is wrong, not the ledger. Look again.
        if gap is None or attempt == AUDIT_ATTEMPTS:
            break
        if await checkpoint_last_id(redis, ledger_key) == replay.report.checkpoint:
            break
    if gap is not None:
        replay.report.breaches.append(gap)
    return replay


async def _replay(
    redis: RedisClient,
    ledger_key: str,
    from_checkpoint: bool,
    partitioned: bool,
    credited: Callable[[LedgerEntry], bool] | None,
) -> tuple[Replay, str | None]:
    """One replay (from the checkpoint when asked and there is one) up to the stream's last
    id when it started, and the breach its entry count shows, if any."""
    from giftstream.server.ledger.checkpoint import snapshot

    if from_checkpoint:
        saved, stream = await snapshot(redis, ledger_key, partitioned=partitioned)
    else:
        saved, stream = None, await stream_state(redis, ledger_key)
    replay = Replay(AuditReport(), partitioned=partitioned) if saved is None else saved.replay
    replay.credited = credited  # what the checkpoint folded was credited when folded
    report = replay.report
    folded = report.entries
    if stream.last_id is not None:
        start = "-" if saved is None else "(" + saved.last_id
        async for stream_id, fields in read_raw(redis, ledger_key, start, end=stream.last_id):
            replay.feed(stream_id, fields)
    report.replayed = report.entries - folded
    if saved is None:
        return replay, None
    report.checkpoint = saved.last_id
    added = stream.entries_added
    if added is None or added == report.entries:
        return replay, None
    if added > report.entries:
        return replay, (
            f"{added - report.entries} of the {added} entries ever added to the ledger are "
            f"gone unfolded: deleted, or trimmed past the checkpoint at {saved.last_id}"
        )
    return replay, (
        f"the ledger counts {added} entries ever added, fewer than the {report.entries} "
        "folded and replayed: was the stream deleted and made again?"
    )


def merge(replays: list[Replay]) -> Replay:
    """One replay of a cluster's ledgers: the per-ledger wallets and totals summed, what must
    be unique across ledgers (event ids replayed, receipts, payout keys) checked so, and no
    wallet's summed diamonds negative."""
    merged = Replay(AuditReport())
    r = merged.report
    counted = [f.name for f in dataclasses.fields(AuditReport) if f.type in ("int", int)]
    with_checkpoint = 0
    for replay in replays:
        part = replay.report
        for name in counted:
            setattr(r, name, getattr(r, name) + getattr(part, name))
        r.breaches.extend(part.breaches)
        with_checkpoint += part.checkpoint is not None
        for user, balances in replay.wallets.items():
            merged.wallet(user).add(balances)
        for creator, diamonds in replay.uncredited.items():
            merged.uncredited[creator] = merged.uncredited.get(creator, 0) + diamonds
        for what, mine, theirs in (
            ("event id", merged.events, replay.events),
            ("receipt", merged.receipts.keys(), replay.receipts.keys()),
            ("payout key", merged.payout_keys, replay.payout_keys),
        ):
            for twice in sorted(set(mine) & set(theirs)):
                r.breaches.append(f"{what} {twice} is in two partitions' ledgers")
        merged.events |= replay.events
        merged.receipts.update(replay.receipts)
        merged.refunded |= replay.refunded
        merged.payout_keys |= replay.payout_keys
    if with_checkpoint:
        r.checkpoint = f"{with_checkpoint} of {len(replays)} ledgers"
    for user, balances in sorted(merged.wallets.items()):
        if balances.diamonds < 0:
            r.breaches.append(f"wallet {user}: diamonds {balances.diamonds} by the ledgers")
    return merged


async def _stored_wallets(
    redis: RedisClient, keyspace: keys.KeySpace, report: AuditReport, now_ms: int
) -> dict[str, Balances]:
    """Every wallet in Redis, its holds not over at now_ms keyed by when they end."""
    wallets: dict[str, Balances] = {}
    today = keys.epoch_day(now_ms)
    async for key in redis.scan_iter(match=keyspace.wallet_match, count=1000):
        user = keyspace.user_of_wallet(keys.text(key))
        async with redis.pipeline(transaction=True) as pipe:
            pipe.hmget(key, ["coins", "diamonds", "debt"])
            pipe.hgetall(keyspace.held(user))
            values, buckets = await pipe.execute()
        try:
            coins, diamonds, debt = (int(v) if v is not None else 0 for v in values)
            wallets[user] = Balances(coins, diamonds, debt)
            for day, diamonds in buckets.items():
                if int(day) > today:
                    wallets[user].held[int(day) * keys.DAY_MS] = int(diamonds)
        except ValueError:
            report.breaches.append(f"wallet {user}: a balance is not an integer: {values!r}")
    return wallets


class Replay:
    """Wallets as the ledger alone says they are, with a breach for each broken rule. The
    audit runs one over the stream; the checkpoint folds one forward and saves its state.

    `partitioned` (one ledger of a cluster's): a creator's diamonds come from every ledger,
    so the checks on them that need the whole (none negative, a payout's payable diamonds)
    are left to merge(). `credited` says whether a gift's diamonds have reached its creator
    (the credit cursors); None: every gift's have, as on one Redis."""

    def __init__(
        self,
        report: AuditReport,
        *,
        partitioned: bool = False,
        credited: Callable[[LedgerEntry], bool] | None = None,
    ) -> None:
        self.report = report
        self.partitioned = partitioned
        self.credited = credited
        self.uncredited: dict[str, int] = {}  # creator -> diamonds of gifts not yet credited
        self.wallets: dict[str, Balances] = {}
        self.events: set[str] = set()
        self.receipts: dict[str, dict[str, Any]] = {}  # purchase entries by receipt
        self.refunded: set[str] = set()
        self.payout_keys: set[str] = set()
        self.negative: set[tuple[str, str]] = set()  # (user, balance) already reported

    def wallet(self, user: str) -> Balances:
        return self.wallets.setdefault(user, Balances())

    def feed(self, stream_id: str, fields: dict[Any, Any]) -> None:
        """Count and apply one raw entry; one that does not parse is a breach."""
        self.report.entries += 1
        try:
            entry = parse_entry(stream_id, fields)
        except LedgerError as exc:
            self.report.breaches.append(str(exc))
            return
        self.apply(entry)

    def breach(self, entry: LedgerEntry, problem: str) -> None:
        self.report.breaches.append(f"event {entry.event} ({entry.kind}, {entry.id}): {problem}")

    def apply(self, entry: LedgerEntry) -> None:
        if entry.event in self.events:
            self.breach(entry, "event id seen before")
        self.events.add(entry.event)
        d, r = entry.data, self.report
        touched: list[str]
        if entry.kind == "gift":
            if d["coins"] != d["diamonds"] + d["platform"]:
                self.breach(
                    entry,
                    f"coins {d['coins']} != diamonds {d['diamonds']} + platform {d['platform']}",
                )
            self.wallet(d["sender"]).coins -= d["coins"]
            r.coins_spent += d["coins"]
            r.platform_share += d["platform"]
            touched = [d["sender"]]
            if self.credited is None or self.credited(entry):
                creator = self.wallet(d["creator"])
                creator.diamonds += d["diamonds"]
                creator.mature(entry.ts)
                payable_at = d.get("payable_at", 0)  # absent: a gift from before holds
                if payable_at > entry.ts and d["diamonds"] > 0:
                    creator.held[payable_at] = creator.held.get(payable_at, 0) + d["diamonds"]
                r.diamonds_credited += d["diamonds"]
                touched.append(d["creator"])
            else:  # past its creator's credit cursor: not in the creator's wallet yet
                r.diamonds_uncredited += d["diamonds"]
                self.uncredited[d["creator"]] = self.uncredited.get(d["creator"], 0) + d["diamonds"]
        elif entry.kind == "purchase":
            if d["receipt"] in self.receipts:
                self.breach(entry, f"receipt {d['receipt']} credited twice")
            self.receipts[d["receipt"]] = d
            if d["credited"] != d["coins"] - d["debt_repaid"]:
                self.breach(entry, f"credited {d['credited']} != coins - debt_repaid")
            wallet = self.wallet(d["user"])
            wallet.coins += d["credited"]
            wallet.debt -= d["debt_repaid"]
            r.coins_purchased += d["coins"]
            r.debt_repaid += d["debt_repaid"]
            touched = [d["user"]]
        elif entry.kind == "refund":
            purchase = self.receipts.get(d["receipt"])
            if purchase is None or purchase["user"] != d["user"]:
                self.breach(
                    entry, f"refund of receipt {d['receipt']} with no purchase by {d['user']}"
                )
            elif d["coins"] + d["debt"] != purchase["coins"]:
                self.breach(
                    entry, f"refund takes {d['coins']} + {d['debt']} of {purchase['coins']}"
                )
            if d["receipt"] in self.refunded:
                self.breach(entry, f"receipt {d['receipt']} refunded twice")
            self.refunded.add(d["receipt"])
            wallet = self.wallet(d["user"])
            wallet.coins -= d["coins"]
            wallet.debt += d["debt"]
            r.coins_refunded += d["coins"]
            r.debt_recorded += d["debt"]
            touched = [d["user"]]
        else:  # payout
            if d["key"] in self.payout_keys:
                self.breach(entry, f"payout key {d['key']} paid twice")
            self.payout_keys.add(d["key"])
            creator = self.wallet(d["creator"])
            on_hold = creator.mature(entry.ts)
            payable = creator.diamonds - on_hold
            if d["diamonds"] > payable and not self.partitioned:
                self.breach(
                    entry,
                    f"pays {d['diamonds']} diamonds; only {payable} were payable, "
                    f"{on_hold} on hold",
                )
            creator.diamonds -= d["diamonds"]
            r.diamonds_paid_out += d["diamonds"]
            r.cents_paid_out += d["cents"]
            touched = [d["creator"]]
        for user in touched:
            for name, value in _fields(self.wallets[user]):
                if self.partitioned and name == "diamonds":
                    continue  # credited from every ledger: merge() checks the sum
                if value < 0 and (user, name) not in self.negative:
                    self.negative.add((user, name))
                    self.breach(entry, f"wallet {user}: {name} {value} by the ledger")

    def compare(self, stored: dict[str, Balances], now_ms: int) -> None:
        """Every wallet in Redis against the ledger's, holds as they stand at now_ms."""
        r = self.report
        r.wallets = len(stored.keys() | self.wallets.keys())
        for user in sorted(stored.keys() | self.wallets.keys()):
            in_redis = stored.get(user, Balances())
            by_ledger = self.wallets.get(user, Balances())
            r.coins_held += in_redis.coins
            r.diamonds_held += in_redis.diamonds
            r.debt += in_redis.debt
            held, replayed_held = in_redis.mature(now_ms), by_ledger.mature(now_ms)
            r.diamonds_on_hold += held
            if in_redis.held != by_ledger.held:
                r.breaches.append(
                    f"wallet {user}: {held} diamonds on hold in Redis, {replayed_held} by the "
                    f"ledger ({_days(in_redis.held)} against {_days(by_ledger.held)})"
                )
            for (name, held), (_, replayed) in zip(
                _fields(in_redis), _fields(by_ledger), strict=True
            ):
                if held != replayed:
                    pending = self.uncredited.get(user, 0) if name == "diamonds" else 0
                    r.breaches.append(
                        f"wallet {user}: {name} {held} in Redis, {replayed} by the ledger"
                        + (
                            f" (which leaves out {pending} diamonds of gifts past the "
                            "credit cursors)"
                            if pending
                            else ""
                        )
                    )
                if held < 0:
                    r.breaches.append(f"wallet {user}: {name} {held} in Redis is negative")


def _days(held: dict[int, int]) -> dict[str, int]:
    """Holds by the UTC day they end, for a breach's message."""
    return {keys.utc_day(at): diamonds for at, diamonds in sorted(held.items())}


def _fields(balances: Balances) -> tuple[tuple[str, int], ...]:
    return (("coins", balances.coins), ("diamonds", balances.diamonds), ("debt", balances.debt))
