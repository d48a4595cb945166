"""No partial writes: every failure path of every Lua script leaves the whole keyspace byte for
byte as it was (every key's type, value and TTL flag, each stream's entries, consumer groups
and pending entries).

Redis does not roll back a script that fails midway: a write made before a failing command
stays. So each script must make every check before its first write, and a key of the wrong
type must stop it at a read, not at a write. The table below forces, for each script:

  - every refusal it can reply (read top to bottom: server/lua/*.lua), and every corrupt
    stored value it reads;
  - an error after all its checks have passed: each key it writes given the wrong type,
    one case per key, and the ledger's stream ids exhausted (XADD * itself fails).

Each case starts from one world in which the script's call succeeds (the `control` case
of each script shows that it does, and changes the keyspace), breaks one thing, snapshots,
calls the script as its real caller does (Wallet for the money scripts, the ARGV layout of
earnings.py, checkpoint.py and consumers.py for the others) and compares. Bad ARGV values
are tests/model/test_integers_only.py's part.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from giftstream.server.ledger.checkpoint import CheckpointKeys
from giftstream.server.ledger.dead_letters import dead_letter_stream
from giftstream.server.ledger.earnings import EarningsConsumer
from giftstream.server.ledger.entries import LedgerEntry, read_entries
from giftstream.server.money import keys
from giftstream.server.money.catalog import Economics, Gift, Package
from giftstream.server.money.refusal import Refusal
from giftstream.server.money.wallet import MAX_BALANCE, GiftRoom, Wallet
from tests.model.conftest import SCRIPT_NAMES, Eval, everything, fund
from tests.server.conftest import NOW_MS, MoneyClock

HEART = Gift(id="heart", name="Heart", coins=5, animation="heart.webp")
CASTLE = Gift(id="castle", name="Castle", coins=10_000, animation="castle.webp")
PACK_70 = Package(id="coins_70", coins=70, price_cents=99, currency="USD")
RECEIPT = "fund-ann-100"  # ann's purchase in the world: what refund takes back
GROUP = "earnings"
CONSUMER = "consumer-1"
DEAD = dead_letter_stream(keys.LEDGER)
CP = CheckpointKeys.of(keys.LEDGER)
DAY_MS = 86_400_000
WORLD_MS = NOW_MS - 3 * DAY_MS  # the world is built then; its holds are over by NOW_MS
DAY = keys.utc_day(WORLD_MS)  # bob's gift's day, which earnings count
TODAY = keys.epoch_day(NOW_MS)
HOLD_DAYS = 1
PAYOUT_CAP = 1000
MAX_ID = "18446744073709551615-18446744073709551615"  # after it, XADD * has no id to give


class ClockedWallet(Wallet):
    """The world's Wallet: payouts from 1 diamond, a hold of HOLD_DAYS, a cap of PAYOUT_CAP,
    on a money clock the world's set-up moves."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.clock = MoneyClock()
        super().__init__(
            redis,
            Economics(payout_min_diamonds=1),
            payout_hold_days=HOLD_DAYS,
            payout_daily_cap=PAYOUT_CAP,
            clock=self.clock,
        )


@dataclass
class World:
    """What a case can use: the wallet, raw script calls, and ids the setup produced."""

    money: ClockedWallet
    redis: aioredis.Redis
    evalsha: Eval
    gift_entry: LedgerEntry  # bob's gift to cara, the first gift in the ledger
    pending_id: str  # the ledger entry the `earnings` group holds pending for CONSUMER


async def build_world(money: ClockedWallet, redis: aioredis.Redis, evalsha: Eval) -> World:
    """ann: 100 coins (RECEIPT); bob: 500 coins after gifting cara and dan 100 diamonds each,
    three days ago, so their hold is over (a gift now is held); the `earnings` group has read
    one ledger entry and not acked it."""
    clock = money.clock
    clock.now_ms = WORLD_MS
    await fund(money, "ann", 100, RECEIPT)
    await fund(money, "bob", 900)
    for room in ("cara", "dan"):
        await money.send_gift(
            sender="bob",
            adult=True,
            creator=room,
            room=room,
            gift=HEART,
            count=40,
            key=f"gift-key-bob-{room}",
        )
    clock.now_ms = NOW_MS
    await redis.hset(ROOM, mapping={"creator": "cara", "live": "1", "started": WORLD_MS})
    gifts = [entry async for entry in read_entries(redis) if entry.kind == "gift"]
    await redis.xgroup_create(keys.LEDGER, GROUP, id="0")
    reply: Any = await redis.xreadgroup(GROUP, CONSUMER, {keys.LEDGER: ">"}, count=1)
    ((_, [(pending_id, _)]),) = reply
    return World(money, redis, evalsha, gifts[0], pending_id.decode())


# ---- each script's call, as its caller makes it ------------------------------------------


Call = Callable[[World], Awaitable[Any]]
Break = Callable[[World], Awaitable[None]]


# cara's room as the gateway passes it under the Redis broker: the gift's event is written
# to the room's log by the same script.
IN_ROOM = GiftRoom(
    record=keys.SINGLE.room("cara"),
    log=keys.SINGLE.room_log("cara"),
    room_json=b'"cara"',
    sender_json=b'{"id":"ann","name":"Ann"}',
    gift_json=b'{"id":"heart","name":"Heart","coins":5,"animation":"heart.webp"}',
    log_size=1024,
    name_json=b'"Ann"',
)


def send_gift(**change: Any) -> Call:
    """ann's gift to cara, from a gateway: in cara's live room, logged there."""

    async def call(w: World) -> Any:
        args = dict(
            sender="ann",
            adult=True,
            creator="cara",
            room="cara",
            gift=HEART,
            count=1,
            key="gift-key-np",
            in_room=IN_ROOM,
        )
        return await w.money.send_gift(**{**args, **change})

    return call


def purchase(**change: Any) -> Call:
    async def call(w: World) -> Any:
        args = dict(receipt="rc-np-1", user="ann", package=PACK_70, adult=True)
        return await w.money.purchase(**{**args, **change})

    return call


def refund(**change: Any) -> Call:
    async def call(w: World) -> Any:
        return await w.money.refund(**{"receipt": RECEIPT, **change})

    return call


def raw_refund(user: str = "ann", receipt: str = RECEIPT) -> Call:
    """The script itself, past wallet.py's own owner lookup (which answers first)."""

    async def call(w: World) -> Any:
        return await w.evalsha(
            "refund",
            [keys.SINGLE.receipt(receipt), keys.SINGLE.wallet(user), keys.LEDGER],
            ["ev-refund", user, receipt, NOW_MS],
        )

    return call


def payout(**change: Any) -> Call:
    async def call(w: World) -> Any:
        args = dict(creator="cara", diamonds=60, key="payout-key-np")
        return await w.money.payout(**{**args, **change})

    return call


def earnings() -> Call:
    """EarningsConsumer.apply on bob's gift to cara: ARGV exactly as earnings.py builds it."""

    async def call(w: World) -> Any:
        return await EarningsConsumer(w.redis).apply(w.gift_entry)

    return call


def checkpoint(new_last: str | None = None, counts: tuple[int, ...] | None = None) -> Call:
    """A chunk laid out as checkpoint.py's _dump lays it out, one item for every key."""

    async def call(w: World) -> Any:
        items: list[list[Any]] = [
            ["entries", 5, "coins_purchased", 1000],  # main pairs
            ["ann", '{"coins":100,"diamonds":0,"debt":0}'],  # wallet pairs
            [RECEIPT, '{"user":"ann","coins":100,"refunded":false}'],  # receipt pairs
            ["payout-key-x"],  # payout keys
            ["coins:zed"],  # negatives
            ["a breach"],  # breaches
        ]
        sizes = [len(items[0]) // 2, 1, 1, 1, 1, 1]
        newest: Any = await w.redis.xrevrange(keys.LEDGER, count=1)
        last = new_last or newest[0][0].decode()
        args = ["", last, *(counts or sizes), *(x for part in items for x in part)]
        return await w.evalsha("checkpoint", CP.all(), args)

    return call


def dead_letter(stream_id: str | None = None, *, consumer: bool = True) -> Call:
    """Burying the pending entry, ARGV as consumers.py's _dead_letter builds it."""

    async def call(w: World) -> Any:
        args = [GROUP, stream_id or w.pending_id, '{"kind":"gift"}', "failed", 5, CONSUMER]
        return await w.evalsha("dead_letter", [keys.LEDGER, DEAD], args[: 6 if consumer else 5])

    return call


# ---- ways to break the world --------------------------------------------------------------


async def nothing(w: World) -> None:
    return None


@dataclass(frozen=True)
class WrongType:
    """`key` replaced by a key of another type: `string`, `list`, `set` or `hash`."""

    key: str
    kind: str

    async def __call__(self, w: World) -> None:
        await w.redis.delete(self.key)
        if self.kind == "string":
            await w.redis.set(self.key, "sabotage")
        elif self.kind == "list":
            await w.redis.rpush(self.key, "sabotage")
        elif self.kind == "set":
            await w.redis.sadd(self.key, "sabotage")
        else:
            await w.redis.hset(self.key, "sabotage", "1")


def hset(key: str, **fields: Any) -> Break:
    async def apply(w: World) -> None:
        mapping: dict[Any, Any] = fields  # redis-py's key type is a union, not str
        await w.redis.hset(key, mapping=mapping)

    return apply


def hdel(key: str, field: str) -> Break:
    async def apply(w: World) -> None:
        await w.redis.hdel(key, field)

    return apply


def xadd(stream: str, entry_id: str) -> Break:
    async def apply(w: World) -> None:
        await w.redis.xadd(stream, {"t": "gift", "d": "{}"}, id=entry_id)

    return apply


def exhaust(stream: str) -> Break:
    """An entry with the largest stream id: every check passes, then XADD * fails."""

    async def apply(w: World) -> None:
        await w.redis.xadd(stream, {"data": "{}"}, id=MAX_ID)

    return apply


exhaust_ledger = exhaust(keys.LEDGER)


async def destroy_group(w: World) -> None:
    await w.redis.xgroup_destroy(keys.LEDGER, GROUP)


def first(*steps: Call | Break) -> Break:
    """These steps (calls that succeed, other breaks), in order, before the case's call."""

    async def apply(w: World) -> None:
        for step in steps:
            await step(w)

    return apply


# ---- the table ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    script: str
    name: str
    sabotage: Break | WrongType
    call: Call
    outcome: str  # "ok", a refusal code, "error:<text in the message>", or the raw reply


SENDER, CREATOR = keys.SINGLE.wallet("ann"), keys.SINGLE.wallet("cara")
ROOM, ROOM_LOG = keys.SINGLE.room("cara"), keys.SINGLE.room_log("cara")
GIFT_RECORD = keys.SINGLE.gift_key("ann", "gift-key-np")
COMBO, HELD = keys.SINGLE.combo("ann", "cara"), keys.SINGLE.held("cara")
RECEIPT_NEW, RECEIPT_OLD = keys.SINGLE.receipt("rc-np-1"), keys.SINGLE.receipt(RECEIPT)
PAYOUT_RECORD = keys.SINGLE.payout("payout-key-np")
SEEN, TOTALS = keys.SINGLE.earnings_seen("cara", DAY), keys.SINGLE.earnings("cara")
WRONGTYPE = "error:WRONGTYPE"
SESSION_BOARD = keys.SINGLE.board_session("cara")
WEEK_BOARD = keys.SINGLE.board_week("cara", keys.iso_week(TODAY))
DAY_BOARD = keys.SINGLE.board_creators_day(0, TODAY)
NAMES, CREATOR_NAMES = keys.SINGLE.board_names("cara"), keys.SINGLE.board_creator_names(0)

CASES = [
    # send_gift: key, debt, age, daily and weekly limits, balance; then ledger, sender,
    # creator, held diamonds, key record, combo.
    Case("send_gift", "control", nothing, send_gift(), "ok"),
    Case(
        "send_gift",
        "key used for another count",
        first(send_gift(count=2)),
        send_gift(),
        "key_reused",
    ),
    Case("send_gift", "debt", hset(SENDER, debt=1), send_gift(), "debt"),
    Case("send_gift", "minor", nothing, send_gift(adult=False), "underage"),
    Case("send_gift", "daily limit", hset(SENDER, daily_limit=4), send_gift(), "spending_limit"),
    Case(
        "send_gift",
        "daily limit spent earlier",
        first(hset(SENDER, daily_limit=9), send_gift(key="gift-key-np-0")),
        send_gift(),
        "spending_limit",
    ),
    Case("send_gift", "weekly limit", hset(SENDER, weekly_limit=4), send_gift(), "spending_limit"),
    Case(
        "send_gift",
        "weekly limit spent on an earlier day",
        hset(
            SENDER,
            weekly_limit=9,
            spent_week=keys.iso_week(TODAY),
            spent_week_coins=5,
            spent_day=TODAY - 1,
            spent_day_coins=5,
        ),
        send_gift(),
        "spending_limit",
    ),
    Case("send_gift", "too few coins", nothing, send_gift(gift=CASTLE), "insufficient_coins"),
    Case(
        "send_gift",
        "key record without its gift",
        hset(GIFT_RECORD, room="cara"),
        send_gift(),
        "error:attempt to concatenate",
    ),
    Case(
        "send_gift",
        "corrupt sender coins",
        hset(SENDER, coins="1e3"),
        send_gift(),
        "error:not an exact integer",
    ),
    Case(
        "send_gift",
        "corrupt sender debt",
        hset(SENDER, debt="-0"),
        send_gift(),
        "error:not an exact integer",
    ),
    Case(
        "send_gift",
        "corrupt daily limit",
        hset(SENDER, daily_limit="0x10"),
        send_gift(),
        "error:not an exact integer",
    ),
    Case(
        "send_gift",
        "corrupt weekly limit",
        hset(SENDER, weekly_limit="1e3"),
        send_gift(),
        "error:not an exact integer",
    ),
    Case(
        "send_gift",
        "corrupt spend of the day",
        hset(SENDER, spent_day=TODAY, spent_day_coins="5.0"),
        send_gift(),
        "error:not an exact integer",
    ),
    Case(
        "send_gift",
        "corrupt spend of a past week",
        hset(SENDER, spent_week=TODAY - 70, spent_week_coins="x"),
        send_gift(),
        "error:not an exact integer",
    ),
    Case(
        "send_gift",
        "corrupt held diamonds",
        hset(HELD, **{str(TODAY + 5): "2.5"}),
        send_gift(),
        "error:not an exact integer",
    ),
    Case(
        "send_gift",
        "corrupt hold day",
        hset(HELD, **{"soon": "25"}),
        send_gift(),
        "error:not an exact integer",
    ),
    Case(
        "send_gift",
        "corrupt creator diamonds",
        hset(CREATOR, diamonds="9007199254740993"),
        send_gift(),
        "error:not an exact integer",
    ),
    Case(
        "send_gift",
        "corrupt combo time",
        hset(COMBO, gift="heart", combo=1, at="soon"),
        send_gift(),
        "error:arithmetic",
    ),
    Case(
        "send_gift", "ledger is a string", WrongType(keys.LEDGER, "string"), send_gift(), WRONGTYPE
    ),
    Case("send_gift", "ledger ids exhausted", exhaust_ledger, send_gift(), "error:exhausted"),
    Case("send_gift", "sender wallet is a list", WrongType(SENDER, "list"), send_gift(), WRONGTYPE),
    Case(
        "send_gift", "creator wallet is a list", WrongType(CREATOR, "list"), send_gift(), WRONGTYPE
    ),
    Case(
        "send_gift", "key record is a list", WrongType(GIFT_RECORD, "list"), send_gift(), WRONGTYPE
    ),
    Case("send_gift", "held diamonds are a list", WrongType(HELD, "list"), send_gift(), WRONGTYPE),
    Case("send_gift", "combo is a set", WrongType(COMBO, "set"), send_gift(), WRONGTYPE),
    Case("send_gift", "room ended", hset(ROOM, live="0"), send_gift(), "room_not_live"),
    Case("send_gift", "room never live", hdel(ROOM, "live"), send_gift(), "room_not_live"),
    Case(
        "send_gift",
        "corrupt room seq",
        hset(ROOM, seq="12.0"),
        send_gift(),
        "error:not an exact integer",
    ),
    Case(
        "send_gift",
        "room log entry not numbered 0-<seq>",
        xadd(ROOM_LOG, "7-1"),
        send_gift(),
        "error:not numbered 0-<seq>",
    ),
    Case("send_gift", "room record is a list", WrongType(ROOM, "list"), send_gift(), WRONGTYPE),
    # the boards: each key's type is read before the first write
    Case(
        "send_gift",
        "session board is a hash",
        WrongType(SESSION_BOARD, "hash"),
        send_gift(),
        "error:not a zset",
    ),
    Case(
        "send_gift",
        "week board is a list",
        WrongType(WEEK_BOARD, "list"),
        send_gift(),
        "error:not a zset",
    ),
    Case(
        "send_gift",
        "creators_day board is a set",
        WrongType(DAY_BOARD, "set"),
        send_gift(),
        "error:not a zset",
    ),
    Case(
        "send_gift", "names are a list", WrongType(NAMES, "list"), send_gift(), "error:not a hash"
    ),
    Case(
        "send_gift",
        "creator names are a string",
        WrongType(CREATOR_NAMES, "string"),
        send_gift(),
        "error:not a hash",
    ),
    Case(
        "send_gift",
        "corrupt room coins this session",
        hset(ROOM, session_coins="1.5"),
        send_gift(),
        "error:not an exact integer",
    ),
    Case(
        "send_gift",
        "corrupt creator name",
        hset(ROOM, creator_name="<b>Cara"),
        send_gift(),
        "error:not JSON text",
    ),
    Case(
        "send_gift", "room log is a string", WrongType(ROOM_LOG, "string"), send_gift(), WRONGTYPE
    ),
    # purchase: receipt, age, balance cap; then ledger, wallet, receipt.
    Case("purchase", "control", nothing, purchase(), "ok"),
    Case(
        "purchase",
        "receipt of another user",
        first(purchase(user="bob")),
        purchase(),
        "receipt_reused",
    ),
    Case(
        "purchase",
        "receipt of another package",
        first(purchase(package=Package("coins_10", 10, 9, "USD"))),
        purchase(),
        "receipt_reused",
    ),
    Case("purchase", "minor", nothing, purchase(adult=False), "underage"),
    Case(
        "purchase", "balance cap", hset(SENDER, coins=MAX_BALANCE - 69), purchase(), "balance_limit"
    ),
    Case(
        "purchase",
        "corrupt coins",
        hset(SENDER, coins="1.5"),
        purchase(),
        "error:not an exact integer",
    ),
    Case(
        "purchase",
        "corrupt debt",
        hset(SENDER, debt=" 5"),
        purchase(),
        "error:not an exact integer",
    ),
    Case(
        "purchase",
        "corrupt receipt",
        hset(RECEIPT_NEW, user="ann"),
        purchase(),
        "error:attempt to concatenate",
    ),
    Case("purchase", "ledger is a string", WrongType(keys.LEDGER, "string"), purchase(), WRONGTYPE),
    Case("purchase", "ledger ids exhausted", exhaust_ledger, purchase(), "error:exhausted"),
    Case("purchase", "wallet is a list", WrongType(SENDER, "list"), purchase(), WRONGTYPE),
    Case("purchase", "receipt is a list", WrongType(RECEIPT_NEW, "list"), purchase(), WRONGTYPE),
    # refund: receipt known, its owner; then ledger, wallet, receipt.
    Case("refund", "control", nothing, refund(), "ok"),
    Case(
        "refund",
        "unknown receipt (wallet.py)",
        nothing,
        refund(receipt="rc-never"),
        "unknown_receipt",
    ),
    Case(
        "refund",
        "unknown receipt (script)",
        nothing,
        raw_refund(receipt="rc-never"),
        "unknown_receipt",
    ),
    Case(
        "refund", "receipt of another user", nothing, raw_refund(user="bob"), "error:belongs to ann"
    ),
    Case(
        "refund",
        "corrupt receipt coins",
        hset(RECEIPT_OLD, coins="1.5"),
        refund(),
        "error:not an exact integer",
    ),
    Case(
        "refund",
        "receipt without coins",
        hdel(RECEIPT_OLD, "coins"),
        refund(),
        "error:not an exact integer",
    ),
    Case(
        "refund", "corrupt coins", hset(SENDER, coins="05"), refund(), "error:not an exact integer"
    ),
    Case(
        "refund", "corrupt debt", hset(SENDER, debt="1e2"), refund(), "error:not an exact integer"
    ),
    Case("refund", "ledger is a string", WrongType(keys.LEDGER, "string"), refund(), WRONGTYPE),
    Case("refund", "ledger ids exhausted", exhaust_ledger, refund(), "error:exhausted"),
    Case("refund", "wallet is a list", WrongType(SENDER, "list"), refund(), WRONGTYPE),
    Case("refund", "receipt is a list", WrongType(RECEIPT_OLD, "list"), raw_refund(), WRONGTYPE),
    # payout: key, diamonds held; then ledger, wallet, payout record.
    Case("payout", "control", nothing, payout(), "ok"),
    Case(
        "payout", "key used for other diamonds", first(payout(diamonds=50)), payout(), "key_reused"
    ),
    Case(
        "payout",
        "key used by another creator",
        first(payout(creator="dan")),
        payout(),
        "key_reused",
    ),
    Case("payout", "too few diamonds", nothing, payout(diamonds=101), "insufficient_diamonds"),
    Case(
        "payout",
        "diamonds on hold",
        first(send_gift(count=20)),  # 50 more diamonds, held: 100 of 150 payable
        payout(diamonds=101),
        "payout_held",
    ),
    Case(
        "payout",
        "past the day's cap",
        hset(CREATOR, payout_day=TODAY, payout_day_diamonds=PAYOUT_CAP - 59),
        payout(),
        "payout_cap",
    ),
    Case(
        "payout",
        "corrupt payouts of the day",
        hset(CREATOR, payout_day=TODAY, payout_day_diamonds="1e2"),
        payout(),
        "error:not an exact integer",
    ),
    Case(
        "payout",
        "corrupt held diamonds",
        hset(HELD, **{str(TODAY + 5): "-0"}),
        payout(),
        "error:not an exact integer",
    ),
    Case(
        "payout",
        "corrupt diamonds",
        hset(CREATOR, diamonds="100.0"),
        payout(),
        "error:not an exact integer",
    ),
    Case("payout", "ledger is a string", WrongType(keys.LEDGER, "string"), payout(), WRONGTYPE),
    Case("payout", "ledger ids exhausted", exhaust_ledger, payout(), "error:exhausted"),
    Case("payout", "wallet is a list", WrongType(CREATOR, "list"), payout(), WRONGTYPE),
    Case(
        "payout", "payout record is a list", WrongType(PAYOUT_RECORD, "list"), payout(), WRONGTYPE
    ),
    Case("payout", "held diamonds are a list", WrongType(HELD, "list"), payout(), WRONGTYPE),
    # earnings: the totals read; then the seen set, the totals.
    Case("earnings", "control", nothing, earnings(), "True"),
    Case("earnings", "counted before", first(earnings()), earnings(), "False"),
    Case(
        "earnings",
        "corrupt total",
        hset(TOTALS, **{f"{DAY}:coins": "x"}),
        earnings(),
        "error:not an exact integer",
    ),
    Case("earnings", "seen set is a string", WrongType(SEEN, "string"), earnings(), WRONGTYPE),
    Case("earnings", "totals are a list", WrongType(TOTALS, "list"), earnings(), WRONGTYPE),
    # checkpoint: counts, new id, where the checkpoint is; then main, wallets, receipts,
    # payout keys, negatives, breaches.
    Case("checkpoint", "control", nothing, checkpoint(), "ok"),
    Case("checkpoint", "folded before", hset(CP.main, last_id=MAX_ID), checkpoint(), "folded"),
    Case("checkpoint", "moved meanwhile", hset(CP.main, last_id="1-1"), checkpoint(), "conflict"),
    Case(
        "checkpoint", "not a stream id", nothing, checkpoint(new_last="x"), "error:not a stream id"
    ),
    Case(
        "checkpoint",
        "corrupt stored id",
        hset(CP.main, last_id="x"),
        checkpoint(),
        "error:not a stream id",
    ),
    Case(
        "checkpoint",
        "more items counted than given",
        nothing,
        checkpoint(counts=(2, 1, 1, 1, 1, 2)),
        "error:19 arguments for 12 items",
    ),
    Case(
        "checkpoint",
        "fewer items counted than given",
        nothing,
        checkpoint(counts=(2, 1, 1, 1, 1, 0)),
        "error:19 arguments for 10 items",
    ),
    Case(
        "checkpoint",
        "main is a list",
        WrongType(CP.main, "list"),
        checkpoint(),
        "error:is a list, not a hash",
    ),
    Case(
        "checkpoint",
        "wallets are a string",
        WrongType(CP.wallets, "string"),
        checkpoint(),
        "error:is a string, not a hash",
    ),
    Case(
        "checkpoint",
        "receipts are a set",
        WrongType(CP.receipts, "set"),
        checkpoint(),
        "error:is a set, not a hash",
    ),
    Case(
        "checkpoint",
        "payout keys are a hash",
        WrongType(CP.payouts, "hash"),
        checkpoint(),
        "error:is a hash, not a set",
    ),
    Case(
        "checkpoint",
        "negatives are a list",
        WrongType(CP.negative, "list"),
        checkpoint(),
        "error:is a list, not a set",
    ),
    Case(
        "checkpoint",
        "breaches are a set",
        WrongType(CP.breaches, "set"),
        checkpoint(),
        "error:is a set, not a list",
    ),
    # dead_letter: the entry still pending; then XADD to the dead letters, XACK on the ledger.
    Case("dead_letter", "control", nothing, dead_letter(), "id"),
    Case("dead_letter", "no longer pending", nothing, dead_letter("0-1"), "None"),
    Case("dead_letter", "group gone", destroy_group, dead_letter(), "None"),
    Case("dead_letter", "not a stream id", nothing, dead_letter("x"), "error:Invalid stream ID"),
    Case(
        "dead_letter",
        "consumer missing",
        nothing,
        dead_letter(consumer=False),
        "error:takes 6 arguments",
    ),
    Case(
        "dead_letter",
        "ledger is a string",
        WrongType(keys.LEDGER, "string"),
        dead_letter(),
        WRONGTYPE,
    ),
    Case(
        "dead_letter",
        "dead letters are a string",
        WrongType(DEAD, "string"),
        dead_letter(),
        WRONGTYPE,
    ),
    Case(
        "dead_letter", "dead letters are a list", WrongType(DEAD, "list"), dead_letter(), WRONGTYPE
    ),
    Case(
        "dead_letter", "dead letter ids exhausted", exhaust(DEAD), dead_letter(), "error:exhausted"
    ),
]


def outcome_of(result: Any) -> str:
    """What a call came to, in the table's terms."""
    if isinstance(result, Refusal):
        return result.code
    if isinstance(result, ResponseError):
        return f"error:{result}"
    if isinstance(result, list) and result and isinstance(result[0], bytes):
        return result[0].decode()  # a raw script's reply: its status
    if isinstance(result, bytes):
        text = result.decode()
        return "id" if text.split("-")[0].isdigit() else text
    if isinstance(result, bool | type(None)):
        return str(result)
    return "ok"  # a Wallet result


def changed_keys(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    return [k for k in before.keys() | after.keys() if before.get(k) != after.get(k)]


@pytest.mark.parametrize("case", CASES, ids=[f"{c.script}: {c.name}" for c in CASES])
async def test_a_failed_script_writes_nothing(
    redis_client: aioredis.Redis, evalsha: Eval, case: Case
) -> None:
    money = ClockedWallet(redis_client)
    await money.load_scripts()
    world = await build_world(money, redis_client, evalsha)
    await case.sabotage(world)
    before = await everything(redis_client)
    try:
        result = await case.call(world)
    except (Refusal, ResponseError) as error:
        result = error
    after = await everything(redis_client)
    if case.name == "control":
        assert after != before  # the call the other cases break does write
    else:
        changed = sorted({*changed_keys(before[0], after[0]), *changed_keys(before[1], after[1])})
        assert after == before, f"{type(result).__name__} {result} after writing {changed}"
    outcome = outcome_of(result)
    if case.outcome.startswith("error:"):
        assert outcome.startswith("error:") and case.outcome[6:] in outcome, outcome
    else:
        assert outcome == case.outcome
    await money.drain()


# The keys each script writes (server/lua/*.lua, every redis.call that writes).
WRITES = {
    "send_gift": {
        keys.LEDGER,
        SENDER,
        CREATOR,
        HELD,
        GIFT_RECORD,
        COMBO,
        ROOM,
        ROOM_LOG,
        SESSION_BOARD,
        WEEK_BOARD,
        DAY_BOARD,
        NAMES,
        CREATOR_NAMES,
    },
    "purchase": {keys.LEDGER, SENDER, RECEIPT_NEW},
    "refund": {keys.LEDGER, SENDER, RECEIPT_OLD},
    "payout": {keys.LEDGER, CREATOR, HELD, PAYOUT_RECORD},
    "earnings": {SEEN, TOTALS},
    "checkpoint": set(CP.all()),
    "dead_letter": {keys.LEDGER, DEAD},
}


def test_the_table_breaks_every_key_each_script_writes() -> None:
    """One wrong-type case per key written, and a control, for every script."""
    assert sorted(WRITES) == sorted(SCRIPT_NAMES)
    for script, written in WRITES.items():
        cases = [c for c in CASES if c.script == script]
        assert [c.name for c in cases].count("control") == 1, script
        broken = {c.sabotage.key for c in cases if isinstance(c.sabotage, WrongType)}
        assert broken == written, script
