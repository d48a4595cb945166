"""The end of every run: the money and delivery checks (DESIGN.md §2) held against what the
load test's clients were told.

- audit: `giftstream audit`'s replay of the ledger against every wallet (needs Redis; on a
  Redis Cluster every partition's ledger and every wallet on every master).
- wallets: for each load-test gifter, coins bought = coins held + coins spent on gifts that
  were acknowledged, read through the signed wallet API.
- ledger: every `gift_ok` a client saw is in the ledger under its sender and key with the
  same event id, and no gift of this run is in the ledger without an answer (needs Redis).
- answers: every gift sent has a final answer, and no key or room seq was answered twice
  differently.
- deliveries: every viewer that stayed connected (or rejoined with `since` and was told
  `recovered`) received every gift event of its room, in seq order, with no gap.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from giftstream.loadtest.api import Api, bounded
from giftstream.server.money.keys import KeySpace

if TYPE_CHECKING:
    from giftstream.server.ledger.audit import AuditReport
    from giftstream.server.redis_cluster import RedisClient

MAX_LISTED = 10  # breaches named per check; the count says how many in all


@dataclass(slots=True)
class Check:
    name: str
    status: str = "pass"  # pass | fail | skipped
    detail: str = ""
    breaches: list[str] = field(default_factory=list)
    count: int = 0  # breaches in all

    def breach(self, text: str) -> None:
        self.status = "fail"
        self.count += 1
        if len(self.breaches) < MAX_LISTED:
            self.breaches.append(text)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "detail": self.detail,
            "breaches": self.breaches,
            "breach_count": self.count,
        }


@dataclass(slots=True)
class Outcome:
    """What the workers reported at the end, merged."""

    acks: list[tuple[Any, ...]] = field(default_factory=list)
    unresolved: list[tuple[str, str, int]] = field(default_factory=list)
    clients: list[dict[str, Any]] = field(default_factory=list)
    room_seqs: dict[str, dict[int, str]] = field(default_factory=dict)
    conflicts: list[str] = field(default_factory=list)

    def add_room_seqs(self, rooms: dict[str, dict[int, str]]) -> None:
        for room, seqs in rooms.items():
            merged = self.room_seqs.setdefault(room, {})
            for seq, event in seqs.items():
                known = merged.setdefault(seq, event)
                if known != event and len(self.conflicts) < 20:
                    self.conflicts.append(f"room {room} seq {seq}: {known} and {event}")


def check_answers(outcome: Outcome) -> Check:
    check = Check("answers", detail=f"{len(outcome.acks)} gifts acknowledged")
    for user, key, cost in outcome.unresolved:
        check.breach(f"gift {key} of {user} ({cost} coins) never got a final answer")
    for conflict in outcome.conflicts:
        check.breach(conflict)
    by_key: dict[tuple[str, str], str] = {}
    for event, user, key, *_ in outcome.acks:
        first = by_key.setdefault((user, key), event)
        if first != event:
            check.breach(f"key {key} of {user} acknowledged as {first} and {event}")
    return check


async def check_wallets(
    api: Api, bought: dict[str, int], outcome: Outcome, creators: list[str]
) -> tuple[Check, dict[str, int]]:
    """coins bought = coins held + coins spent, for each gifter, through the wallet API."""
    spent: Counter[str] = Counter()
    for _event, user, _key, _room, _gift, _count, cost in outcome.acks:
        spent[user] += cost
    users = sorted(bought)
    wallets = await bounded(api.wallet, users)
    creator_wallets = await bounded(api.wallet, creators)
    held = {w["user"]: int(w["coins"]) for w in wallets}
    check = Check("wallets")
    for user in users:
        if held[user] != bought[user] - spent[user]:
            check.breach(
                f"wallet {user}: {held[user]} coins held, but {bought[user]} bought - "
                f"{spent[user]} spent = {bought[user] - spent[user]}"
            )
    for wallet in wallets:
        if int(wallet.get("debt") or 0):
            check.breach(f"wallet {wallet['user']}: debt {wallet['debt']}")
    totals = {
        "coins_bought": sum(bought.values()),
        "coins_held": sum(held.values()),
        "coins_spent": sum(spent.values()),
        "diamonds_credited_to_creators": sum(int(w["diamonds"]) for w in creator_wallets),
    }
    check.detail = (
        f"{len(users)} gifters: {totals['coins_bought']} coins bought = "
        f"{totals['coins_held']} held + {totals['coins_spent']} spent"
        + ("" if check.status == "pass" else " (does not add up)")
    )
    return check, totals


async def check_redis(
    redis_url: str | None,
    keyspace: KeySpace,
    ledger_from: dict[str, str] | None,
    outcome: Outcome,
    users: set[str],
    bought: dict[str, int],
) -> list[Check]:
    """The audit, and the ledger against the acknowledgements, when the server's Redis is
    known; otherwise both are reported as skipped. `keyspace` gives the ledger key; a Redis
    Cluster behind the URL is found, with its partitions. `ledger_from`: each ledger's last
    id before the run (runner._ledger_position)."""
    if redis_url is None:
        reason = "skipped: no --redis-url (the server's Redis) given"
        return [Check("audit", "skipped", reason), Check("ledger", "skipped", reason)]
    from redis.exceptions import RedisError

    from giftstream.server.config import redact_url
    from giftstream.server.ledger.connect import NoPartitions, open_ledger_redis
    from giftstream.server.ledger.entries import LedgerError, read_entries

    audit_check = Check("audit")
    ledger = Check("ledger")
    try:
        client, space = await open_ledger_redis(redis_url, keyspace.ledger_key)
    except (RedisError, OSError, NoPartitions) as exc:
        for check in (audit_check, ledger):
            check.breach(f"cannot read Redis at {redact_url(redis_url)}: {exc}")
        return [audit_check, ledger]
    try:
        report = await _settled_audit(client, space)
        audit_check.detail = report.summary()
        for text in report.breaches:
            audit_check.breach(text)
        gifts: dict[tuple[str, str], tuple[str, int]] = {}
        purchased: Counter[str] = Counter()
        for ledger_key in space.ledgers():
            after = (ledger_from or {}).get(ledger_key)
            start = "-" if after is None else "(" + after
            async for entry in read_entries(client, ledger_key, start=start):
                data = entry.data
                if entry.kind == "gift" and data["sender"] in users:
                    sent_as = (data["sender"], data["key"])
                    if sent_as in gifts:
                        ledger.breach(f"gift key {data['key']} of {data['sender']} settled twice")
                    gifts[sent_as] = (entry.event, int(data["coins"]))
                elif entry.kind == "purchase" and data["user"] in users:
                    purchased[data["user"]] += int(data["credited"])
    except (RedisError, OSError) as exc:
        for check in (audit_check, ledger):
            check.breach(f"cannot read Redis at {redact_url(redis_url)}: {exc}")
        return [audit_check, ledger]
    except LedgerError as exc:
        ledger.breach(f"the ledger does not parse: {exc}")
        return [audit_check, ledger]
    finally:
        await client.aclose()
    acked = {(user, key): (event, cost) for event, user, key, _r, _g, _c, cost in outcome.acks}
    for (user, key), (event, cost) in acked.items():
        found = gifts.get((user, key))
        if found is None:
            ledger.breach(f"gift_ok {event} ({user} {key}) is not in the ledger")
        elif found != (event, cost):
            ledger.breach(f"gift_ok {event} ({cost} coins) is in the ledger as {found}")
    for (user, key), (settled, _cost) in gifts.items():
        if (user, key) not in acked:
            ledger.breach(f"ledger gift {settled} ({user} {key}) was never acknowledged")
    for user, coins in bought.items():
        if purchased[user] != coins:
            ledger.breach(f"{user}: the ledger credits {purchased[user]} coins; {coins} bought")
    ledger.detail = (
        f"{len(acked)} gift_ok all in the ledger; {len(gifts)} ledger gifts of this run"
        if ledger.status == "pass"
        else f"{len(acked)} gift_ok, {len(gifts)} ledger gifts of this run"
    )
    return [audit_check, ledger]


SETTLE_S = 10.0  # a cluster's crediting is at most ~1 s behind: this is generous


async def _settled_audit(client: RedisClient, space: KeySpace) -> AuditReport:
    """The audit, once crediting has reached every gift of the run (a Redis Cluster credits
    creators up to ~1 s after the gift; an audit racing a credit names a wallet it has not
    caught up with). One Redis credits in the gift's script: the first audit is it."""
    from giftstream.server.ledger.audit import audit

    deadline = time.monotonic() + SETTLE_S
    report = await audit(client, keyspace=space)
    while (report.diamonds_uncredited or not report.ok) and time.monotonic() < deadline:
        if not space.cluster:
            break
        await asyncio.sleep(0.2)  # crediting runs every 100 ms: look again
        report = await audit(client, keyspace=space)
    return report


def check_deliveries(outcome: Outcome) -> tuple[Check, dict[str, Any]]:
    """Every viewer still counted received every gift event of its room, in order."""
    check = Check("deliveries")
    rooms = outcome.room_seqs
    acked_by_room: dict[str, set[str]] = defaultdict(set)
    for event, _user, _key, room, *_ in outcome.acks:
        acked_by_room[room].add(event)
    statuses: Counter[str] = Counter()
    slow: Counter[str] = Counter()
    checked_rooms: set[str] = set()
    checked = storm_checked = 0
    for client in outcome.clients:
        status = client["status"]
        statuses[status] += 1
        if client["slow"]:
            slow[client["slow_outcome"] or "unknown"] += 1
        if status != "intact":
            continue
        checked += 1
        storm_checked += bool(client["storm"])
        room = client["room"]
        checked_rooms.add(room)
        seqs = rooms.get(room, {})
        expected = sum(1 for seq in seqs if seq > client["start_seq"])
        who = f"viewer {client['user']} in room {room}"
        if client["gaps"] or client["disorder"]:
            check.breach(
                f"{who}: {client['gaps']} gaps ({client['missing']} seq missing), "
                f"{client['disorder']} out of order"
            )
        if client["gift_events"] != expected:
            check.breach(f"{who}: received {client['gift_events']} of {expected} gift events")
    for room in sorted(checked_rooms):
        delivered = set(rooms.get(room, {}).values())
        for event in sorted(acked_by_room[room] - delivered):
            check.breach(f"room {room}: acknowledged gift {event} reached no viewer")
    excluded = {k: v for k, v in statuses.items() if k != "intact"}
    check.detail = f"{checked} viewers checked in {len(checked_rooms)} room(s)" + (
        f"; excluded: {dict(excluded)}" if excluded else ""
    )
    return check, {
        "statuses": dict(statuses),
        "slow_readers": dict(slow),
        "checked": checked,
        "storm_rejoined_checked": storm_checked,
    }
