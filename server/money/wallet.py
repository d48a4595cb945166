"""Every movement of coins or diamonds, each one Lua script (server/lua/) that makes all its
checks before its first write and appends its ledger entry in the same atomic step.

Python validates inputs, computes the economics and makes ids; the scripts decide against the
stored state. Amounts stay far below 2**53, where Lua's doubles stop being exact integers.
A refusal is a `Refusal` (refusal.py), which each transport maps to its own answer.

Money time is Redis's own clock, read by each script (TIME): the UTC day a spend counts
against, a combo's gap, a hold's end and every ledger entry's `ts` are then the same on every
gateway, whatever its own clock says (a user spread over skewed gateways cannot spend into
two days around midnight). No caller passes a time.

On a Redis Cluster (`keyspace.cluster`) scripts go through the RedisCluster client to the shard
of their keys (no ScriptBatcher: its pipelining is one Redis's). A gift then debits the sender
and appends to the sender partition's ledger and to a credit outbox on the sender's shard;
the creator is credited by crediting.py, which `on_credit_due` (its `poke`) wakes.

`durable_ack` (--durable-ack): a gift, purchase, refund or payout is answered only once it
is safe from a crash: on a cluster once its shard's replicas hold it (`WAIT` on the script's
own connection), on one Redis once the AOF holding it is fsynced (`WAITAOF 1 0`). A wait that
acks fewer than asked within the timeout still answers: the movement is done and cannot be
undone (a metric counts it).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeVar

from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import (
    ResponseError,
)

from giftstream.protocol.rules import KEY_RULE, MAX_AMOUNT, MAX_COUNT, is_count, is_key
from giftstream.server import scripts
from giftstream.server.metrics import Metrics
from giftstream.server.money import keys
from giftstream.server.money.batcher import ScriptBatcher
from giftstream.server.money.boards import Boards
from giftstream.server.money.catalog import MAX_COINS, Economics, Gift, Package
from giftstream.server.money.claims import Claims
from giftstream.server.money.refusal import Reason, Refusal
from giftstream.server.money.same_connection import Replicas, script_through_failover
from giftstream.server.redis_cluster import RedisClient

log = logging.getLogger(__name__)
T = TypeVar("T")

# The catalog's and the HTTP API's bounds, checked again here for direct callers: the wallet
# never refuses a value that the API or the catalog let through.
MAX_GIFT_COINS = MAX_COINS
MAX_PACKAGE_COINS = MAX_COINS
MAX_PRICE_CENTS = 10**12
MAX_BALANCE = 10**15  # a purchase past this is refused: balances stay exact in Lua
MAX_DAILY_LIMIT = MAX_AMOUNT
MAX_WEEKLY_LIMIT = MAX_AMOUNT
MAX_PAYOUT_HOLD_DAYS = 3650
MAX_PAYOUT_DAILY_CAP = MAX_AMOUNT
# Chargebacks arrive within days: diamonds a gift credits become payable only after a hold,
# and one creator is paid at most a cap a UTC day (2,000,000 diamonds: 10,000 USD at the
# default 50 cents per 100), so coins bought with a stolen card and gifted to a colluding
# creator are not cashed out before the card's owner disputes them.
DEFAULT_PAYOUT_HOLD_DAYS = 7
DEFAULT_PAYOUT_DAILY_CAP = 2_000_000
MAX_PAYOUT_DIAMONDS = MAX_AMOUNT
MAX_RECEIPT_LEN = 256
SCRIPTS = ("send_gift", "purchase", "refund", "payout")
DEFAULT_DURABLE_ACK_TIMEOUT_MS = 1000  # how long a --durable-ack gift waits for its copies


@dataclass(frozen=True, slots=True)
class SettledGift:
    event: str  # ledger event id (unique)
    coins: int  # sender's coin balance right after the gift was settled
    combo: int  # sender's streak of this gift in this room
    diamonds: int  # diamonds credited to the creator by this gift
    ts: int  # ms since epoch when it was settled
    replayed: bool  # True when the key was already settled: the first result, nothing moved now


@dataclass(frozen=True, slots=True)
class GiftRoom:
    """The room a gift is settled in, as its script sees it: the room's record, which must
    say live, and the log the gift's event is appended to in the same atomic step ('' under
    the memory broker, whose hub publishes the event), with the event's parts encoded by
    the gateway (protocol/codec.py) and the log's size."""

    record: str
    log: str
    room_json: bytes
    sender_json: bytes
    gift_json: bytes
    log_size: int
    name_json: bytes = b""  # the sender's name as JSON text, for the boards ('': the id)

    @property
    def event_args(self) -> tuple[bytes, bytes, bytes, int]:
        return (self.room_json, self.sender_json, self.gift_json, self.log_size)


@dataclass(frozen=True, slots=True)
class PurchaseResult:
    user: str
    receipt: str
    coins: int  # the user's balance now
    credited: bool  # False: the receipt was credited before, nothing moved now
    coins_credited: int  # by the receipt's crediting: package coins minus debt repaid
    debt_repaid: int
    debt: int  # the user's debt now
    event: str  # ledger event of the crediting

    def as_wire(self) -> dict[str, Any]:
        return {"coins": self.coins, "credited": self.credited}


@dataclass(frozen=True, slots=True)
class RefundResult:
    user: str
    receipt: str
    refunded: bool  # False: refunded before; the fields are that first refund's
    coins_taken: int
    debt_added: int
    coins: int  # the user's balance now
    debt: int  # the user's debt now
    event: str  # ledger event of the refund

    def as_wire(self) -> dict[str, Any]:
        return {
            "receipt": self.receipt,
            "user": self.user,
            "refunded": self.refunded,
            "coins_taken": self.coins_taken,
            "debt_added": self.debt_added,
            "coins": self.coins,
            "debt": self.debt,
        }


@dataclass(frozen=True, slots=True)
class WalletView:
    user: str
    coins: int
    diamonds: int  # all the creator's diamonds: on hold and payable
    spent_today: int  # coins spent on gifts this UTC day (Redis's day)
    daily_limit: int | None
    debt: int
    spent_week: int = 0  # coins spent on gifts this ISO week (UTC)
    weekly_limit: int | None = None
    diamonds_held: int = 0  # of `diamonds`, those still on hold (not payable yet)
    diamonds_payable: int = 0  # of `diamonds`, those past their hold
    payout_left_today: int = 0  # what the daily payout cap still allows this UTC day

    def as_wire(self) -> dict[str, Any]:
        return {
            "user": self.user,
            "coins": self.coins,
            "diamonds": self.diamonds,
            "spent_today": self.spent_today,
            "daily_limit": self.daily_limit,
            "debt": self.debt,
            "spent_week": self.spent_week,
            "weekly_limit": self.weekly_limit,
            "diamonds_held": self.diamonds_held,
            "diamonds_payable": self.diamonds_payable,
            "payout_left_today": self.payout_left_today,
        }


class Unchanged(Enum):
    """A limit left as it is: the request did not name it."""

    UNCHANGED = "unchanged"


UNCHANGED = Unchanged.UNCHANGED
LimitChange = int | None | Unchanged  # a new limit, None to clear it, or UNCHANGED


@dataclass(frozen=True, slots=True)
class PayoutResult:
    payout: str  # payout id
    creator: str
    cents: int
    diamonds: int  # the creator's diamonds left right after the payout
    event: str  # ledger event of the payout
    replayed: bool  # True when the key was paid before: the first result, nothing moved now

    def as_wire(self) -> dict[str, Any]:
        return {"payout": self.payout, "cents": self.cents, "diamonds": self.diamonds}


class Wallet:
    """The money path: gifts for the WebSocket sessions; purchases, refunds, wallets, limits
    and payouts for the internal HTTP API.

    `clock` is for tests only: a function giving now in ms that every script then takes
    instead of Redis's TIME, so a test can cross a midnight or a hold by hand (Redis's clock
    cannot be moved). It is a constructor argument, never a request's field, and the server
    (app.py) never passes one, so no client, API caller or gateway clock chooses money time."""

    def __init__(
        self,
        redis: RedisClient,
        economics: Economics,
        *,
        keyspace: keys.KeySpace = keys.SINGLE,
        metrics: Metrics | None = None,
        payout_hold_days: int = DEFAULT_PAYOUT_HOLD_DAYS,
        payout_daily_cap: int = DEFAULT_PAYOUT_DAILY_CAP,
        clock: Callable[[], int] | None = None,
        on_credit_due: Callable[[], object] | None = None,
        durable_ack: bool = False,
        durable_ack_timeout_ms: int = DEFAULT_DURABLE_ACK_TIMEOUT_MS,
    ) -> None:
        """`redis` is a RedisCluster exactly when `keyspace.cluster`. `on_credit_due` (a
        cluster's Crediting.poke) runs after each gift settled here, so its creator is credited
        at once rather than at the next tick."""
        _check_int("payout_hold_days", payout_hold_days, 0, MAX_PAYOUT_HOLD_DAYS)
        _check_int("payout_daily_cap", payout_daily_cap, 1, MAX_PAYOUT_DAILY_CAP)
        self._redis = redis
        self._economics = economics
        self._keys = keyspace
        self._ledger_key = keyspace.ledger()
        self._metrics = metrics
        self.payout_hold_days = payout_hold_days
        self.payout_daily_cap = payout_daily_cap
        self._clock = clock
        self._scripts: dict[str, AsyncScript] = {
            name: scripts.register(redis, name) for name in SCRIPTS
        }
        self.on_credit_due = on_credit_due
        self._durable_ack = durable_ack
        self._durable_ack_timeout_ms = durable_ack_timeout_ms
        self._waitaof = True  # until a Redis before 7.2 says it does not know it
        # One Redis: concurrent movements share round trips. A cluster: the client's calls,
        # each kept running when its caller is cancelled (tracked here for `drain`).
        self._cluster: RedisCluster | None = None
        self._batcher: ScriptBatcher | None = None
        if keyspace.cluster:
            assert isinstance(redis, RedisCluster), "a cluster keyspace needs a RedisCluster"
            self._cluster = redis
            self._replicas = Replicas(redis)
        else:
            assert not isinstance(redis, RedisCluster), "a RedisCluster needs a cluster keyspace"
            self._batcher = ScriptBatcher(redis)
        self._calls: set[asyncio.Task[Any]] = set()
        # redis-py's cluster pool refuses a call past its per-node cap (MaxConnectionsError)
        # instead of making it wait: movements past this many in flight wait here instead
        self._cluster_slots = asyncio.Semaphore(CLUSTER_CALLS_IN_FLIGHT)
        self._cluster_writes = 0
        self._lua_seconds = (
            {name: metrics.lua_seconds.labels(script=name) for name in SCRIPTS}
            if metrics is not None
            else {}
        )

    @functools.cached_property
    def boards(self) -> Boards:
        """The leaderboards this wallet's gifts count on, read by the same money time."""
        return Boards(self._redis, self._keys, clock=self._clock)

    async def load_scripts(self) -> None:
        """Load every script up front; a later NOSCRIPT (Redis restarted or flushed) reloads it."""
        for script in self._scripts.values():
            script.sha = await self._redis.script_load(script.script)

    @property
    def in_flight(self) -> int:
        """Money movements sent to Redis whose outcome is not handled yet."""
        return len(self._calls) if self._batcher is None else self._batcher.in_flight

    @property
    def redis_writes(self) -> int:
        """Writes the money path has made to Redis: how many round trips its calls shared."""
        return self._cluster_writes if self._batcher is None else self._batcher.writes

    async def drain(self, timeout_s: float | None = None) -> int:
        """Wait for every movement in progress, callers cancelled or not (SIGTERM, tests);
        returns how many were still running after `timeout_s` (their keys answer retries)."""
        if self._batcher is not None:
            return await self._batcher.drain(timeout_s)
        if not self._calls:
            return 0
        _, pending = await asyncio.wait(set(self._calls), timeout=timeout_s)
        return len(pending)

    # ---- gifts (WebSocket) --------------------------------------------------------------

    async def send_gift(
        self,
        *,
        sender: str,
        adult: bool,
        creator: str,
        room: str,
        gift: Gift,
        count: int,
        key: str,
        on_settled: Callable[[SettledGift], object] | None = None,
        in_room: GiftRoom | None = None,
    ) -> SettledGift:
        """Debit the sender and credit the creator once per (sender, key); the creator's
        diamonds start on hold. `on_settled` runs as soon as Redis answers, even if the caller
        was cancelled meanwhile: what must follow a debit (the room's event) cannot be cut
        from it by a dropped connection. The result's `ts` is the ledger entry's.

        `in_room` (the gateway's gifts): the room must be live (else `room_not_live`), and
        when it names a log the gift's event is written there with the settlement. A first
        settlement counts on the leaderboards (boards.py) where the creator is credited: the
        week's and the day's always, the room's session board only for a gift `in_room`. Without
        it (money-only callers: tools, tests) no room is checked or written.

        On a cluster the room's record is on the creator's shard: it is read before the
        script, and the event is written with the creator's credit (crediting.py); a gift
        racing its room's end is settled, and its event not written."""
        if not is_count(count):
            raise Refusal(Reason.BAD_COUNT, f"count must be 1 to {MAX_COUNT}")
        if not is_key(key):
            raise Refusal(Reason.BAD_REQUEST, f"key must be {KEY_RULE}")
        _check_int("gift coins", gift.coins, 1, MAX_GIFT_COINS)
        coins = gift.coins * count
        diamonds = self._economics.diamonds_for(coins)
        event = _new_id()
        if self._cluster is not None and in_room is not None:
            await self._check_live(room, in_room)

        def settled(reply: list[Any]) -> SettledGift:
            first_event = keys.text(reply[0])
            result = SettledGift(
                event=first_event,
                coins=int(reply[1]),
                combo=int(reply[2]),
                diamonds=int(reply[3]),
                ts=int(reply[4]),
                replayed=first_event != event,
            )
            if self._metrics is not None:
                if result.replayed:
                    self._metrics.gift_replays.inc()
                else:
                    self._metrics.gifts_settled.inc()
                    self._metrics.coins_settled.inc(coins)
            if on_settled is not None:
                on_settled(result)
            if self._cluster is not None and not result.replayed and self.on_credit_due:
                self.on_credit_due()
            return result

        room_args = _NO_ROOM_ARGS if in_room is None else in_room.event_args
        if self._cluster is None:
            ks = self._keys
            creator_keys = [
                ks.wallet(creator),
                ks.held(creator),
                "" if in_room is None else in_room.record,
                "" if in_room is None else in_room.log,
                "",  # no credit outbox: the creator is credited here
                "" if in_room is None else ks.board_session(room),
                ks.board_week_prefix(creator),
                ks.board_names(creator),
                ks.board_creators_day_prefix(ks.partition(creator)),
                ks.board_creator_names(ks.partition(creator)),
            ]
            ledger = self._ledger_key
        else:
            outbox = self._keys.credit_outbox(
                self._keys.partition(sender), self._keys.partition(creator)
            )
            creator_keys = [outbox] * 10  # the creator's keys are on another shard
            ledger = self._keys.ledger_of(sender)
            if in_room is None or not in_room.log:
                room_args = _NO_ROOM_ARGS  # no log: the hub publishes the event itself
        wallet, held, record, log_key, outbox_key, *board_keys = creator_keys
        return await self._movement(
            "send_gift",
            [
                self._keys.wallet(sender),
                wallet,
                self._keys.gift_key(sender, key),
                self._keys.combo(sender, room),
                ledger,
                held,
                record,
                log_key,
                outbox_key,
                *board_keys,
            ],
            [
                event,
                sender,
                creator,
                room,
                gift.id,
                key,
                count,
                coins,
                diamonds,
                int(adult),
                self._now_arg(),
                keys.GIFT_KEY_TTL_MS,
                keys.COMBO_GAP_MS,
                keys.COMBO_TTL_MS,
                self.payout_hold_days,
                *room_args,
                "" if in_room is None else in_room.name_json,
                int(in_room is not None),
            ],
            settled,
        )

    async def _movement(
        self,
        name: str,
        script_keys: Sequence[str],
        args: Sequence[Any],
        on_reply: Callable[[list[Any]], T],
    ) -> T:
        """A movement of coins or diamonds: its script, and with --durable-ack the wait that
        makes its answer safe from a failover (the replicas) or a crash (the AOF's fsync)."""
        result = await self._call(name, script_keys, args, on_reply, durable=self._durable_ack)
        if self._durable_ack and self._cluster is None:
            await self._wait_aof()
        return result

    async def _check_live(self, room: str, in_room: GiftRoom) -> None:
        """On a cluster: the room's record says live (the script cannot read it there)."""
        if keys.text(await self._redis.hget(in_room.record, "live") or b"") != "1":
            raise Refusal(Reason.ROOM_NOT_LIVE, f"room {room} is not live")

    async def _wait_aof(self) -> None:
        """One Redis, --durable-ack: until the AOF holding the gift is fsynced. WAITAOF waits
        for the writes of its own connection, so a marker is written on it first: the AOF is
        one sequence, and the marker comes after the gift. A Redis before 7.2 has no WAITAOF:
        the start let it through only with appendfsync always (redis_check.py), where the
        gift's reply itself came after the fsync."""
        if not self._waitaof:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.incr(self._keys.durable_ack_marker())
            pipe.execute_command("WAITAOF", 1, 0, self._durable_ack_timeout_ms)
            _, waited = await pipe.execute(raise_on_error=False)
        if isinstance(waited, ResponseError) and "unknown command" in str(waited).lower():
            self._waitaof = False
            return
        if isinstance(waited, Exception):
            raise waited
        local, _ = waited
        if int(local) < 1:
            self._durable_short(
                f"WAITAOF: the AOF not fsynced in {self._durable_ack_timeout_ms} ms"
            )

    def _durable_short(self, what: str) -> None:
        log.warning("durable ack: answering a settled gift although %s", what)
        if self._metrics is not None:
            self._metrics.durable_ack_short.inc()

    async def settled_gift(
        self, *, sender: str, key: str, room: str, gift: str, count: int
    ) -> SettledGift | None:
        """The first result of a gift key already settled, or None. For the refusal path:
        a retry must get its `gift_ok` even after the room has ended or been left."""
        stored = await self._redis.hmget(
            self._keys.gift_key(sender, key),
            ["room", "gift", "count", "event", "coins", "combo", "diamonds", "ts"],
        )
        if stored[0] is None:
            return None
        if (keys.text(stored[0]), keys.text(stored[1]), _int(stored[2])) != (room, gift, count):
            raise Refusal(Reason.KEY_REUSED, f"key {key} was used for another gift")
        if self._metrics is not None:
            self._metrics.gift_replays.inc()
        return SettledGift(
            event=keys.text(stored[3]),
            coins=_int(stored[4]),
            combo=_int(stored[5]),
            diamonds=_int(stored[6]),
            ts=_int(stored[7]),
            replayed=True,
        )

    async def balance(self, user: str) -> tuple[int, int]:
        """(coins, diamonds); an unknown user has (0, 0)."""
        coins, diamonds = await self._redis.hmget(self._keys.wallet(user), ["coins", "diamonds"])
        return _int(coins), _int(diamonds)

    # ---- the internal HTTP API ----------------------------------------------------------

    async def purchase(
        self, *, receipt: str, user: str, package: Package, adult: bool
    ) -> PurchaseResult:
        """Credit a package once per receipt, paying any debt down first."""
        _check_receipt(receipt)
        _check_int("package coins", package.coins, 1, MAX_PACKAGE_COINS)
        _check_int("package price_cents", package.price_cents, 0, MAX_PRICE_CENTS)
        if self._keys.cluster:  # the receipt is global; its record sits in the user's partition
            if adult:
                await self._claims.claim_receipt(receipt, user, package.id)
            else:  # refused or replayed by purchase.lua: nothing to claim
                await self._claims.check_receipt(receipt, user, package.id)
        event = _new_id()

        def purchased(reply: list[Any]) -> PurchaseResult:
            first_event = keys.text(reply[0])
            return PurchaseResult(
                user=user,
                receipt=receipt,
                coins=int(reply[1]),
                credited=first_event == event,
                coins_credited=int(reply[2]),
                debt_repaid=int(reply[3]),
                debt=int(reply[4]),
                event=first_event,
            )

        return await self._movement(
            "purchase",
            [
                self._keys.wallet(user),
                self._keys.receipt(receipt, owner=user),
                self._keys.ledger_of(user),
            ],
            [
                event,
                user,
                receipt,
                package.id,
                package.currency,
                package.coins,
                package.price_cents,
                int(adult),
                self._now_arg(),
                MAX_BALANCE,
            ],
            purchased,
        )

    async def refund(self, *, receipt: str) -> RefundResult:
        """Reverse a purchase once; what the balance cannot cover becomes debt (the creator's
        diamonds from gifts of those coins stay: the hold is what keeps them unpaid)."""
        _check_receipt(receipt)
        user = await self._receipt_owner(receipt)  # never changes once set
        if user is None:
            raise Refusal(Reason.UNKNOWN_RECEIPT, f"no purchase with receipt {receipt}")
        event = _new_id()

        def refunded(reply: list[Any]) -> RefundResult:
            first_event = keys.text(reply[0])
            return RefundResult(
                user=user,
                receipt=receipt,
                refunded=first_event == event,
                coins_taken=int(reply[1]),
                debt_added=int(reply[2]),
                coins=int(reply[3]),
                debt=int(reply[4]),
                event=first_event,
            )

        return await self._movement(
            "refund",
            [
                self._keys.receipt(receipt, owner=user),
                self._keys.wallet(user),
                self._keys.ledger_of(user),
            ],
            [event, user, receipt, self._now_arg()],
            refunded,
        )

    async def _receipt_owner(self, receipt: str) -> str | None:
        """The receipt's buyer: its record's on one Redis, its claim's on a cluster (a claim
        whose purchase never ran finds no record: refund.lua then says unknown_receipt)."""
        if self._keys.cluster:
            claim = await self._claims.receipt(receipt)
            return None if claim is None else claim.owner
        owner = await self._redis.hget(self._keys.receipt(receipt), "user")
        return None if owner is None else keys.text(owner)

    async def wallet(self, user: str) -> WalletView:
        """Balances, debt, limits, the spend of this UTC day and ISO week, and the diamonds
        on hold and payable now, all read in one MULTI with Redis's time."""
        async with self._redis.pipeline(transaction=True) as pipe:
            self._read_view(pipe, user)
            return self._view(user, await self._with_time(user, await pipe.execute()))

    async def set_daily_limit(self, user: str, daily_limit: int | None) -> WalletView:
        """Set (None: clear) the user's cap on coins spent per UTC day; returns the wallet."""
        return await self.set_limits(user, daily_limit=daily_limit)

    async def set_limits(
        self,
        user: str,
        *,
        daily_limit: LimitChange = UNCHANGED,
        weekly_limit: LimitChange = UNCHANGED,
    ) -> WalletView:
        """Set (None: clear; UNCHANGED: leave) the user's caps on coins spent per UTC day and
        per ISO week; returns the wallet. Not a money movement, so a MULTI rather than a
        script, and no ledger entry."""
        changes = {"daily_limit": daily_limit, "weekly_limit": weekly_limit}
        for name, limit in changes.items():
            if limit is not None and limit is not UNCHANGED:
                _check_int(name, limit, 0, MAX_AMOUNT, refuse=True)
        async with self._redis.pipeline(transaction=True) as pipe:
            writes = 0
            for name, limit in changes.items():
                if limit is None:
                    pipe.hdel(self._keys.wallet(user), name)
                elif not isinstance(limit, Unchanged):
                    pipe.hset(self._keys.wallet(user), name, limit)
                else:
                    continue
                writes += 1
            self._read_view(pipe, user)
            return self._view(user, await self._with_time(user, (await pipe.execute())[writes:]))

    async def payout(self, *, creator: str, diamonds: int, key: str) -> PayoutResult:
        """Turn payable diamonds into cents once per key: only diamonds past their hold, and
        at most the daily cap a UTC day (Redis's day)."""
        _check_int("diamonds", diamonds, 1, MAX_PAYOUT_DIAMONDS, refuse=True)
        if not is_key(key):
            raise Refusal(Reason.BAD_VALUE, f"key must be {KEY_RULE}")
        minimum = self._economics.payout_min_diamonds
        if diamonds < minimum:
            raise Refusal(
                Reason.BELOW_MINIMUM, f"a payout needs at least {minimum} diamonds, not {diamonds}"
            )
        if self._keys.cluster:  # the key is global; its record sits in the creator's partition
            await self._claims.claim_payout(key, creator, diamonds)
        event = _new_id()

        def paid(reply: list[Any]) -> PayoutResult:
            first_event = keys.text(reply[0])
            return PayoutResult(
                payout=keys.text(reply[1]),
                creator=creator,
                cents=int(reply[2]),
                diamonds=int(reply[3]),
                event=first_event,
                replayed=first_event != event,
            )

        return await self._movement(
            "payout",
            [
                self._keys.wallet(creator),
                self._keys.payout(key, owner=creator),
                self._keys.ledger_of(creator),
                self._keys.held(creator),
            ],
            [
                event,
                _new_id(),
                creator,
                key,
                diamonds,
                self._economics.cents_for(diamonds),
                self._now_arg(),
                self.payout_daily_cap,
            ],
            paid,
        )

    @functools.cached_property
    def _claims(self) -> Claims:
        """The claim step of purchases and payouts, on a cluster only (claims.py); built on
        first use."""
        if not isinstance(self._redis, RedisCluster):
            raise TypeError("a cluster KeySpace needs a RedisCluster client")
        metrics = self._metrics
        return Claims(
            self._redis,
            self._keys,
            now=self._now_arg,
            replicas=self._replicas,
            on_held_back=None if metrics is None else metrics.claim_wait_holdbacks.inc,
        )

    # ---- money time ---------------------------------------------------------------------

    def _now_arg(self) -> int | str:
        """What a script takes as now: '' (read Redis's TIME), or the test clock's ms."""
        return "" if self._clock is None else _ms(self._clock())

    def _read_view(self, pipe: Any, user: str) -> None:
        pipe.hmget(self._keys.wallet(user), list(_VIEW_FIELDS))
        pipe.hgetall(self._keys.held(user))
        if not self._keys.cluster:
            pipe.time()

    async def _with_time(self, user: str, results: list[Any]) -> list[Any]:
        """The view's reads and Redis's time: read in the MULTI on one Redis; on a cluster,
        whose MULTI takes keyed commands only, asked next of the node the scripts of this
        wallet read TIME on (a view, not a movement: a moment apart is no harm)."""
        if not self._keys.cluster:
            return results
        assert isinstance(self._redis, RedisCluster)
        node = self._redis.get_node_from_key(self._keys.wallet(user))
        return [*results, await self._redis.time(target_nodes=node)]

    def _view(self, user: str, results: Sequence[Any]) -> WalletView:
        values, held_buckets, (seconds, micros) = results
        stored = dict(zip(_VIEW_FIELDS, values, strict=True))
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        if self._clock is not None:
            now_ms = _ms(self._clock())
        today = keys.epoch_day(now_ms)
        diamonds = _int(stored["diamonds"])
        held = sum(int(v) for day, v in held_buckets.items() if int(day) > today)
        paid_today = _stamped(stored, "payout_day", "payout_day_diamonds", today)
        return WalletView(
            user=user,
            coins=_int(stored["coins"]),
            diamonds=diamonds,
            spent_today=_stamped(stored, "spent_day", "spent_day_coins", today),
            daily_limit=_opt_int(stored["daily_limit"]),
            debt=_int(stored["debt"]),
            spent_week=_stamped(stored, "spent_week", "spent_week_coins", keys.iso_week(today)),
            weekly_limit=_opt_int(stored["weekly_limit"]),
            diamonds_held=held,
            diamonds_payable=max(diamonds - held, 0),
            payout_left_today=max(self.payout_daily_cap - paid_today, 0),
        )

    # ---- the one way a script is called -------------------------------------------------

    async def _call(
        self,
        name: str,
        script_keys: Sequence[str],
        args: Sequence[Any],
        result: Callable[[list[Any]], T],
        *,
        durable: bool = False,
    ) -> T:
        """Run a script; a refusal becomes a Refusal. A cancelled caller does not stop it:
        the reply is still read and `result` still runs (a retry is answered by its key).
        `durable` on a cluster: a WAIT for the shard's replicas on the script's connection."""
        started = time.perf_counter()
        latency = self._lua_seconds.get(name)

        def on_reply(reply: list[Any]) -> T:
            if latency is not None:
                latency.observe(time.perf_counter() - started)
            status = keys.text(reply[0])
            if status != "ok":
                raise Refusal(Reason(status), keys.text(reply[1]))
            return result(reply[1:])

        script = self._scripts[name]
        if self._batcher is not None:
            return await self._batcher.submit(script, script_keys, args, on_reply)

        async def on_cluster() -> T:
            async with self._cluster_slots:
                reply = await self._cluster_call(script, script_keys, args, durable)
            return on_reply(reply)

        task = asyncio.ensure_future(on_cluster())
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)
        return await asyncio.shield(task)

    async def _cluster_call(
        self, script: AsyncScript, script_keys: Sequence[str], args: Sequence[Any], durable: bool
    ) -> Any:
        """A script on the shard of its keys, through the client. Durable: with a WAIT on its
        own connection; a MOVED there (the script did not run) lets the client renew its slot
        map and tries again, a few times."""
        assert self._cluster is not None
        self._cluster_writes += 1
        if not durable:
            return await script(keys=script_keys, args=args, client=self._cluster)
        reply, acked, replicas = await script_through_failover(
            self._cluster,
            self._replicas,
            script,
            script_keys,
            args,
            self._durable_ack_timeout_ms,
            mark_key=self._keys.durable_mark(script_keys[0]),
            attempts=DURABLE_ATTEMPTS,
        )
        if acked < replicas:
            self._durable_short(f"WAIT: {acked} of {replicas} replicas acked in time")
        return reply


CLUSTER_CALLS_IN_FLIGHT = 64  # a cluster's money calls at once (each holds a connection)
DURABLE_ATTEMPTS = 3  # a durable gift's tries when its shard's slot moved meanwhile
# What a money-only gift sends in place of the room's event parts.
_NO_ROOM_ARGS: tuple[str, str, str, int] = ("", "", "", 0)

_VIEW_FIELDS = (
    "coins",
    "diamonds",
    "debt",
    "daily_limit",
    "weekly_limit",
    "spent_day",
    "spent_day_coins",
    "spent_week",
    "spent_week_coins",
    "payout_day",
    "payout_day_diamonds",
)


def _stamped(stored: dict[str, Any], stamp: str, count: str, current: int) -> int:
    """A day- or week-stamped counter of the wallet hash: its count while the stamp is
    `current`, 0 once that day or week is over (as the scripts read it)."""
    return _int(stored[count]) if _int(stored[stamp]) == current else 0


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


_ids = random.Random()  # seeded from os.urandom; reseeded in a forked child
os.register_at_fork(after_in_child=_ids.seed)


def _new_id() -> str:
    """32 hex digits, random like a uuid4 (unique with overwhelming odds, never a secret:
    event ids are broadcast), without a urandom syscall per gift."""
    return f"{_ids.getrandbits(128):032x}"


def _int(value: Any) -> int:
    return 0 if value is None else int(value)


def _ms(now_ms: int) -> int:
    _check_int("now_ms", now_ms, 0, 2**50)
    return now_ms


def _check_int(name: str, value: object, low: int, high: int, *, refuse: bool = False) -> None:
    """Only true ints reach a script (never a bool or a float). `refuse`: a value the API
    caller chose, so a Refusal; else a ValueError (a bug of the calling code)."""
    if type(value) is int and low <= value <= high:
        return
    message = f"{name} must be an integer from {low} to {high}, not {value!r}"
    if refuse:
        raise Refusal(Reason.BAD_VALUE, message)
    raise ValueError(message)


def _check_receipt(receipt: object) -> None:
    if not isinstance(receipt, str) or not 1 <= len(receipt) <= MAX_RECEIPT_LEN:
        raise Refusal(Reason.BAD_VALUE, f"receipt must be 1 to {MAX_RECEIPT_LEN} characters")
