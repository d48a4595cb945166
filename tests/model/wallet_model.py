"""A reference model of the money path in plain Python, no Redis: what server/money/wallet.py
and the Lua scripts in server/lua/ must do, written out as simply as possible so a state machine can
compare the real thing against it after every step.

It mirrors wallet.py's own input checks, then each script's checks in the script's order, then
its writes. Event and payout ids are uuids the real Wallet makes; the model cannot guess them,
so a movement that settles takes its ids from the real result (`new_event`, `new_payout`) and
every later replay, record and ledger entry must carry those same ids.

Wallets are kept as the exact hash fields Redis holds (a field exists once a script or the
limit call wrote it, even when it is 0), so the whole keyspace can be rendered and compared.

Time: the real Wallet runs on a test clock (Wallet(clock=...)) that the model's `now` drives,
standing in for Redis's TIME. Days are UTC days and weeks ISO weeks (Monday first), counted as
the model counts them here, apart from giftstream.server.money.keys on purpose.

Expiry: the gift key record (24 h) and the combo (60 s) are PEXPIREd on Redis's own clock,
which a test cannot move. The model records each key's TTL bound and never expires anything;
the state machine keeps its clock within 23 h of its start, where both agree that nothing has
expired (a combo is judged by the gift's time, not by its TTL, so the 5 s gap and the day
rollover are fully exercised). The clock also jumps whole days, for the week and hold rules:
those jumps pass the TTLs, which Redis, whose own clock stays put, never applies; the model
keeps those keys as Redis does.

Holds and the payout cap: a gift's diamonds are held until the start of the UTC day
hold_days + 1 after its day (giftstream:held:C, by release day); a payout may take only the
diamonds not on hold, and a creator at most `payout_daily_cap` diamonds a UTC day.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from giftstream.protocol.rules import MAX_COUNT, is_key
from giftstream.server.money import keys
from giftstream.server.money.catalog import Economics, Gift, Package
from giftstream.server.money.wallet import (
    MAX_BALANCE,
    MAX_DAILY_LIMIT,
    MAX_GIFT_COINS,
    MAX_PACKAGE_COINS,
    MAX_PAYOUT_DIAMONDS,
    MAX_RECEIPT_LEN,
    MAX_WEEKLY_LIMIT,
    PayoutResult,
    PurchaseResult,
    RefundResult,
    SettledGift,
    WalletView,
)


@dataclass(frozen=True, slots=True)
class Refusal:
    """A movement that must not happen. `code` is the script's refusal code ('debt',
    'key_reused', 'receipt_reused', ...) or wallet.py's ('bad_count', 'bad_request',
    'below_minimum', and 'value_error' for a ValueError, a caller's bug)."""

    code: str


@dataclass(frozen=True, slots=True)
class GiftRecord:
    """A settled gift key: its params and first result (giftstream:gift_key:U:IK)."""

    room: str
    gift: str
    count: int
    event: str
    coins: int  # the sender's balance right after
    combo: int
    diamonds: int
    ts: int


@dataclass(frozen=True, slots=True)
class Streak:
    gift: str
    combo: int
    at: int


@dataclass(slots=True)
class Receipt:
    user: str
    package: str
    coins: int  # the package's coins
    credited: int
    debt_repaid: int
    price_cents: int
    event: str
    ts: int
    refund: tuple[str, int, int, int] | None = None  # (event, coins taken, debt added, ts)


@dataclass(frozen=True, slots=True)
class PayoutRecord:
    creator: str
    diamonds: int
    event: str
    payout: str
    cents: int
    left: int
    ts: int


# Each key the model expects: (type, value, TTL bound in ms or None for no TTL).
Expected = dict[str, tuple[str, Any, int | None]]


EPOCH = date(1970, 1, 1)


def utc_date(now_ms: int) -> date:
    """The UTC date of now_ms, computed apart from giftstream.server.money.keys on purpose."""
    return datetime.fromtimestamp(now_ms // 1000, tz=UTC).date()


def day_number(now_ms: int) -> int:
    """The UTC day of now_ms as days since 1970-01-01 (the number Redis stores)."""
    return (utc_date(now_ms) - EPOCH).days


def week_number(now_ms: int) -> int:
    """The ISO week of now_ms as its Monday's day number (the number Redis stores)."""
    today = utc_date(now_ms)
    return (today - timedelta(days=today.isoweekday() - 1) - EPOCH).days


def _is_int(value: object, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high


@dataclass
class WalletModel:
    """Every wallet, record, counter and ledger entry the money path should have made."""

    economics: Economics
    max_balance: int = MAX_BALANCE
    now: int = 0
    hold_days: int = 0
    payout_cap: int = 2_000_000
    wallets: dict[str, dict[str, int]] = field(default_factory=dict)
    gift_records: dict[tuple[str, str], GiftRecord] = field(default_factory=dict)
    held: dict[str, dict[int, int]] = field(default_factory=dict)  # creator -> release day
    combos: dict[tuple[str, str], Streak] = field(default_factory=dict)  # (sender, room)
    receipts: dict[str, Receipt] = field(default_factory=dict)
    payouts: dict[str, PayoutRecord] = field(default_factory=dict)
    ledger: list[dict[str, Any]] = field(default_factory=list)
    # the leaderboards a money-only gift counts on (the week's and the day's; no session):
    # board key -> member -> coins, and names hash -> user -> name as JSON text
    boards: dict[str, dict[str, int]] = field(default_factory=dict)
    names: dict[str, dict[str, str]] = field(default_factory=dict)

    # ---- reading ----------------------------------------------------------------------

    def get(self, user: str, name: str) -> int:
        return self.wallets.get(user, {}).get(name, 0)

    def _add(self, user: str, name: str, delta: int) -> int:
        """HINCRBY: creates the field (and the hash) even when delta is 0."""
        fields = self.wallets.setdefault(user, {})
        fields[name] = fields.get(name, 0) + delta
        return fields[name]

    def limit(self, user: str, name: str = "daily_limit") -> int | None:
        return self.wallets.get(user, {}).get(name)

    def stamped(self, user: str, stamp: str, count: str, current: int) -> int:
        """A counter kept with the day or week it counts: 0 once that one is over."""
        fields = self.wallets.get(user, {})
        return fields.get(count, 0) if fields.get(stamp, 0) == current else 0

    def spent_today(self, user: str) -> int:
        return self.stamped(user, "spent_day", "spent_day_coins", day_number(self.now))

    def spent_week(self, user: str) -> int:
        return self.stamped(user, "spent_week", "spent_week_coins", week_number(self.now))

    def on_hold(self, creator: str) -> int:
        today = day_number(self.now)
        return sum(d for day, d in self.held.get(creator, {}).items() if day > today)

    def drop_due_holds(self, creator: str) -> None:
        """What the scripts do whenever they read a creator's holds: forget those over."""
        buckets = self.held.get(creator)
        if buckets is None:
            return
        today = day_number(self.now)
        for day in [day for day in buckets if day <= today]:
            del buckets[day]
        if not buckets:
            del self.held[creator]

    def view(self, user: str) -> WalletView:
        diamonds, held = self.get(user, "diamonds"), self.on_hold(user)
        paid_today = self.stamped(user, "payout_day", "payout_day_diamonds", day_number(self.now))
        return WalletView(
            user=user,
            coins=self.get(user, "coins"),
            diamonds=diamonds,
            spent_today=self.spent_today(user),
            daily_limit=self.limit(user),
            debt=self.get(user, "debt"),
            spent_week=self.spent_week(user),
            weekly_limit=self.limit(user, "weekly_limit"),
            diamonds_held=held,
            diamonds_payable=diamonds - held,
            payout_left_today=max(self.payout_cap - paid_today, 0),
        )

    # ---- movements ---------------------------------------------------------------------

    def send_gift(
        self,
        *,
        sender: str,
        adult: bool,
        creator: str,
        room: str,
        gift: Gift,
        count: object,
        key: str,
        new_event: str,
    ) -> SettledGift | Refusal:
        if not _is_int(count, 1, MAX_COUNT):
            return Refusal("bad_count")
        assert isinstance(count, int)
        if not is_key(key):
            return Refusal("bad_request")
        if not _is_int(gift.coins, 1, MAX_GIFT_COINS):
            return Refusal("value_error")
        coins = gift.coins * count
        diamonds = self.economics.diamonds_for(coins)
        first = self.gift_records.get((sender, key))
        if first is not None:
            if (first.room, first.gift, first.count) != (room, gift.id, count):
                return Refusal("key_reused")
            return SettledGift(
                event=first.event,
                coins=first.coins,
                combo=first.combo,
                diamonds=first.diamonds,
                ts=first.ts,
                replayed=True,
            )
        if self.get(sender, "debt") > 0:
            return Refusal("debt")
        if not adult:
            return Refusal("underage")
        spent_today, spent_week = self.spent_today(sender), self.spent_week(sender)
        limit = self.limit(sender)
        if limit is not None and spent_today + coins > limit:
            return Refusal("spending_limit")
        weekly = self.limit(sender, "weekly_limit")
        if weekly is not None and spent_week + coins > weekly:
            return Refusal("spending_limit")
        if self.get(sender, "coins") < coins:
            return Refusal("insufficient_coins")
        streak = self.combos.get((sender, room))
        combo = 1
        if (
            streak is not None
            and streak.gift == gift.id
            and self.now - streak.at < keys.COMBO_GAP_MS
        ):
            combo = streak.combo + 1
        today = day_number(self.now)
        release = today + self.hold_days + 1 if self.hold_days > 0 else None

        self.ledger.append(
            {
                "event": new_event,
                "kind": "gift",
                "ts": self.now,
                "sender": sender,
                "creator": creator,
                "room": room,
                "gift": gift.id,
                "count": count,
                "coins": coins,
                "diamonds": diamonds,
                "platform": coins - diamonds,
                "key": key,
                "combo": combo,
                "payable_at": self.now if release is None else release * 86_400_000,
            }
        )
        after = self._add(sender, "coins", -coins)
        self._add(creator, "diamonds", diamonds)
        self.drop_due_holds(creator)
        if release is not None and diamonds > 0:
            buckets = self.held.setdefault(creator, {})
            buckets[release] = buckets.get(release, 0) + diamonds
        self.gift_records[(sender, key)] = GiftRecord(
            room, gift.id, count, new_event, after, combo, diamonds, self.now
        )
        self.wallets[sender] |= {
            "spent_day": today,
            "spent_day_coins": spent_today + coins,
            "spent_week": week_number(self.now),
            "spent_week_coins": spent_week + coins,
        }
        self.combos[(sender, room)] = Streak(gift.id, combo, self.now)
        day = keys.epoch_day(self.now)
        for board, member in (
            (keys.SINGLE.board_week(creator, keys.iso_week(day)), sender),
            (keys.SINGLE.board_creators_day(0, day), creator),
        ):
            scores = self.boards.setdefault(board, {})
            scores[member] = scores.get(member, 0) + coins
        self.names.setdefault(keys.SINGLE.board_names(creator), {})[sender] = f'"{sender}"'
        self.names.setdefault(keys.SINGLE.board_creator_names(0), {})[creator] = f'"{creator}"'
        return SettledGift(new_event, after, combo, diamonds, self.now, replayed=False)

    def purchase(
        self, *, receipt: str, user: str, package: Package, adult: bool, new_event: str
    ) -> PurchaseResult | Refusal:
        if not 1 <= len(receipt) <= MAX_RECEIPT_LEN:
            return Refusal("bad_request")
        if not _is_int(package.coins, 1, MAX_PACKAGE_COINS):
            return Refusal("value_error")
        first = self.receipts.get(receipt)
        if first is not None:
            if first.user != user or first.package != package.id:
                return Refusal("receipt_reused")
            return PurchaseResult(
                user=user,
                receipt=receipt,
                coins=self.get(user, "coins"),
                credited=False,
                coins_credited=first.credited,
                debt_repaid=first.debt_repaid,
                debt=self.get(user, "debt"),
                event=first.event,
            )
        if not adult:
            return Refusal("underage")
        balance, debt = self.get(user, "coins"), self.get(user, "debt")
        repaid = min(debt, package.coins)
        credited = package.coins - repaid
        if balance + credited > self.max_balance:
            return Refusal("balance_limit")

        self.ledger.append(
            {
                "event": new_event,
                "kind": "purchase",
                "ts": self.now,
                "user": user,
                "receipt": receipt,
                "package": package.id,
                "coins": package.coins,
                "credited": credited,
                "debt_repaid": repaid,
                "price_cents": package.price_cents,
                "currency": package.currency,
            }
        )
        after = self._add(user, "coins", credited)
        if repaid > 0:
            self._add(user, "debt", -repaid)
        self.receipts[receipt] = Receipt(
            user,
            package.id,
            package.coins,
            credited,
            repaid,
            package.price_cents,
            new_event,
            self.now,
        )
        return PurchaseResult(
            user=user,
            receipt=receipt,
            coins=after,
            credited=True,
            coins_credited=credited,
            debt_repaid=repaid,
            debt=debt - repaid,
            event=new_event,
        )

    def refund(self, *, receipt: str, new_event: str) -> RefundResult | Refusal:
        if not 1 <= len(receipt) <= MAX_RECEIPT_LEN:
            return Refusal("bad_request")
        bought = self.receipts.get(receipt)
        if bought is None:
            return Refusal("unknown_receipt")
        user = bought.user
        if bought.refund is not None:
            event, taken, owed, _ = bought.refund
            return RefundResult(
                user=user,
                receipt=receipt,
                refunded=False,
                coins_taken=taken,
                debt_added=owed,
                coins=self.get(user, "coins"),
                debt=self.get(user, "debt"),
                event=event,
            )
        balance, debt = self.get(user, "coins"), self.get(user, "debt")
        taken = min(balance, bought.coins)
        owed = bought.coins - taken

        self.ledger.append(
            {
                "event": new_event,
                "kind": "refund",
                "ts": self.now,
                "user": user,
                "receipt": receipt,
                "purchase": bought.event,
                "coins": taken,
                "debt": owed,
            }
        )
        if taken > 0:
            self._add(user, "coins", -taken)
        if owed > 0:
            self._add(user, "debt", owed)
        bought.refund = (new_event, taken, owed, self.now)
        return RefundResult(
            user=user,
            receipt=receipt,
            refunded=True,
            coins_taken=taken,
            debt_added=owed,
            coins=balance - taken,
            debt=debt + owed,
            event=new_event,
        )

    def payout(
        self, *, creator: str, diamonds: object, key: str, new_event: str, new_payout: str
    ) -> PayoutResult | Refusal:
        if not _is_int(diamonds, 1, MAX_PAYOUT_DIAMONDS):
            return Refusal("bad_request")
        assert isinstance(diamonds, int)
        if not is_key(key):
            return Refusal("bad_request")
        if diamonds < self.economics.payout_min_diamonds:
            return Refusal("below_minimum")
        first = self.payouts.get(key)
        if first is not None:
            if first.creator != creator or first.diamonds != diamonds:
                return Refusal("key_reused")
            return PayoutResult(
                payout=first.payout,
                creator=creator,
                cents=first.cents,
                diamonds=first.left,
                event=first.event,
                replayed=True,
            )
        if self.get(creator, "diamonds") < diamonds:
            return Refusal("insufficient_diamonds")
        if self.get(creator, "diamonds") - self.on_hold(creator) < diamonds:
            return Refusal("payout_held")
        today = day_number(self.now)
        paid_today = self.stamped(creator, "payout_day", "payout_day_diamonds", today)
        if paid_today + diamonds > self.payout_cap:
            return Refusal("payout_cap")
        cents = self.economics.cents_for(diamonds)

        self.ledger.append(
            {
                "event": new_event,
                "kind": "payout",
                "ts": self.now,
                "creator": creator,
                "key": key,
                "payout": new_payout,
                "diamonds": diamonds,
                "cents": cents,
            }
        )
        left = self._add(creator, "diamonds", -diamonds)
        self.wallets[creator] |= {"payout_day": today, "payout_day_diamonds": paid_today + diamonds}
        self.drop_due_holds(creator)
        self.payouts[key] = PayoutRecord(
            creator, diamonds, new_event, new_payout, cents, left, self.now
        )
        return PayoutResult(new_payout, creator, cents, left, new_event, replayed=False)

    def set_limits(self, user: str, limits: Mapping[str, object]) -> WalletView | Refusal:
        """Not a movement: no ledger entry. A limit not named stays; None clears it, which
        deletes the field (and an empty hash)."""
        highest = {"daily_limit": MAX_DAILY_LIMIT, "weekly_limit": MAX_WEEKLY_LIMIT}
        for name, limit in limits.items():
            if limit is not None and not _is_int(limit, 0, highest[name]):
                return Refusal("bad_request")
        for name, limit in limits.items():
            if limit is None:
                fields = self.wallets.get(user)
                if fields is not None:
                    fields.pop(name, None)
                    if not fields:
                        del self.wallets[user]
            else:
                assert isinstance(limit, int)
                self.wallets.setdefault(user, {})[name] = limit
        return self.view(user)

    # ---- the keyspace as Redis should hold it ---------------------------------------------

    def expected_keys(self) -> Expected:
        """Every key but the ledger, with its fields as Redis stores them (text)."""
        out: Expected = {}
        for user, fields in self.wallets.items():
            out[keys.SINGLE.wallet(user)] = ("hash", {k: str(v) for k, v in fields.items()}, None)
        for (sender, key), g in self.gift_records.items():
            out[keys.SINGLE.gift_key(sender, key)] = (
                "hash",
                _text(
                    {
                        "room": g.room,
                        "gift": g.gift,
                        "count": g.count,
                        "event": g.event,
                        "coins": g.coins,
                        "combo": g.combo,
                        "diamonds": g.diamonds,
                        "ts": g.ts,
                    }
                ),
                keys.GIFT_KEY_TTL_MS,
            )
        for creator, buckets in self.held.items():
            out[keys.SINGLE.held(creator)] = (
                "hash",
                {str(d): str(v) for d, v in buckets.items()},
                None,
            )
        for (sender, room), s in self.combos.items():
            out[keys.SINGLE.combo(sender, room)] = (
                "hash",
                _text({"gift": s.gift, "combo": s.combo, "at": s.at}),
                keys.COMBO_TTL_MS,
            )
        for receipt, r in self.receipts.items():
            record: dict[str, Any] = {
                "user": r.user,
                "package": r.package,
                "coins": r.coins,
                "credited": r.credited,
                "debt_repaid": r.debt_repaid,
                "price_cents": r.price_cents,
                "event": r.event,
                "ts": r.ts,
            }
            if r.refund is not None:
                event, taken, owed, ts = r.refund
                record |= {
                    "refund_event": event,
                    "refund_coins": taken,
                    "refund_debt": owed,
                    "refund_ts": ts,
                }
            out[keys.SINGLE.receipt(receipt)] = ("hash", _text(record), None)
        for key, p in self.payouts.items():
            out[keys.SINGLE.payout(key)] = (
                "hash",
                _text(
                    {
                        "creator": p.creator,
                        "diamonds": p.diamonds,
                        "event": p.event,
                        "payout": p.payout,
                        "cents": p.cents,
                        "left": p.left,
                        "ts": p.ts,
                    }
                ),
                None,
            )
        for board, scores in self.boards.items():  # ZRANGE order: by score, then member
            ranked = sorted(scores.items(), key=lambda item: (item[1], item[0].encode()))
            out[board] = ("zset", [(m, float(c)) for m, c in ranked], 1)
        for name, users in self.names.items():
            out[name] = ("hash", dict(users), 1)
        return out


def _text(record: Mapping[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in record.items()}


# ---- an independent replay of the ledger ------------------------------------------------


class LedgerBreach(AssertionError):
    """The ledger breaks a money rule; the message names the entry."""


def replay(entries: Iterable[Mapping[str, Any]]) -> dict[str, tuple[int, int, int]]:
    """(coins, diamonds, debt) of every user the ledger touches, recomputed from empty.

    Written apart from giftstream.server.ledger.audit on purpose (a second opinion, not a
    copy): every amount must be a non-negative int, each event/receipt/refund/payout key at
    most once, a gift's coins split exactly into diamonds and platform share, a refund's
    parts add up to its purchase, no balance is negative after any entry, and no payout takes
    diamonds still on hold at its ts (a gift's diamonds are on hold until its `payable_at`)."""
    coins: dict[str, int] = {}
    diamonds: dict[str, int] = {}
    debt: dict[str, int] = {}
    events: set[str] = set()
    purchases: dict[str, Mapping[str, Any]] = {}
    refunded: set[str] = set()
    paid_keys: set[str] = set()
    holds: dict[str, list[tuple[int, int]]] = {}  # creator -> (payable_at, diamonds)

    def amount(entry: Mapping[str, Any], name: str) -> int:
        value = entry.get(name)
        if type(value) is not int or value < 0:
            raise LedgerBreach(f"{entry.get('event')}: {name} is {value!r}, not an int >= 0")
        return value

    for entry in entries:
        event, kind = entry.get("event"), entry.get("kind")
        if not isinstance(event, str) or event in events:
            raise LedgerBreach(f"event id {event!r} missing or seen twice")
        events.add(event)
        amount(entry, "ts")
        if kind == "gift":
            sender, creator = entry["sender"], entry["creator"]
            spent, credit = amount(entry, "coins"), amount(entry, "diamonds")
            if spent != credit + amount(entry, "platform") or spent < 1:
                raise LedgerBreach(f"{event}: gift coins {spent} do not split into its shares")
            coins[sender] = coins.get(sender, 0) - spent
            diamonds[creator] = diamonds.get(creator, 0) + credit
            holds.setdefault(creator, []).append((amount(entry, "payable_at"), credit))
            touched = {sender, creator}
        elif kind == "purchase":
            user, receipt = entry["user"], entry["receipt"]
            if receipt in purchases:
                raise LedgerBreach(f"{event}: receipt {receipt} credited twice")
            purchases[receipt] = entry
            got, repaid = amount(entry, "credited"), amount(entry, "debt_repaid")
            if got + repaid != amount(entry, "coins"):
                raise LedgerBreach(f"{event}: credited + debt_repaid != package coins")
            coins[user] = coins.get(user, 0) + got
            debt[user] = debt.get(user, 0) - repaid
            touched = {user}
        elif kind == "refund":
            user, receipt = entry["user"], entry["receipt"]
            bought = purchases.get(receipt)
            if bought is None or bought["user"] != user or bought["event"] != entry["purchase"]:
                raise LedgerBreach(f"{event}: refund of {receipt} matches no purchase of {user}")
            if receipt in refunded:
                raise LedgerBreach(f"{event}: receipt {receipt} refunded twice")
            refunded.add(receipt)
            taken, owed = amount(entry, "coins"), amount(entry, "debt")
            if taken + owed != bought["coins"]:
                raise LedgerBreach(f"{event}: refund {taken} + {owed} != {bought['coins']}")
            coins[user] = coins.get(user, 0) - taken
            debt[user] = debt.get(user, 0) + owed
            touched = {user}
        elif kind == "payout":
            creator, key = entry["creator"], entry["key"]
            if key in paid_keys:
                raise LedgerBreach(f"{event}: payout key {key} paid twice")
            paid_keys.add(key)
            amount(entry, "cents")
            ts, paid = amount(entry, "ts"), amount(entry, "diamonds")
            on_hold = sum(d for at, d in holds.get(creator, []) if at > ts)
            if paid > diamonds.get(creator, 0) - on_hold:
                raise LedgerBreach(f"{event}: pays {paid} diamonds, {on_hold} of them on hold")
            diamonds[creator] = diamonds.get(creator, 0) - paid
            touched = {creator}
        else:
            raise LedgerBreach(f"{event}: unknown kind {kind!r}")
        for user in touched:
            for name, book in (("coins", coins), ("diamonds", diamonds), ("debt", debt)):
                if book.get(user, 0) < 0:
                    raise LedgerBreach(f"{event}: {user}'s {name} {book[user]} < 0")
    users = coins.keys() | diamonds.keys() | debt.keys()
    return {u: (coins.get(u, 0), diamonds.get(u, 0), debt.get(u, 0)) for u in users}
