"""Model-based test of crediting (server/money/crediting.py) with a crash at every step: a
Hypothesis state machine settles gifts between partitions (send_gift.lua with an outbox) and
drives two Crediting runners step by step -- read the cursors, take a source (the take and
its WAIT), credit one (source, target) -- interleaving them and abandoning a runner's round
after any step (a crash). One runner keeps no outbox retention, so its takes trim.

After every step: each creator holds exactly the diamonds of the ledger gifts its cursors
cover (none twice, none the ledger lacks) and its room's log holds one gift event per such
gift, seq 1..k without a gap. At the end, after full rounds: every gift credited exactly once,
and the coins spent = the diamonds credited + the platform's share.

Runs on ONE plain Redis with KeySpace(cluster=True, partitions=4) to stay fast: the hash-
tagged names work on one Redis, and a take there waits for no replica (WAIT 0); the real
cluster's WAIT and failover are in tests/server/money/test_cluster_gifts.py.
GIFTSTREAM_HYPOTHESIS_EXAMPLES=N runs N examples instead of the quick default.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis.asyncio as aioredis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from giftstream.server.money import keys
from giftstream.server.money.catalog import Economics
from giftstream.server.money.crediting import Crediting, Cursors, Entry
from giftstream.server.money.keys import KeySpace
from giftstream.server.scripts import register
from tests.server.money.cluster_money import check_credited_once, ledger_gifts, user_in

T = TypeVar("T")
SPACE = KeySpace(cluster=True, partitions=4)
ECONOMICS = Economics(creator_share_bp=7001)  # 7 coins -> 4 diamonds: rounding shows
SENDERS = [user_in(SPACE, p, "ann") for p in range(4)]
CREATORS = [user_in(SPACE, p, "cara") for p in range(4)] + [user_in(SPACE, 3, "dan")]
FUNDS = 1_000_000
SETTINGS = settings(
    max_examples=int(os.environ.get("GIFTSTREAM_HYPOTHESIS_EXAMPLES", "60")),
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@dataclass
class Round:
    """What a runner holds mid-round: the cursors it read and what its takes found."""

    cursors: Cursors
    taken: dict[tuple[int, int], list[Entry]] = field(default_factory=dict)


class CreditingMachine(RuleBasedStateMachine):
    def __init__(self, url: str) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.redis: aioredis.Redis = self.run(_connect(url))
        self.run(self.redis.flushall())
        for sender in SENDERS:
            self.run(self.redis.hset(SPACE.wallet(sender), "coins", FUNDS))
        for creator in CREATORS:
            self.run(self.redis.hset(SPACE.room(creator), "live", "1"))
        self.send_gift = register(self.redis, "send_gift")
        self.runners = [
            Crediting(self.redis, SPACE, batch=2),
            Crediting(self.redis, SPACE, batch=3, retention_ms=0),  # trims what it passed
        ]
        self.rounds: list[Round | None] = [None, None]
        self.gifts = 0
        seconds, _ = self.run(self.redis.time())
        self.now_ms = int(seconds) * 1000  # the boards' day (a test run crossing midnight
        # would fail the day board's check: rare, and says so)

    def run(self, coro: Awaitable[T]) -> T:
        return self.loop.run_until_complete(coro)

    @rule(sender=st.sampled_from(SENDERS), creator=st.sampled_from(CREATORS))
    def gift(self, sender: str, creator: str) -> None:
        self.gifts += 1
        outbox = SPACE.credit_outbox(SPACE.partition(sender), SPACE.partition(creator))
        key = f"gift-key-{self.gifts}"
        reply = self.run(
            self.send_gift(
                keys=[
                    SPACE.wallet(sender),
                    outbox,
                    SPACE.gift_key(sender, key),
                    SPACE.combo(sender, creator),
                    SPACE.ledger_of(sender),
                    *[outbox] * 9,  # the creator's keys and boards: on its own shard
                ],
                args=[
                    f"ev{self.gifts}",
                    sender,
                    creator,
                    creator,
                    "rose",
                    key,
                    1,
                    7,
                    ECONOMICS.diamonds_for(7),
                    1,
                    "",
                    keys.GIFT_KEY_TTL_MS,
                    keys.COMBO_GAP_MS,
                    keys.COMBO_TTL_MS,
                    7,
                    json.dumps(creator),
                    json.dumps({"id": sender, "name": sender}),
                    '{"id":"rose","name":"Rose","coins":7,"animation":"rose.webp"}',
                    100,
                    json.dumps(sender.upper()),  # the sender's name, for the boards
                    1,  # sent in the room: counts on its session board
                ],
            )
        )
        assert reply[0] == b"ok"

    @rule(r=st.integers(0, 1))
    def read_cursors(self, r: int) -> None:
        """Step 1 (a new round: whatever the runner held is dropped, as after a crash)."""
        self.rounds[r] = Round(self.run(self.runners[r].read_cursors()))

    @rule(r=st.integers(0, 1), source=st.integers(0, SPACE.partitions - 1))
    def take(self, r: int, source: int) -> None:
        """Step 2: a take and its WAIT (none here)."""
        held = self.rounds[r]
        if held is None:
            return
        found = self.run(self.runners[r].take(source, held.cursors))
        assert found is not None  # one Redis: never held back
        for target, entries in found.items():
            held.taken[(source, target)] = entries

    @rule(r=st.integers(0, 1))
    def take_every_source(self, r: int) -> None:
        """Step 2 for every source, as a round does."""
        for source in range(SPACE.partitions):
            self.take(r, source)

    @rule(r=st.integers(0, 1), data=st.data())
    def credit(self, r: int, data: st.DataObject) -> None:
        """Step 3, for one (source, target) the runner took."""
        held = self.rounds[r]
        if held is None or not held.taken:
            return
        pair = data.draw(st.sampled_from(sorted(held.taken)))
        entries = held.taken.pop(pair)
        self.run(self.runners[r].credit(*pair, held.cursors.get(pair, ""), entries))

    @rule(r=st.integers(0, 1))
    def crash(self, r: int) -> None:
        """The runner dies wherever it was in its round."""
        self.rounds[r] = None

    @rule(r=st.integers(0, 1))
    def full_round(self, r: int) -> None:
        self.run(self.runners[r].round())

    @invariant()
    def credited_at_most_once(self) -> None:
        covered = self.run(check_credited_once(self.redis, SPACE, CREATORS, complete=False))
        for creator in CREATORS:
            log: Any = self.run(self.redis.xrange(SPACE.room_log(creator)))
            seqs = [int(json.loads(fields[b"d"])["seq"]) for _, fields in log]
            assert seqs == list(range(1, len(seqs) + 1)), (creator, seqs)
            assert len(seqs) * ECONOMICS.diamonds_for(7) == covered[creator], creator
            # the boards count each credited gift once, with its credit (7 coins each)
            session: Any = self.run(
                self.redis.zrange(SPACE.board_session(creator), 0, -1, withscores=True)
            )
            assert sum(score for _, score in session) == 7 * len(seqs), creator
            # and the room's coins this session (the ops feed's `coins`) with them
            total: Any = self.run(self.redis.hget(SPACE.room(creator), "session_coins"))
            assert int(total or 0) == 7 * len(seqs), creator
            p = SPACE.partition(creator)
            day: Any = self.run(
                self.redis.zscore(SPACE.board_creators_day(p, keys.epoch_day(self.now_ms)), creator)
            )
            assert (day or 0) == 7 * len(seqs), creator

    def teardown(self) -> None:
        try:
            for _ in range(100):  # batches of 2: enough rounds for every gift settled
                if self.run(self.runners[0].round()) == 0:
                    break
            covered = self.run(check_credited_once(self.redis, SPACE, CREATORS))
            gifts = self.run(ledger_gifts(self.redis, SPACE))
            assert len(gifts) == self.gifts
            coins = sum(g["coins"] for _, _, g in gifts)
            platform = sum(g["platform"] for _, _, g in gifts)
            assert coins == sum(covered.values()) + platform
            balances: list[Any] = [
                self.run(self.redis.hget(SPACE.wallet(s), "coins")) for s in SENDERS
            ]
            left = sum(int(b) for b in balances)
            assert FUNDS * len(SENDERS) - left == coins
        finally:
            self.run(self.redis.aclose())
            self.loop.close()


async def _connect(url: str) -> aioredis.Redis:
    return aioredis.Redis.from_url(url)


def test_crediting_survives_a_crash_at_every_step(redis_url: str) -> None:
    run_state_machine_as_test(lambda: CreditingMachine(redis_url), settings=SETTINGS)  # type: ignore[arg-type]
