"""kill -9 of a real consumer process after it read a batch and applied part of it, before
it acked: a second consumer reclaims the batch after claim_idle_ms, and every entry's effect
is applied exactly once (earnings equal the ledger's sums; the checkpoint audits clean)."""

from __future__ import annotations

import asyncio
import os
import sys
import time

import pytest
import redis.asyncio as aioredis

from giftstream.server.ledger.audit import audit
from giftstream.server.ledger.checkpoint import CheckpointFolder, checkpoint_last_id
from giftstream.server.ledger.consumer import LedgerConsumer, group_lag
from giftstream.server.ledger.earnings import EarningsConsumer
from giftstream.server.ledger.trim import trim_ledger
from giftstream.server.money import keys
from tests.server.ledger.consumer_child import CONSUMER
from tests.server.ledger.ledger_workload import (
    expected_earnings,
    ledger,
    new_wallet,
    settle,
    stored_earnings,
    text,
)

STALL_AFTER = 12  # entries the doomed consumer handles before it stalls, unacked


async def _kill_mid_batch(redis_url: str, handler: str) -> list[str]:
    """Start the child, read the stream ids it handled until it stalls, then kill -9 it."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.server.ledger.consumer_child",
        redis_url,
        handler,
        str(STALL_AFTER),
        stdout=asyncio.subprocess.PIPE,
        cwd=os.getcwd(),
    )
    assert proc.stdout is not None
    handled: list[str] = []
    try:
        async with asyncio.timeout(20):
            while (line := (await proc.stdout.readline()).decode()) and line != "stalling\n":
                if line.startswith("handled "):
                    handled.append(line.split()[1])
            assert line == "stalling\n", "the child exited before it stalled"
    finally:
        proc.kill()  # SIGKILL: no cleanup, no ack, as a crash would
        await proc.wait()
    assert len(handled) == STALL_AFTER, "the child did not stall where it should"
    return handled


async def _catch_up(consumer: LedgerConsumer, redis: aioredis.Redis, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while await group_lag(redis, keys.LEDGER, consumer.group):
        assert time.monotonic() < deadline, "the survivor did not catch up"
        await consumer.run_once()
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("handler", ["earnings", "checkpoint"])
async def test_kill_9_after_read_before_ack_applies_each_entry_once(
    redis_url: str, redis_client: aioredis.Redis, handler: str
) -> None:
    wallet = await new_wallet(redis_client)
    first = await settle(wallet, 30)
    handled = await _kill_mid_batch(redis_url, handler)
    entries = await ledger(redis_client)
    assert handled == [e.id for e in entries[:STALL_AFTER]]

    # it had read the whole batch, and acked none of it
    summary = await redis_client.xpending(keys.LEDGER, handler)
    assert summary["pending"] == first
    assert [(text(c["name"]), c["pending"]) for c in summary["consumers"]] == [(CONSUMER, first)]
    gifts_applied = sum(1 for e in entries[:STALL_AFTER] if e.kind == "gift")
    if handler == "earnings":  # the effects of the handled part are in, the rest not
        stored = await stored_earnings(redis_client, list(expected_earnings(entries)))
        assert sum(day["events"] for day in stored.values()) == gifts_applied > 0
    else:  # the checkpoint folds ahead: everything there was is folded, unacked
        assert await checkpoint_last_id(redis_client) == entries[-1].id

    second = await settle(wallet, 10, prefix="r")  # more arrive while nobody consumes
    real: EarningsConsumer | CheckpointFolder
    if handler == "earnings":
        real = EarningsConsumer(redis_client)
    else:
        real = CheckpointFolder(redis_client)
    survivor = LedgerConsumer(
        redis_client, handler, "survivor", real, block_ms=20, claim_idle_ms=300
    )
    await _catch_up(survivor, redis_client)
    assert (await redis_client.xpending(keys.LEDGER, handler))["pending"] == 0
    entries = await ledger(redis_client)
    assert len(entries) == first + second

    if handler == "earnings":
        assert isinstance(real, EarningsConsumer)
        assert real.duplicates == gifts_applied  # redelivered, and not counted again
        expected = expected_earnings(entries)
        assert await stored_earnings(redis_client, list(expected)) == expected
    else:
        assert await checkpoint_last_id(redis_client) == entries[-1].id
        full = await audit(redis_client, from_checkpoint=False)
        from_checkpoint = await audit(redis_client)
        assert full.ok and from_checkpoint.ok, from_checkpoint.breaches
        assert from_checkpoint.summary().startswith(full.summary())
        assert await trim_ledger(redis_client, keep_min_entries=0) == first + second
        after_trim = await audit(redis_client)
        assert after_trim.ok, after_trim.breaches
        assert (after_trim.entries, after_trim.replayed) == (first + second, 0)
