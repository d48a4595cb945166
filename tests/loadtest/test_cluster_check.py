"""The load test's money checks on a Redis Cluster: the ledger position taken before the run
covers every partition's ledger, the audit reads every wallet on every master, and the
ledger check finds each acknowledged gift in whichever ledger it landed."""

from __future__ import annotations

from giftstream.loadtest.check import Outcome, check_redis
from giftstream.loadtest.runner import _ledger_position
from giftstream.server.ledger.entries import read_entries
from giftstream.server.money.keys import KeySpace
from tests.server.ledger.cluster_ledger import ClusterLedger, users_by_partition


async def test_the_checks_cover_every_ledger_of_a_cluster(cluster_url: str) -> None:
    ledger = await ClusterLedger.open(cluster_url)
    try:
        users = users_by_partition(ledger.space, ledger.space.partitions)
        await ledger.purchase(users[0], 5)  # before the run: not the run's
        before = await _ledger_position(cluster_url, "giftstream:ledger")
        assert before is not None and list(before) == [ledger.space.ledger_of(users[0])]
        for n, user in enumerate(users):
            await ledger.purchase(user, 100)
            await ledger.gift(user, users[(n + 1) % len(users)], 20)
        acks: list[tuple[str, str, str, str, str, int, int]] = []
        for key in ledger.space.ledgers():
            async for entry in read_entries(ledger.redis, key):
                d = entry.data
                if entry.kind == "gift":
                    acks.append(
                        (entry.event, d["sender"], d["key"], d["room"], d["gift"], 1, d["coins"])
                    )
        bought = dict.fromkeys(users, 100)  # users[0]'s 5 bought before are not the run's
        checks = await check_redis(
            cluster_url, KeySpace(), before, Outcome(acks=acks), set(users), bought
        )
        assert [(c.name, c.status) for c in checks] == [("audit", "pass"), ("ledger", "pass")], [
            c.as_dict() for c in checks
        ]
        assert f"{2 * len(users) + 1} ledger entries, {len(users)} wallets" in checks[0].detail

        missing = Outcome(acks=acks[1:])
        checks = await check_redis(cluster_url, KeySpace(), before, missing, set(users), bought)
        assert checks[1].status == "fail"
        assert checks[1].breaches == [
            f"ledger gift {acks[0][0]} ({acks[0][1]} {acks[0][2]}) was never acknowledged"
        ]
    finally:
        await ledger.close()
