"""The audit and the checkpoint on a real Redis Cluster: every partition's ledger replayed,
gifts counted for their creators as far as the credit cursors say, and each kind of breach
named: a gift credited past the cursor, a wallet off by one, diamonds with no ledger entry."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from giftstream.server.ledger.audit import audit
from giftstream.server.ledger.checkpoint import checkpoint_last_id, fold_checkpoints
from giftstream.server.ledger.entries import stream_id_key
from giftstream.server.ledger.trim import trim_all
from giftstream.server.money import keys
from tests.server.ledger.cluster_ledger import ClusterLedger, users_by_partition


@pytest.fixture
async def ledger(cluster_url: str) -> AsyncIterator[ClusterLedger]:
    opened = await ClusterLedger.open(cluster_url)
    yield opened
    await opened.close()


async def spread_workload(ledger: ClusterLedger) -> tuple[str, str, str]:
    """ann and bob (two partitions) buy and gift to cara (a third), cara pays out part;
    bob's last gift is not credited yet. Returns (ann, bob, cara)."""
    ann, bob, cara = users_by_partition(ledger.space, 3)
    await ledger.purchase(ann, 100)
    await ledger.purchase(bob, 50)
    await ledger.gift(ann, cara, 40)  # 20 diamonds
    await ledger.gift(bob, cara, 10)  # 5 diamonds
    await ledger.payout(cara, 24)  # more than either ledger credited: fine on the sum
    await ledger.gift(bob, cara, 6, credit=False)  # 3 diamonds, past the cursor
    return ann, bob, cara


async def test_consistent_partitioned_data_passes(ledger: ClusterLedger) -> None:
    await spread_workload(ledger)
    report = await audit(ledger.redis, keyspace=ledger.space)
    assert report.breaches == []
    assert (report.entries, report.wallets) == (6, 3)
    assert (report.coins_purchased, report.coins_spent, report.coins_held) == (150, 56, 94)
    assert (report.diamonds_credited, report.diamonds_uncredited) == (25, 3)
    assert report.coins_spent == (
        report.diamonds_credited + report.diamonds_uncredited + report.platform_share
    )
    assert (report.diamonds_paid_out, report.diamonds_held) == (24, 1)


async def test_a_gift_credited_past_the_cursor_is_named(ledger: ClusterLedger) -> None:
    _ann, _bob, cara = await spread_workload(ledger)
    await ledger.redis.hset(ledger.space.wallet(cara), "diamonds", 1 + 3)  # credited, no cursor
    report = await audit(ledger.redis, keyspace=ledger.space)
    assert report.breaches == [
        f"wallet {cara}: diamonds 4 in Redis, 1 by the ledger (which leaves out 3 diamonds "
        "of gifts past the credit cursors)"
    ]


async def test_a_wallet_off_by_one_is_named(ledger: ClusterLedger) -> None:
    ann, _bob, _cara = await spread_workload(ledger)
    await ledger.redis.hset(ledger.space.wallet(ann), "coins", 59)
    report = await audit(ledger.redis, keyspace=ledger.space)
    assert report.breaches == [f"wallet {ann}: coins 59 in Redis, 60 by the ledger"]


async def test_diamonds_with_no_ledger_entry_are_named(ledger: ClusterLedger) -> None:
    await spread_workload(ledger)
    (dave,) = users_by_partition(ledger.space, 1, prefix="dave")
    await ledger.redis.hset(ledger.space.wallet(dave), "diamonds", 7)
    report = await audit(ledger.redis, keyspace=ledger.space)
    assert report.breaches == [f"wallet {dave}: diamonds 7 in Redis, 0 by the ledger"]


async def test_no_cursor_means_nothing_of_that_ledger_is_credited(ledger: ClusterLedger) -> None:
    ann, _bob, cara = await spread_workload(ledger)
    cursors = ledger.space.credit_cursors(ledger.space.partition(cara))
    await ledger.redis.hdel(cursors, f"p{ledger.space.partition(ann):02d}")
    report = await audit(ledger.redis, keyspace=ledger.space)
    assert report.diamonds_uncredited == 20 + 3
    assert f"wallet {cara}: diamonds -19 by the ledgers" in report.breaches
    assert any(b.startswith(f"wallet {cara}: diamonds 1 in Redis, -19") for b in report.breaches)


async def test_every_wallet_on_every_master_is_read(ledger: ClusterLedger) -> None:
    users = users_by_partition(ledger.space, ledger.space.partitions)
    for n, user in enumerate(users):
        await ledger.purchase(user, 10 + n)
    nodes = {str(ledger.redis.get_node_from_key(ledger.space.wallet(user))) for user in users}
    assert len(nodes) == 3  # the wallets sit on every master: SCAN must visit them all
    report = await audit(ledger.redis, keyspace=ledger.space)
    assert report.ok, report.breaches
    assert report.wallets == len(users)
    assert report.coins_held == sum(10 + n for n in range(len(users)))


async def test_checkpoints_fold_only_credited_gifts_and_the_audit_starts_from_them(
    ledger: ClusterLedger,
) -> None:
    _ann, bob, cara = await spread_workload(ledger)
    bob_ledger = ledger.space.ledger_of(bob)
    pending = [i async for i in _ids(ledger, bob_ledger)][-1]  # bob's uncredited gift
    folded = await fold_checkpoints(ledger.redis, ledger.space)
    last = folded[bob_ledger]
    assert last is not None and stream_id_key(last) < stream_id_key(pending)
    for ledger_key, last in folded.items():
        assert await checkpoint_last_id(ledger.redis, ledger_key) == last
    report = await audit(ledger.redis, keyspace=ledger.space)
    assert report.breaches == []
    assert report.checkpoint is not None and report.replayed == 1  # bob's waiting gift
    assert report.diamonds_uncredited == 3
    # crediting reaches it: the next fold takes it, the audit still passes
    await ledger.credit(bob, cara, pending, 3)
    folded = await fold_checkpoints(ledger.redis, ledger.space)
    assert folded[bob_ledger] == pending
    report = await audit(ledger.redis, keyspace=ledger.space)
    assert report.breaches == [] and report.replayed == 0
    assert (report.diamonds_credited, report.diamonds_uncredited) == (28, 0)
    # no consumer group: trimming takes nothing (a consumer may come), the audit holds
    done = await trim_all(ledger.redis, ledger.space, keep_min_entries=0)
    assert set(done) == set(ledger.space.ledgers())
    assert (await audit(ledger.redis, keyspace=ledger.space)).ok


async def _ids(ledger: ClusterLedger, ledger_key: str) -> AsyncIterator[str]:
    for stream_id, _fields in await ledger.redis.xrange(ledger_key) or []:
        yield keys.text(stream_id)
