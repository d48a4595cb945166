"""The bank workload (after Jepsen's bank test) over real WebSockets: many senders gift into
a few live rooms, connections drop at random and the same key is re-sent after reconnecting,
poor senders race several connections against too few coins. Every reply is recorded so the
test can hold the ledger to what the clients were told."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from giftstream.server.ledger.entries import LedgerEntry
from tests.helpers import AdminClient, TokenMaker, WsClient

RETRYABLE = frozenset({"internal", "overloaded", "rate_limited"})
FINAL_REFUSALS = frozenset({"insufficient_coins"})
GIFT_MIX = (("rose", 1), ("heart", 5), ("ice_cream", 10), ("doughnut", 30))
_CONNECT_ERRORS = (
    OSError,
    InvalidHandshake,
    InvalidStatus,
    ConnectionClosed,
    AssertionError,
    TimeoutError,
)


@dataclass
class BankRecord:
    """What the clients saw, for checking against the ledger afterwards."""

    acked: dict[tuple[str, str], str] = field(default_factory=dict)  # (sender, key) -> event
    tried: set[tuple[str, str]] = field(default_factory=set)
    refusals: Counter[str] = field(default_factory=Counter)
    conflicts: list[str] = field(default_factory=list)  # a key answered with two events
    unexpected: list[dict[str, Any]] = field(default_factory=list)
    resent_after_drop: int = 0
    drops: int = 0
    reconnects: int = 0
    retries: int = 0

    def ack(self, sender: str, key: str, event: str) -> None:
        first = self.acked.setdefault((sender, key), event)
        if first != event:
            self.conflicts.append(f"{sender}/{key}: {first} then {event}")


class Sender:
    """One user with `connections` sockets; each burst sends one gift on each at once."""

    def __init__(
        self,
        user: str,
        ws_url: Callable[[], str],
        tokens: TokenMaker,
        rooms: list[str],
        record: BankRecord,
        rng: random.Random,
        *,
        connections: int = 1,
        drop_chance: float = 0.03,
    ) -> None:
        self.user = user
        self.ws_url = ws_url
        self.token = tokens(user, ttl_s=3600)
        self.room = rng.choice(rooms)
        self.record = record
        self.rng = rng
        self.drop_chance = drop_chance
        self.clients: list[WsClient | None] = [None] * connections
        self.sent = 0

    async def _client(self, slot: int, deadline: float) -> WsClient:
        """The slot's connection, (re)connected and joined; retries while the server is down."""
        client = self.clients[slot]
        if client is not None and client.conn.close_code is None and not client._reader.done():
            return client
        loop = asyncio.get_running_loop()
        while True:
            try:
                client, _ = await WsClient.login(self.ws_url(), self.token)
                joined = await client.request({"type": "join", "room": self.room})
                if joined["type"] != "joined":
                    raise AssertionError(f"join refused: {joined}")
                self.clients[slot] = client
                self.record.reconnects += 1
                return client
            except _CONNECT_ERRORS:
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.2)

    async def _settle(self, slot: int, key: str, gift: str, count: int, deadline: float) -> None:
        """Send one gift until it has a final answer (or time runs out): a drop or a
        retryable error re-sends the same key."""
        message = {"type": "gift", "room": self.room, "gift": gift, "count": count, "key": key}
        self.record.tried.add((self.user, key))
        loop = asyncio.get_running_loop()
        resend = False
        while loop.time() < deadline:
            try:
                client = await self._client(slot, deadline)
                if resend:
                    self.record.resent_after_drop += 1
                if self.rng.random() < self.drop_chance:
                    await client.send(message)  # sent, then the line goes dead before the reply
                    client.conn.transport.abort()
                    self.record.drops += 1
                    self.clients[slot] = None
                    resend = True
                    continue
                reply = await client.request(message, timeout=10)
            except _CONNECT_ERRORS:
                self.clients[slot] = None
                resend = True
                await asyncio.sleep(0.1)
                continue
            if reply["type"] == "gift_ok":
                self.record.ack(self.user, key, reply["event"])
                return
            code = reply.get("code", "")
            if code in RETRYABLE:
                self.record.retries += 1
                await asyncio.sleep(0.1 + self.rng.random() * 0.2)
                continue
            self.record.refusals[code] += 1
            if code not in FINAL_REFUSALS:
                self.record.unexpected.append(reply)
            return

    async def run(
        self,
        stop_at: float,
        settle_by: float,
        max_bursts: int,
        stop: asyncio.Event | None = None,
    ) -> None:
        """Gift in bursts until `stop_at` (or `stop` is set, when the test decides the end by
        what happened, such as a failover); finish the keys in hand by `settle_by`."""
        loop = asyncio.get_running_loop()
        for _ in range(max_bursts):
            if loop.time() >= stop_at or (stop is not None and stop.is_set()):
                break
            sends = []
            for slot in range(len(self.clients)):
                gift, _ = self.rng.choice(GIFT_MIX)
                key = f"{self.user}-{self.sent:05d}"
                self.sent += 1
                sends.append(self._settle(slot, key, gift, self.rng.randint(1, 3), settle_by))
            await asyncio.gather(*sends)
            await asyncio.sleep(self.rng.uniform(0.05, 0.15))
        for client in self.clients:
            if client is not None:
                await client.close()


async def fund(admin: AdminClient, users: list[str], package: str) -> int:
    """Buy `package` for each user; the coins bought in all."""
    bodies = await asyncio.gather(*(admin.buy(u, package, receipt=f"bank-{u}") for u in users))
    return sum(body["coins"] for body in bodies)


async def open_rooms(ws_url: str, tokens: TokenMaker, creators: list[str]) -> list[WsClient]:
    clients = []
    for creator in creators:
        client, _ = await WsClient.login(ws_url, tokens(creator, "creator"))
        live = await client.request({"type": "go_live", "title": f"{creator}'s bank"})
        assert live["type"] == "live", live
        clients.append(client)
    return clients


@dataclass
class Verdict:
    """The ledger held against what clients saw; every list must be empty."""

    figures: dict[str, int]
    breaches: list[str]
    double_settled: list[tuple[str, str]]
    acked_not_in_ledger: list[tuple[str, str]]
    ledger: list[LedgerEntry] = field(default_factory=list)  # every entry of every ledger

    def assert_clean(self, record: BankRecord) -> None:
        assert not self.breaches, self.breaches[:10]
        assert not self.double_settled, self.double_settled[:10]
        assert not self.acked_not_in_ledger, self.acked_not_in_ledger[:10]
        assert not record.conflicts, record.conflicts[:10]
        assert not record.unexpected, record.unexpected[:10]


async def verify(redis_url: str, record: BankRecord, coins_bought: int | None) -> Verdict:
    """Audit the wallets against the ledger, and the ledger against the clients' acks. The URL
    is one Redis or any node of a Redis Cluster (then every partition's ledger is read).
    `coins_bought`: what the clients were told they bought; None to leave that to the caller
    (a failover may lose an acknowledged purchase, see test_cluster_bank)."""
    from giftstream.server.ledger.audit import audit
    from giftstream.server.ledger.connect import open_ledger_redis
    from giftstream.server.ledger.entries import read_entries

    client, space = await open_ledger_redis(redis_url)
    try:
        report = await audit(client, keyspace=space)
        ledger = [entry for key in space.ledgers() async for entry in read_entries(client, key)]
    finally:
        await client.aclose()
    gifts = [entry for entry in ledger if entry.kind == "gift"]
    settled = Counter((e.data["sender"], e.data["key"]) for e in gifts)
    events = {(e.data["sender"], e.data["key"]): e.event for e in gifts}
    breaches = list(report.breaches)
    if coins_bought is not None and report.coins_purchased != coins_bought:
        breaches.append(f"ledger: {report.coins_purchased} coins purchased; {coins_bought} bought")
    held_and_spent = report.coins_held + report.coins_spent + report.coins_refunded
    if report.coins_purchased - report.debt_repaid != held_and_spent:
        breaches.append(
            f"coins purchased {report.coins_purchased} != held {report.coins_held} + spent "
            f"{report.coins_spent} + refunded {report.coins_refunded}"
        )
    # On a cluster a gift's diamonds reach its creator later (crediting): not yet credited
    # ones are counted apart; one Redis has none.
    diamonds = report.diamonds_credited + report.diamonds_uncredited
    if report.coins_spent != diamonds + report.platform_share:
        breaches.append(
            f"coins spent {report.coins_spent} != diamonds {report.diamonds_credited} + "
            f"{report.diamonds_uncredited} not yet credited + platform {report.platform_share}"
        )
    bought = report.coins_purchased if coins_bought is None else coins_bought
    return Verdict(
        figures={
            "senders": len({sender for sender, _ in record.tried}),
            "gifts_tried": len(record.tried),
            "gifts_acked": len(record.acked),
            "gifts_in_ledger": len(gifts),
            "settled_unacknowledged": len(set(events) - set(record.acked)),
            "refused": sum(record.refusals.values()),
            "resent_after_drop": record.resent_after_drop,
            "drops": record.drops,
            "retries": record.retries,
            "coins_bought": bought,
            "coins_spent": report.coins_spent,
            "coins_held": report.coins_held,
            "diamonds_credited": report.diamonds_credited,
            "diamonds_uncredited": report.diamonds_uncredited,
            "diamonds_paid_out": report.diamonds_paid_out,
            "platform_share": report.platform_share,
            "coins_lost": bought - report.coins_held - report.coins_spent,
        },
        breaches=breaches,
        double_settled=[key for key, n in settled.items() if n > 1],
        acked_not_in_ledger=[k for k, e in record.acked.items() if events.get(k) != e],
        ledger=ledger,
    )
