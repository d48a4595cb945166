"""Trimming that loses nothing: a lagging group keeps every entry it has not acked, the
checkpoint bounds every trim, and `audit` passes after trims and still names tampering."""

from __future__ import annotations

from typing import Any

import orjson
import redis.asyncio as aioredis

from giftstream.server.ledger.audit import audit
from giftstream.server.ledger.checkpoint import (
    GROUP,
    CheckpointFolder,
    checkpoint_last_id,
    fold_checkpoint,
)
from giftstream.server.ledger.consumer import LedgerConsumer
from giftstream.server.ledger.earnings import EarningsConsumer
from giftstream.server.ledger.entries import LedgerEntry, next_stream_id
from giftstream.server.ledger.trim import safe_trim_point, trim_ledger
from giftstream.server.money import keys
from tests.server.ledger.ledger_workload import ledger, new_wallet, settle, text


class Seen:
    """A handler that only remembers which events it saw, in order."""

    def __init__(self) -> None:
        self.events: list[str] = []

    async def __call__(self, entry: LedgerEntry) -> None:
        self.events.append(entry.event)


async def caught_up(consumer: LedgerConsumer) -> None:
    for _ in range(100):
        if not await consumer.run_once():
            return
    raise AssertionError("consumer never caught up")


async def stream_ids(redis: aioredis.Redis) -> list[str]:
    entries: Any = await redis.xrange(keys.LEDGER)
    return [text(i) for i, _ in entries]


async def assert_audit_ok(redis: aioredis.Redis, entries: int) -> None:
    report = await audit(redis)
    assert report.breaches == []
    assert report.entries == entries


async def test_nothing_is_trimmed_without_groups(redis_client: aioredis.Redis) -> None:
    assert await safe_trim_point(redis_client) is None  # no stream at all
    added = await settle(await new_wallet(redis_client), 10)
    await fold_checkpoint(redis_client)
    assert await safe_trim_point(redis_client) is None  # a stream, no group
    assert await trim_ledger(redis_client, keep_min_entries=0) == 0
    assert await redis_client.xlen(keys.LEDGER) == added


async def test_nothing_is_trimmed_without_a_checkpoint(redis_client: aioredis.Redis) -> None:
    added = await settle(await new_wallet(redis_client), 10)
    await caught_up(
        LedgerConsumer(redis_client, "earnings", "c1", EarningsConsumer(redis_client), block_ms=10)
    )
    last = (await stream_ids(redis_client))[-1]
    assert await safe_trim_point(redis_client) == next_stream_id(last)
    assert await trim_ledger(redis_client, keep_min_entries=0) == 0  # the audit needs them
    assert await redis_client.xlen(keys.LEDGER) == added


async def test_a_lagging_group_loses_nothing_and_trimming_follows_it(
    redis_client: aioredis.Redis,
) -> None:
    wallet = await new_wallet(redis_client)
    added = await settle(wallet, 40)  # 50 entries
    checkpoint = LedgerConsumer(
        redis_client, GROUP, "c1", CheckpointFolder(redis_client), batch=16, block_ms=10
    )
    earnings = LedgerConsumer(
        redis_client, "earnings", "c1", EarningsConsumer(redis_client), block_ms=10
    )
    await caught_up(checkpoint)
    await caught_up(earnings)
    # the laggard read 8 entries and acked 5 of them, then stopped
    await redis_client.xgroup_create(keys.LEDGER, "laggard", id="0")
    read: Any = await redis_client.xreadgroup("laggard", "slow", {keys.LEDGER: ">"}, count=8)
    first_read = [text(i) for i, _ in read[0][1]]
    await redis_client.xack(keys.LEDGER, "laggard", *first_read[:5])
    await assert_audit_ok(redis_client, added)

    assert await safe_trim_point(redis_client) == first_read[5]  # its oldest pending
    ids = await stream_ids(redis_client)
    assert await trim_ledger(redis_client, keep_min_entries=10) == 5
    assert await stream_ids(redis_client) == ids[5:]  # nothing it has not acked went
    await assert_audit_ok(redis_client, added)

    more = await settle(wallet, 6, prefix="m", extras=False)  # it lags further
    assert await trim_ledger(redis_client, keep_min_entries=10) == 0
    await caught_up(checkpoint)
    await caught_up(earnings)

    # the laggard comes back: its pending entries, then every new one, none missing
    seen = Seen()
    await caught_up(
        LedgerConsumer(redis_client, "laggard", "slow", seen, block_ms=10, claim_idle_ms=1)
    )
    left = await ledger(redis_client)
    assert [e.id for e in left[:3]] == first_read[5:]  # the three it had pending
    assert sorted(seen.events) == sorted(e.event for e in left)  # all that is left, each once
    assert len(seen.events) == added + more - 5

    # all caught up: trimming now keeps only the last keep_min_entries
    assert await safe_trim_point(redis_client) == next_stream_id(left[-1].id)
    assert await trim_ledger(redis_client, keep_min_entries=10) == added + more - 5 - 10
    assert await redis_client.xlen(keys.LEDGER) == 10
    report = await audit(redis_client)
    assert report.breaches == []
    assert (report.entries, report.replayed) == (added + more, 0)
    assert await trim_ledger(redis_client, keep_min_entries=11) == 0  # fewer than it keeps
    assert await trim_ledger(redis_client, keep_min_entries=0) == 10
    await assert_audit_ok(redis_client, added + more)


async def test_the_checkpoint_bounds_trimming_even_without_its_group(
    redis_client: aioredis.Redis,
) -> None:
    added = await settle(await new_wallet(redis_client), 20)
    await caught_up(
        LedgerConsumer(redis_client, "earnings", "c1", EarningsConsumer(redis_client), block_ms=10)
    )
    ids = await stream_ids(redis_client)
    assert await CheckpointFolder(redis_client, chunk=7).fold(through=ids[9]) == ids[13]
    assert await trim_ledger(redis_client, keep_min_entries=0) == 14  # folded ones only
    assert await stream_ids(redis_client) == ids[14:]
    await assert_audit_ok(redis_client, added)


async def test_a_lagging_checkpoint_group_holds_back_the_trim(
    redis_client: aioredis.Redis,
) -> None:
    added = await settle(await new_wallet(redis_client), 20)
    ids = await stream_ids(redis_client)
    folder = CheckpointFolder(redis_client, chunk=4)
    consumer = LedgerConsumer(redis_client, GROUP, "c1", folder, batch=6, block_ms=10)
    assert await consumer.run_once() == 6  # folded 8 (two chunks), acked 6
    assert await checkpoint_last_id(redis_client) == ids[7]
    assert await trim_ledger(redis_client, keep_min_entries=0) == 6  # what the group acked
    await assert_audit_ok(redis_client, added)


async def test_audit_after_a_trim_still_names_tampering(redis_client: aioredis.Redis) -> None:
    wallet = await new_wallet(redis_client)
    added = await settle(wallet, 30)
    checkpoint = LedgerConsumer(
        redis_client, GROUP, "c1", CheckpointFolder(redis_client), block_ms=10
    )
    await caught_up(checkpoint)
    assert await trim_ledger(redis_client, keep_min_entries=5) == added - 5
    more = await settle(wallet, 8, prefix="t", extras=False)  # after the checkpoint
    await assert_audit_ok(redis_client, added + more)
    after = await ledger(redis_client)
    after = after[5:]  # the entries the checkpoint has not folded

    # a wallet changed behind the ledger's back
    await redis_client.hincrby(keys.SINGLE.wallet("cara"), "diamonds", 7)
    report = await audit(redis_client)
    assert any(b.startswith("wallet cara: diamonds ") for b in report.breaches), report.breaches
    await redis_client.hincrby(keys.SINGLE.wallet("cara"), "diamonds", -7)
    await assert_audit_ok(redis_client, added + more)

    # an entry after the checkpoint altered: deleted, and added again with more coins
    victim = next(e for e in after if e.kind == "gift")
    await redis_client.xdel(keys.LEDGER, victim.id)
    report = await audit(redis_client)
    assert report.checkpoint == (await ledger(redis_client))[4].id
    assert (
        f"1 of the {added + more} entries ever added to the ledger are gone unfolded: "
        f"deleted, or trimmed past the checkpoint at {report.checkpoint}"
    ) in report.breaches
    sender = victim.data["sender"]
    assert any(b.startswith(f"wallet {sender}: coins ") for b in report.breaches)
    forged = {
        **victim.data,
        "coins": victim.data["coins"] + 5,
        "platform": victim.data["platform"] + 5,
    }
    await redis_client.xadd(keys.LEDGER, {"data": orjson.dumps(forged)})
    report = await audit(redis_client)
    assert any("1 of the" in b and "gone unfolded" in b for b in report.breaches)  # still
    assert any(b.startswith(f"wallet {sender}: coins ") for b in report.breaches), report.breaches


async def test_a_trim_past_the_checkpoint_is_named(redis_client: aioredis.Redis) -> None:
    wallet = await new_wallet(redis_client)
    added = await settle(wallet, 10)
    await fold_checkpoint(redis_client)
    more = await settle(wallet, 6, prefix="x", extras=False)
    await assert_audit_ok(redis_client, added + more)
    await redis_client.xtrim(keys.LEDGER, maxlen=3, approximate=False)  # MAXLEN: the wrong way
    report = await audit(redis_client)
    assert (
        f"{more - 3} of the {added + more} entries ever added to the ledger are gone "
        f"unfolded: deleted, or trimmed past the checkpoint at {report.checkpoint}"
    ) in report.breaches
    assert len(report.breaches) > 1  # and the wallets they moved


async def test_a_malformed_entry_stays_a_breach_after_it_is_trimmed(
    redis_client: aioredis.Redis,
) -> None:
    wallet = await new_wallet(redis_client)
    added = await settle(wallet, 4, extras=False)
    bad = text(await redis_client.xadd(keys.LEDGER, {"data": b"{broken"}))
    added += 1 + await settle(wallet, 4, extras=False, prefix="z")
    before = await audit(redis_client)
    assert len(before.breaches) == 1 and f"entry {bad}" in before.breaches[0]
    checkpoint = LedgerConsumer(
        redis_client, GROUP, "c1", CheckpointFolder(redis_client), block_ms=10
    )
    await caught_up(checkpoint)
    assert await redis_client.xlen(keys.LEDGER + ":dead") == 1  # the group dead-lettered it
    assert await trim_ledger(redis_client, keep_min_entries=0) == added
    after = await audit(redis_client)
    assert after.breaches == before.breaches
    assert after.entries == before.entries == added
