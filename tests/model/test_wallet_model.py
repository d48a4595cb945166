"""Model-based test of the money path: a Hypothesis state machine drives the REAL Wallet on the
real test Redis with random purchases, gifts, refunds, daily and weekly limits, payouts (on
hold, capped a day) and a moving clock (the Wallet's test clock, standing in for Redis's), and
after every step checks the whole keyspace against tests/model/wallet_model.py, that no balance
is negative, and that replaying the ledger from empty (server.ledger.audit and an independent
replay) gives the same wallets. Pools of users, rooms, receipts and keys are tiny on purpose, so
replays, reused keys, debts and limits come up in nearly every run.

GIFTSTREAM_HYPOTHESIS_EXAMPLES=N runs N examples instead of the quick default.
"""

from __future__ import annotations

import json
import os
from collections.abc import Coroutine
from typing import Any, NamedTuple

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from giftstream.protocol.rules import MAX_COUNT
from giftstream.server.ledger.audit import audit
from giftstream.server.money import keys
from giftstream.server.money.catalog import Economics, Gift, Package
from giftstream.server.money.refusal import Reason
from giftstream.server.money.refusal import Refusal as MoneyRefusal
from giftstream.server.money.wallet import MAX_PAYOUT_DIAMONDS, UNCHANGED, Unchanged
from tests.model.keyspace import LoopRedis, Snapshot
from tests.model.wallet_model import Refusal, WalletModel, replay
from tests.server.conftest import NOW_MS

# Odd economics so rounding shows (70.01 % to the creator, 0.7 cents a diamond), and a payout
# minimum a few gifts can reach.
ECONOMICS = Economics(creator_share_bp=7001, cents_per_100_diamonds=70, payout_min_diamonds=20)
MIN_PAYOUT = ECONOMICS.payout_min_diamonds
HOLD_DAYS = 1  # short, so the clock's day jumps end holds
PAYOUT_CAP = 45  # two payouts a day reach it (the minimum is 20)
SENDERS = ("ann", "bob", "cara")  # cara is also a creator: her coins and diamonds mix
ROOMS = ("cara", "dan")  # a room's id is its creator's
USERS = ("ann", "bob", "cara", "dan")
GIFTS = {
    g.id: g
    for g in (
        Gift("rose", "Rose", 1, "rose.webp"),
        Gift("heart", "Heart", 5, "heart.webp"),
        Gift("doughnut", "Doughnut", 30, "doughnut.webp"),
        Gift("castle", "Castle", 400, "castle.webp"),
    )
}
PACKAGES = {
    p.id: p
    for p in (
        Package("coins_10", 10, 99, "USD"),
        Package("coins_70", 70, 499, "USD"),
        Package("coins_700", 700, 4999, "USD"),
        Package("coins_2500", 2500, 1999, "USD"),
    )
}
# Small pools so keys and receipts collide; a malformed key now and then (repeats weight).
GIFT_KEYS = ("gift-key-1", "gift-key-2", "gift-key-3", "gift-key-1", "gift-key-2", "bad key!")
RECEIPTS = ("rc-1", "rc-2", "rc-3", "rc-4", "rc-5", "rc-6")
PAYOUT_KEYS = ("payout-key-1", "payout-key-2", "payout-key-3", "payout-key-1", "short")

DAY_MS = 86_400_000
MIDNIGHT = (NOW_MS // DAY_MS + 1) * DAY_MS
STARTS = (NOW_MS, MIDNIGHT - 3_000, MIDNIGHT - 61_000, MIDNIGHT - 3_600_000)
HORIZON_MS = 23 * 3_600_000  # see wallet_model.py: Redis's TTL clock does not move with ours
STEPS_MS = (0, 1, 999, 4_999, 5_000, 5_001, 60_000, 3_600_000, 6 * 3_600_000)
JUMP_DAYS = (1, 1, 2, 3, 6)  # into the next day, past a hold, across an ISO week


class GiftAction(NamedTuple):
    sender: str
    room: str
    gift: str
    count: int  # type: ignore[assignment]  # the field shadows tuple.count, on purpose
    key: str
    adult: bool


class BuyAction(NamedTuple):
    receipt: str
    user: str
    package: str
    adult: bool


class LimitAction(NamedTuple):
    user: str
    daily_limit: int | Unchanged | None
    weekly_limit: int | Unchanged | None


class PayAction(NamedTuple):
    creator: str
    diamonds: int
    key: str


# Each rule takes one argument: Hypothesis favours rules with fewer arguments, and this keeps
# the money-moving rules as likely as the cheap ones.
users = st.sampled_from(USERS)
adults = st.sampled_from((True, True, True, False))
gift_actions = st.builds(
    GiftAction,
    sender=st.sampled_from(SENDERS),
    room=st.sampled_from(ROOMS),
    gift=st.sampled_from(sorted(GIFTS)),
    count=st.sampled_from((1, 1, 1, 2, 2, 3, 99, 0, 100)),
    key=st.sampled_from(GIFT_KEYS),
    adult=adults,
)
buy_actions = st.builds(
    BuyAction,
    receipt=st.sampled_from(RECEIPTS),
    user=users,
    package=st.sampled_from(sorted(PACKAGES)),
    adult=adults,
)
limits = st.one_of(st.none(), st.sampled_from((0, 1, 5, 30, 400)), st.integers(0, 2_000))
limit_actions = st.builds(
    LimitAction,
    user=users,
    daily_limit=st.one_of(limits, st.just(UNCHANGED)),
    weekly_limit=st.one_of(limits, st.just(UNCHANGED), st.integers(0, 5_000)),
)
pay_actions = st.builds(
    PayAction,
    creator=users,
    diamonds=st.one_of(
        st.integers(20, 300),
        st.integers(1, 300),
        st.sampled_from((0, 19, 20, MAX_PAYOUT_DIAMONDS + 1)),
    ),
    key=st.sampled_from(PAYOUT_KEYS),
)

EXAMPLES = int(os.environ.get("GIFTSTREAM_HYPOTHESIS_EXAMPLES", "200"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def refusal_of(error: Exception) -> Refusal:
    """What a refused real call says, in the model's terms."""
    if isinstance(error, MoneyRefusal):
        # the WebSocket reads debt as insufficient_coins: only its message tells it apart
        assert error.reason is not Reason.DEBT or error.message.startswith("you owe"), error
        return Refusal(error.code)
    return Refusal("value_error")


class WalletMachine(RuleBasedStateMachine):
    """The real Wallet and the model side by side; every rule does the same thing to both."""

    def __init__(self, redis_url: str) -> None:
        super().__init__()
        self.model = WalletModel(ECONOMICS, now=NOW_MS, hold_days=HOLD_DAYS, payout_cap=PAYOUT_CAP)
        self.io = LoopRedis(  # flushes Redis: each example starts empty
            redis_url,
            ECONOMICS,
            clock=lambda: self.model.now,  # the real scripts take the model's time
            payout_hold_days=HOLD_DAYS,
            payout_daily_cap=PAYOUT_CAP,
        )
        self.start = NOW_MS
        self.fresh = 0  # numbers receipts and keys that must not collide
        self._seen: Snapshot | None = None

    def teardown(self) -> None:
        self.io.close()

    def call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run a real call; a refusal comes back as the model's Refusal, anything else raises."""
        self._seen = None
        try:
            return self.io.run(coro)
        except (MoneyRefusal, ValueError) as error:
            return refusal_of(error)

    def observed(self) -> Snapshot:
        """The keyspace after this step, read once however many invariants look at it."""
        if self._seen is None:
            self._seen = self.io.snapshot()
        return self._seen

    # ---- the clock ---------------------------------------------------------------------

    @initialize(start=st.sampled_from(STARTS))
    def start_clock(self, start: int) -> None:
        self.start = self.model.now = start

    @rule(step=st.sampled_from(STEPS_MS))
    def advance_clock(self, step: int) -> None:
        self.model.now = min(self.model.now + step, self.start + HORIZON_MS)

    @rule(days=st.sampled_from(JUMP_DAYS))
    def jump_days(self, days: int) -> None:
        """Whole days on: a new UTC day (and ISO week, now and then), holds that end."""
        self.model.now += days * DAY_MS
        self.start += days * DAY_MS

    # ---- gifts -------------------------------------------------------------------------

    def gift(self, sender: str, room: str, gift: Gift, count: int, key: str, adult: bool) -> None:
        real = self.call(
            self.io.wallet.send_gift(
                sender=sender,
                adult=adult,
                creator=room,
                room=room,
                gift=gift,
                count=count,
                key=key,
            )
        )
        expected = self.model.send_gift(
            sender=sender,
            adult=adult,
            creator=room,
            room=room,
            gift=gift,
            count=count,
            key=key,
            new_event=getattr(real, "event", "?"),
        )
        assert real == expected

    @rule(action=gift_actions)
    def send_gift(self, action: GiftAction) -> None:
        sender, room, gift, count, key, adult = action
        self.gift(sender, room, GIFTS[gift], count, key, adult)

    @rule(action=st.tuples(st.sampled_from(SENDERS), st.sampled_from(ROOMS)))
    def big_spender(self, action: tuple[str, str]) -> None:
        """The priciest gift the sender can afford, as many as fit (at most 99), new key: drains
        balances so refunds run into debt, limits bite and creators reach payouts."""
        sender, room = action
        balance = self.model.get(sender, "coins")
        gift = max((g for g in GIFTS.values() if g.coins <= max(balance, 1)), key=lambda g: g.coins)
        count = min(MAX_COUNT, max(balance // gift.coins, 1))
        self.fresh += 1
        self.gift(sender, room, gift, count, f"big-key-{self.fresh}", True)

    def streaks(self) -> list[tuple[str, str]]:
        """(sender, room) of each combo whose gift the sender can pay for once more."""
        return sorted(
            (sender, room)
            for (sender, room), streak in self.model.combos.items()
            if self.model.get(sender, "coins") >= GIFTS[streak.gift].coins
        )

    @precondition(lambda self: self.streaks())
    @rule(data=st.data())
    def continue_a_streak(self, data: st.DataObject) -> None:
        """The same gift again in the same room with a new key: the combo grows while the
        clock moved less than 5 s, and restarts otherwise (or is refused: debt, limit)."""
        sender, room = data.draw(st.sampled_from(self.streaks()))
        gift = self.model.combos[(sender, room)].gift
        self.fresh += 1
        self.gift(sender, room, GIFTS[gift], 1, f"streak-key-{self.fresh}", True)

    @precondition(lambda self: self.model.gift_records)
    @rule(data=st.data())
    def resend_a_settled_key(self, data: st.DataObject) -> None:
        """A retry (same params: the first result, even broke, minor or over the limit) or
        the same key for another room, gift or count (key_reused)."""
        sender, key = data.draw(st.sampled_from(sorted(self.model.gift_records)))
        change = data.draw(st.sampled_from(("none", "none", "room", "gift", "count")))
        adult = data.draw(adults)
        first = self.model.gift_records[(sender, key)]
        room, gift, count = first.room, first.gift, first.count
        if change == "room":
            room = data.draw(st.sampled_from([r for r in ROOMS if r != room]))
        elif change == "gift":
            gift = data.draw(st.sampled_from([g for g in sorted(GIFTS) if g != gift]))
        elif change == "count":
            count = data.draw(st.integers(1, 99).filter(lambda c: c != first.count))
        self.gift(sender, room, GIFTS[gift], count, key, adult)

    # ---- purchases and refunds ------------------------------------------------------------

    def buy(self, receipt: str, user: str, package: Package, adult: bool) -> None:
        real = self.call(
            self.io.wallet.purchase(receipt=receipt, user=user, package=package, adult=adult)
        )
        expected = self.model.purchase(
            receipt=receipt,
            user=user,
            package=package,
            adult=adult,
            new_event=getattr(real, "event", "?"),
        )
        assert real == expected

    @rule(action=buy_actions)
    def purchase(self, action: BuyAction) -> None:
        receipt, user, package, adult = action
        self.buy(receipt, user, PACKAGES[package], adult)

    @precondition(lambda self: self.model.receipts)
    @rule(data=st.data())
    def resend_a_receipt(self, data: st.DataObject) -> None:
        """A replayed purchase (nothing moves, even for a minor) or the receipt of another
        user or package (receipt_reused)."""
        receipt = data.draw(st.sampled_from(sorted(self.model.receipts)))
        change = data.draw(st.sampled_from(("none", "user", "package")))
        adult = data.draw(adults)
        first = self.model.receipts[receipt]
        user, package = first.user, first.package
        if change == "user":
            user = data.draw(st.sampled_from([u for u in USERS if u != user]))
        elif change == "package":
            package = data.draw(st.sampled_from([p for p in sorted(PACKAGES) if p != package]))
        self.buy(receipt, user, PACKAGES[package], adult)

    @rule(action=st.tuples(users, st.sampled_from(sorted(PACKAGES))))
    def top_up(self, action: tuple[str, str]) -> None:
        """A purchase with a receipt never seen: keeps coins flowing so gifts can settle."""
        user, package = action
        self.fresh += 1
        self.buy(f"rc-top-up-{self.fresh}", user, PACKAGES[package], True)

    @precondition(lambda self: any(self.model.get(u, "debt") for u in USERS))
    @rule(data=st.data())
    def pay_off_debt(self, data: st.DataObject) -> None:
        """A user in debt buys coins: the debt is paid down first, the rest credited."""
        user = data.draw(st.sampled_from([u for u in USERS if self.model.get(u, "debt")]))
        package = data.draw(st.sampled_from(sorted(PACKAGES)))
        self.fresh += 1
        self.buy(f"rc-debt-{self.fresh}", user, PACKAGES[package], True)

    @rule(data=st.data())
    def refund(self, data: st.DataObject) -> None:
        """A receipt bought (maybe refunded already: a replay) or one never bought."""
        bought = sorted(self.model.receipts)
        receipt = data.draw(st.sampled_from([*bought, *bought, "rc-never-bought"]))
        real = self.call(self.io.wallet.refund(receipt=receipt))
        expected = self.model.refund(receipt=receipt, new_event=getattr(real, "event", "?"))
        assert real == expected

    # ---- limits and wallets ----------------------------------------------------------------

    @rule(action=limit_actions)
    def set_limits(self, action: LimitAction) -> None:
        """Either limit, both or none of them; a limit not named stays as it was."""
        user, daily, weekly = action
        named = {
            name: limit
            for name, limit in (("daily_limit", daily), ("weekly_limit", weekly))
            if limit is not UNCHANGED
        }
        real = self.call(self.io.wallet.set_limits(user, **named))
        assert real == self.model.set_limits(user, named)

    @rule(user=users)
    def read_wallet(self, user: str) -> None:
        real = self.call(self.io.wallet.wallet(user))
        assert real == self.model.view(user)
        coins, diamonds = self.call(self.io.wallet.balance(user))
        assert (coins, diamonds) == (real.coins, real.diamonds)

    # ---- payouts -----------------------------------------------------------------------

    def pay(self, creator: str, diamonds: int, key: str) -> None:
        real = self.call(self.io.wallet.payout(creator=creator, diamonds=diamonds, key=key))
        expected = self.model.payout(
            creator=creator,
            diamonds=diamonds,
            key=key,
            new_event=getattr(real, "event", "?"),
            new_payout=getattr(real, "payout", "?"),
        )
        assert real == expected

    @rule(action=pay_actions)
    def payout(self, action: PayAction) -> None:
        self.pay(*action)

    @precondition(lambda self: any(self.model.get(c, "diamonds") >= MIN_PAYOUT for c in ROOMS))
    @rule(data=st.data())
    def payout_at_the_edge(self, data: st.DataObject) -> None:
        """Exactly what the creator has, or what is payable now (past its hold), or what the
        day's cap still allows, one diamond more, or half (maybe below minimum)."""
        rich = [c for c in ROOMS if self.model.get(c, "diamonds") >= MIN_PAYOUT]
        creator = data.draw(st.sampled_from(rich))
        edge = data.draw(st.sampled_from(("all", "one_more", "half", "payable", "cap_left")))
        extra = data.draw(st.sampled_from((0, 0, 1)))
        key = data.draw(st.sampled_from(PAYOUT_KEYS[:3]))
        view = self.model.view(creator)
        diamonds = {
            "all": view.diamonds,
            "one_more": view.diamonds + 1,
            "half": view.diamonds // 2,
            "payable": view.diamonds_payable + extra,
            "cap_left": min(view.diamonds_payable, view.payout_left_today) + extra,
        }[edge]
        self.pay(creator, diamonds, key)

    def payable(self) -> list[str]:
        """Creators with a payout's minimum past its hold and within today's cap."""
        return [
            c
            for c in ROOMS
            if min(self.model.view(c).diamonds_payable, self.model.view(c).payout_left_today)
            >= MIN_PAYOUT
        ]

    @precondition(lambda self: self.payable())
    @rule(data=st.data())
    def payout_what_is_payable(self, data: st.DataObject) -> None:
        """All that the hold and the day's cap allow now, or one diamond more (refused: held,
        or capped), with a new key: so payouts settle and the cap comes up."""
        creator = data.draw(st.sampled_from(self.payable()))
        view = self.model.view(creator)
        diamonds = min(view.diamonds_payable, view.payout_left_today)
        diamonds += data.draw(st.sampled_from((0, 0, 1)))
        self.fresh += 1
        self.pay(creator, diamonds, f"payout-key-new-{self.fresh}")

    @precondition(lambda self: self.model.payouts)
    @rule(data=st.data())
    def resend_a_payout_key(self, data: st.DataObject) -> None:
        """A retried payout (the first result) or its key for another creator or amount."""
        key = data.draw(st.sampled_from(sorted(self.model.payouts)))
        change = data.draw(st.sampled_from(("none", "creator", "diamonds")))
        first = self.model.payouts[key]
        creator, diamonds = first.creator, first.diamonds
        if change == "creator":
            creator = data.draw(st.sampled_from([u for u in USERS if u != creator]))
        elif change == "diamonds":
            diamonds = data.draw(st.integers(20, 400).filter(lambda d: d != first.diamonds))
        self.pay(creator, diamonds, key)

    # ---- after every step --------------------------------------------------------------

    @invariant()
    def redis_holds_what_the_model_holds(self) -> None:
        """Wallets, gift key records, spend counters, combos, receipts and payout records:
        same keys, types, values, and a TTL exactly where one belongs."""
        seen = {k: v for k, v in self.observed().items() if k != keys.LEDGER}
        expected = self.model.expected_keys()
        assert sorted(seen) == sorted(expected)
        for name, (kind, value, ttl) in expected.items():
            assert seen[name] == (kind, value, ttl is not None), name

    @invariant()
    def no_balance_is_negative(self) -> None:
        for name, (kind, value, _) in self.observed().items():
            if name.startswith(keys.WALLET_PREFIX):
                assert kind == "hash"
                for field in ("coins", "diamonds", "debt"):
                    assert int(value.get(field, 0)) >= 0, (name, value)

    @invariant()
    def the_ledger_replays_to_the_wallets(self) -> None:
        """The ledger is exactly the model's entries, and replaying it from empty (our own
        replay and server.ledger.audit) reproduces every wallet in Redis."""
        state = self.observed()
        kind, (raw, length), _ = state.get(keys.LEDGER, ("stream", ([], 0), False))
        assert kind == "stream"
        entries = [json.loads(fields["data"]) for _, fields in raw]
        assert length == len(entries) == len(self.model.ledger)
        assert entries == self.model.ledger
        held = {
            keys.SINGLE.user_of_wallet(name): tuple(
                int(value.get(f, 0)) for f in ("coins", "diamonds", "debt")
            )
            for name, (_, value, _) in state.items()
            if name.startswith(keys.WALLET_PREFIX)
        }
        replayed = replay(entries)
        for user in held.keys() | replayed.keys():
            assert held.get(user, (0, 0, 0)) == replayed.get(user, (0, 0, 0)), user
        report = self.io.run(audit(self.io.redis, now_ms=self.model.now))
        assert report.breaches == []
        assert report.entries == len(entries)


def test_the_real_wallet_follows_the_model(redis_url: str) -> None:
    # any factory of a machine works; hypothesis types the argument as the class itself
    run_state_machine_as_test(lambda: WalletMachine(redis_url), settings=SETTINGS)  # type: ignore[arg-type]


def test_the_invariants_catch_a_wallet_changed_behind_the_scripts_back(redis_url: str) -> None:
    """The machine can fail: a coin added without a script breaks the keyspace invariant, and
    a ledger entry without its balance change breaks the replay."""
    machine = WalletMachine(redis_url)
    try:
        machine.start_clock(NOW_MS)
        machine.purchase(BuyAction("rc-1", "ann", "coins_70", True))
        machine.send_gift(GiftAction("ann", "cara", "heart", 2, "gift-key-1", True))
        machine.redis_holds_what_the_model_holds()
        machine.the_ledger_replays_to_the_wallets()

        machine.io.run(machine.io.redis.hincrby(keys.SINGLE.wallet("ann"), "coins", 1))
        machine._seen = None
        with pytest.raises(AssertionError):
            machine.redis_holds_what_the_model_holds()
        machine.model.wallets["ann"]["coins"] += 1  # the model agrees now; the ledger does not
        machine.redis_holds_what_the_model_holds()
        with pytest.raises(AssertionError):
            machine.the_ledger_replays_to_the_wallets()
    finally:
        machine.teardown()
