"""The checkpoint: folding the ledger gives the audit's own state, whatever order entries are
delivered in, in any chunk size, with two folders racing; and an audit from it checks what
comes after as a full replay would (refunds of earlier purchases, payout keys reused)."""

from __future__ import annotations

import asyncio

import orjson
import redis.asyncio as aioredis

from giftstream.server.ledger.audit import AuditReport, audit
from giftstream.server.ledger.checkpoint import (
    CheckpointFolder,
    CheckpointKeys,
    checkpoint_last_id,
    fold_checkpoint,
    snapshot,
)
from giftstream.server.money import keys
from giftstream.server.scripts import script_source
from tests.server.ledger.ledger_workload import DAY2_MS, SMALL, ledger, new_wallet, settle, text


def same_audit(left: AuditReport, right: AuditReport) -> None:
    """Equal in everything but where the replay started."""
    for report in (left, right):
        report.checkpoint, report.replayed = None, 0
    assert left == right


async def test_an_audit_from_the_checkpoint_equals_a_full_replay(
    redis_client: aioredis.Redis,
) -> None:
    wallet = await new_wallet(redis_client)
    added = await settle(wallet, 25)
    entries = await ledger(redis_client)
    assert await fold_checkpoint(redis_client) == entries[-1].id
    report = await audit(redis_client)
    assert report.ok, report.breaches
    assert (report.checkpoint, report.replayed, report.entries) == (entries[-1].id, 0, added)
    assert "from the checkpoint at" in report.summary()
    same_audit(report, await audit(redis_client, from_checkpoint=False))

    # the checkpoint's wallets are the wallets in Redis
    saved, _ = await snapshot(redis_client)
    assert saved is not None and len(saved.replay.wallets) == report.wallets
    for user, balances in saved.replay.wallets.items():
        stored = await redis_client.hmget(keys.SINGLE.wallet(user), ["coins", "diamonds", "debt"])
        assert [int(v or 0) for v in stored] == [
            balances.coins,
            balances.diamonds,
            balances.debt,
        ], user

    more = await settle(wallet, 5, prefix="n", extras=False)
    report = await audit(redis_client)
    assert report.ok and (report.replayed, report.entries) == (more, added + more)
    same_audit(report, await audit(redis_client, from_checkpoint=False))


async def test_the_fold_follows_the_stream_whatever_the_delivery_order(
    redis_client: aioredis.Redis,
) -> None:
    await settle(await new_wallet(redis_client), 20)
    entries = await ledger(redis_client)
    folder = CheckpointFolder(redis_client, chunk=3)
    await folder(entries[10])  # handed a later entry first: folds everything up to it
    folded = await checkpoint_last_id(redis_client)
    assert folded == entries[11].id  # four chunks of three
    await folder(entries[2])  # an earlier one, redelivered: nothing to do
    assert await checkpoint_last_id(redis_client) == folded
    for entry in reversed(entries):
        await CheckpointFolder(redis_client, chunk=3)(entry)  # fresh folders, no cache
    assert await checkpoint_last_id(redis_client) == entries[-1].id
    same_audit(await audit(redis_client), await audit(redis_client, from_checkpoint=False))


async def test_two_folders_racing_fold_each_entry_once(redis_client: aioredis.Redis) -> None:
    wallet = await new_wallet(redis_client)
    for part in range(4):  # malformed entries among them: each must be one breach, once
        await settle(wallet, 10, prefix=f"p{part}", extras=False)
        await redis_client.xadd(keys.LEDGER, {"data": b"{broken"})
    one, two = CheckpointFolder(redis_client, chunk=2), CheckpointFolder(redis_client, chunk=3)
    await asyncio.gather(one.fold(), two.fold(), one.fold(), two.fold())
    report = await audit(redis_client)
    assert len(report.breaches) == 4 and all("not JSON" in b for b in report.breaches)
    same_audit(report, await audit(redis_client, from_checkpoint=False))


async def test_rules_across_the_checkpoint(redis_client: aioredis.Redis) -> None:
    wallet = await new_wallet(redis_client)
    await settle(wallet, 4)
    await fold_checkpoint(redis_client)
    # a refund of a purchase folded into the checkpoint is no breach
    wallet.clock.now_ms = DAY2_MS
    await wallet.purchase(receipt="late-rc", user="late", package=SMALL, adult=True)
    await fold_checkpoint(redis_client)
    await wallet.refund(receipt="late-rc")
    report = await audit(redis_client)
    assert report.ok, report.breaches
    await fold_checkpoint(redis_client)
    assert (await audit(redis_client)).ok

    # a payout key or a receipt used again after the checkpoint is still named
    payout = next(e for e in await ledger(redis_client) if e.kind == "payout")
    refund = next(
        e
        for e in await ledger(redis_client)
        if e.data.get("receipt") == "late-rc" and e.kind == "refund"
    )
    for original in (payout, refund):
        forged = {**original.data, "event": "forged-" + original.kind}
        await redis_client.xadd(keys.LEDGER, {"data": orjson.dumps(forged)})
    report = await audit(redis_client)
    assert any(f"payout key {payout.data['key']} paid twice" in b for b in report.breaches)
    assert any("receipt late-rc refunded twice" in b for b in report.breaches)


async def test_the_checkpoint_keys(redis_client: aioredis.Redis) -> None:
    await settle(await new_wallet(redis_client), 3)
    await fold_checkpoint(redis_client)
    k = CheckpointKeys.of(keys.LEDGER)
    assert k.main == "giftstream:ledger:checkpoint"
    main = {text(f): text(v) for f, v in (await redis_client.hgetall(k.main)).items()}
    entries = await ledger(redis_client)
    assert main["last_id"] == entries[-1].id and int(main["entries"]) == len(entries)
    folded = await redis_client.hget(k.wallets, "cara")
    assert folded is not None
    cara = orjson.loads(folded)
    assert cara == {"coins": 0, "diamonds": 2 + 7 + 15_000 - 10_000, "debt": 0}
    diamonds = await redis_client.hget(keys.SINGLE.wallet("cara"), "diamonds")
    assert diamonds is not None and int(diamonds) == 5009
    assert await redis_client.sismember(k.payouts, "q-payout-1")
    # another ledger key has a checkpoint of its own
    assert CheckpointKeys.of("test:ledger").main == "test:ledger:checkpoint"


async def test_the_save_script_refuses_a_stale_or_old_chunk(redis_client: aioredis.Redis) -> None:
    """What keeps two folders from both landing a chunk: compare-and-set on last_id."""
    await settle(await new_wallet(redis_client), 6, extras=False)
    entries = await ledger(redis_client)
    await CheckpointFolder(redis_client, chunk=6).fold(through=entries[5].id)
    k = CheckpointKeys.of(keys.LEDGER)
    before = {key: await redis_client.dump(key) for key in k.all()}
    save = redis_client.register_script(script_source("checkpoint"))
    one_breach: list[int | str] = [0, 0, 0, 0, 0, 1, "a breach that must not land"]
    for expected, new_last, outcome in (
        (entries[3].id, entries[7].id, b"conflict"),  # read before another folder moved it
        ("", entries[7].id, b"conflict"),  # read when there was no checkpoint
        (entries[3].id, entries[4].id, b"folded"),  # an old chunk, already in
        (entries[5].id, entries[5].id, b"folded"),
    ):
        assert await save(keys=k.all(), args=[expected, new_last, *one_breach]) == outcome
    assert {key: await redis_client.dump(key) for key in k.all()} == before
    assert await save(keys=k.all(), args=[entries[5].id, entries[7].id, *one_breach]) == b"ok"
    assert await checkpoint_last_id(redis_client) == entries[7].id
    assert await redis_client.lrange(k.breaches, 0, -1) == [b"a breach that must not land"]
