"""The parts of the bank workload that a Redis Cluster run adds (test_cluster_bank.py): senders
spread over two gateways (and moved between them on reconnect), purchases and payouts through
the admin API re-sent as-is while a shard fails over, and the ledger read back by receipt,
payout key and creator."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from giftstream.server.ledger.connect import open_ledger_redis
from giftstream.server.ledger.entries import LedgerEntry
from giftstream.server.ledger.relay.lag import relay_lag
from giftstream.server.money import keys
from tests.helpers import AdminClient

PAYOUT_DIAMONDS = 100  # each payout asks this many (the test's catalog's minimum)
FINAL_ADMIN_REFUSALS = frozenset({"insufficient_diamonds", "payout_cap"})


class Gateways:
    """Where one sender (re)connects: its own gateway, and now and then the other one (a load
    balancer moving it), so a key re-sent after a drop may reach either gateway."""

    def __init__(self, urls: Sequence[str], first: int, rng: random.Random, move: float) -> None:
        self.urls = list(urls)
        self.current = first % len(self.urls)
        self.rng = rng
        self.move = move

    def __call__(self) -> str:
        if self.rng.random() < self.move:
            self.current = (self.current + 1) % len(self.urls)
        return self.urls[self.current]


@dataclass
class MoneyRecord:
    """What the admin API answered: receipts and payout keys acknowledged, and how."""

    purchases: set[str] = field(default_factory=set)  # receipts answered 200
    payouts: dict[str, str] = field(default_factory=dict)  # payout key -> payout id
    refusals: Counter[str] = field(default_factory=Counter)
    replays: int = 0
    retries: int = 0
    unexpected: list[str] = field(default_factory=list)


class AdminOps:
    """Purchases and payouts over the gateways' admin APIs, each request re-sent unchanged
    (the same receipt or key) after a 5xx or a broken connection, as a payments backend does."""

    def __init__(
        self, admins: Sequence[AdminClient], rng: random.Random, record: MoneyRecord
    ) -> None:
        self.admins = list(admins)
        self.rng = rng
        self.record = record

    async def _post(self, path: str, body: dict[str, Any], deadline: float) -> tuple[int, Any]:
        """Until a final (non-5xx) answer, through any gateway; (0, None) when time ran out."""
        loop = asyncio.get_running_loop()
        while loop.time() < deadline:
            admin = self.rng.choice(self.admins)
            try:
                status, answer = await asyncio.wait_for(admin.call("POST", path, body), 15)
            except (aiohttp.ClientError, OSError, TimeoutError):
                status, answer = 599, None
            if status < 500:
                return status, answer
            self.record.retries += 1
            await asyncio.sleep(0.1 + self.rng.random() * 0.2)
        return 0, None

    def _refused(self, what: str, status: int, answer: Any) -> None:
        code = answer.get("error", "") if isinstance(answer, dict) else ""
        self.record.refusals[code or str(status)] += 1
        if status != 409 or code not in FINAL_ADMIN_REFUSALS:
            self.record.unexpected.append(f"{what}: {status} {answer}")

    async def buy(self, user: str, package: str, receipt: str, deadline: float) -> None:
        body = {"receipt": receipt, "user": user, "package": package}
        status, answer = await self._post("/v1/purchases", body, deadline)
        if status != 200:
            self._refused(f"purchase {receipt}", status, answer)
            return
        if answer["credited"] and receipt in self.record.purchases:
            self.record.unexpected.append(f"purchase {receipt} credited twice: {answer}")
        self.record.purchases.add(receipt)

    async def payout(self, creator: str, key: str, deadline: float) -> None:
        body = {"creator": creator, "diamonds": PAYOUT_DIAMONDS, "key": key}
        status, answer = await self._post("/v1/payouts", body, deadline)
        if status != 200:
            self._refused(f"payout {key}", status, answer)
            return
        first = self.record.payouts.setdefault(key, str(answer["payout"]))
        if first != answer["payout"]:
            self.record.unexpected.append(f"payout {key} was {first}, then {answer}")

    async def fund(self, users: Sequence[str], package: str, deadline: float) -> None:
        await asyncio.gather(*(self.buy(u, package, f"bank-{u}", deadline) for u in users))

    async def run(
        self,
        creators: Sequence[str],
        buyers: Sequence[str],
        stop: asyncio.Event,
        settle_by: float,
        max_rounds: int,
    ) -> None:
        """Until `stop`: a payout for a creator and a top-up for a buyer each round, and every
        third round the last receipt and key sent again (a replay: the first answer)."""
        for n in range(max_rounds):
            if stop.is_set():
                return
            key, receipt = f"payout-{n:04d}", f"topup-{n:04d}"
            creator, buyer = self.rng.choice(creators), self.rng.choice(buyers)
            await asyncio.gather(
                self.payout(creator, key, settle_by),
                self.buy(buyer, "coins_70", receipt, settle_by),
            )
            if n % 3 == 2:
                self.record.replays += 1
                await asyncio.gather(
                    self.payout(creator, key, settle_by),
                    self.buy(buyer, "coins_70", receipt, settle_by),
                )
            await asyncio.sleep(self.rng.uniform(0.1, 0.3))  # pacing, not waiting


def twice(ledger: Sequence[LedgerEntry], kind: str, field_name: str) -> list[str]:
    """Values of `field_name` that two `kind` entries of the ledger share (a receipt or payout
    key settled twice)."""
    seen = Counter(str(e.data[field_name]) for e in ledger if e.kind == kind)
    return [value for value, n in seen.items() if n > 1]


def creators_by_ledger(ledger: Sequence[LedgerEntry]) -> Counter[str]:
    """Each creator's diamonds as the ledger has them: gifts' credits less payouts."""
    diamonds: Counter[str] = Counter()
    for entry in ledger:
        if entry.kind == "gift":
            diamonds[entry.data["creator"]] += int(entry.data["diamonds"])
        elif entry.kind == "payout":
            diamonds[entry.data["creator"]] -= int(entry.data["diamonds"])
    return diamonds


async def wallet_diamonds(url: str, creators: Sequence[str]) -> dict[str, int]:
    client, space = await open_ledger_redis(url)
    try:
        return {
            c: int(keys.text(await client.hget(space.wallet(c), "diamonds") or b"0"))
            for c in creators
        }
    finally:
        await client.aclose()


async def gift_keys_kept(url: str, gifts: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Of (sender, key) pairs, those whose idempotency record is still in Redis."""
    client, space = await open_ledger_redis(url)
    try:
        return [g for g in gifts if await client.exists(space.gift_key(*g))]
    finally:
        await client.aclose()


async def relay_backlog(url: str) -> int:
    """Ledger entries not yet relayed, over every partition's ledger."""
    client, space = await open_ledger_redis(url)
    try:
        return sum([(await relay_lag(client, key)).entries for key in space.ledgers()])
    finally:
        await client.aclose()
