"""The consumer API on a real Redis: every entry handled once and acked, poison and malformed
entries in the dead-letter stream (and replayed from it), failures retried, groups created
once, and `run_consumer` as a real process stopped by SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections import Counter
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from giftstream.server.embedded_redis import free_port
from giftstream.server.ledger.consumer import (
    HANDLERS,
    UNREAD_COUNT_CAP,
    ConsumerMetrics,
    LedgerConsumer,
    group_lag,
    run_consumer,
)
from giftstream.server.ledger.dead_letters import replay_dead_letters
from giftstream.server.ledger.earnings import EarningsConsumer
from giftstream.server.ledger.entries import LedgerEntry
from giftstream.server.money import keys
from tests.server.ledger.ledger_workload import (
    expected_earnings,
    ledger,
    new_wallet,
    settle,
    stored_earnings,
    text,
    until,
)

DEAD = keys.LEDGER + ":dead"


class Recorder:
    """A handler that counts its calls per event and counts earnings; it can be told to fail
    for some events (always, or a number of times)."""

    def __init__(self, redis: aioredis.Redis, fail: dict[str, int] | None = None) -> None:
        self.earnings = EarningsConsumer(redis)
        self.calls: Counter[str] = Counter()
        self.fail = dict(fail or {})  # event -> failures left (-1: always)

    async def __call__(self, entry: LedgerEntry) -> None:
        self.calls[entry.event] += 1
        left = self.fail.get(entry.event, 0)
        if left:
            self.fail[entry.event] = left - 1 if left > 0 else left
            raise ValueError(f"boom on {entry.event}")
        await self.earnings(entry)


async def drain(consumer: LedgerConsumer, passes: int = 200, pause: float = 0.0) -> int:
    """run_once until a pass takes nothing (bounded); the entries taken in all."""
    taken = 0
    for _ in range(passes):
        step = await consumer.run_once()
        taken += step
        if step == 0:
            return taken
        await asyncio.sleep(pause)
    raise AssertionError(f"still taking entries after {passes} passes")


async def pending(redis: aioredis.Redis, group: str) -> int:
    return int((await redis.xpending(keys.LEDGER, group))["pending"])


async def dead_letters(redis: aioredis.Redis) -> list[dict[str, str]]:
    dead: Any = await redis.xrange(DEAD)
    return [{text(k): text(v) for k, v in fields.items()} for _, fields in dead]


async def test_every_entry_is_handled_once_and_acked(redis_client: aioredis.Redis) -> None:
    added = await settle(await new_wallet(redis_client), 40)
    handler = Recorder(redis_client)
    metrics = ConsumerMetrics()
    consumer = LedgerConsumer(
        redis_client, "earnings", "c1", handler, batch=7, block_ms=10, metrics=metrics
    )
    assert await drain(consumer) == added
    entries = await ledger(redis_client)
    assert len(entries) == added
    assert handler.calls == Counter({e.event: 1 for e in entries})
    assert await pending(redis_client, "earnings") == 0
    assert await group_lag(redis_client, keys.LEDGER, "earnings") == 0
    expected = expected_earnings(entries)
    assert await stored_earnings(redis_client, list(expected)) == expected
    assert handler.earnings.duplicates == 0
    assert (
        metrics.registry.get_sample_value("giftstream_consumer_acked_total", {"group": "earnings"})
        == added
    )
    assert await redis_client.exists(DEAD) == 0


async def test_a_running_consumer_takes_new_entries_and_stops(
    redis_client: aioredis.Redis,
) -> None:
    wallet = await new_wallet(redis_client)
    handler = Recorder(redis_client)
    async with LedgerConsumer(redis_client, "earnings", "c1", handler, block_ms=50):
        added = await settle(wallet, 12, extras=False)
        await until(lambda: _handled(handler, added), what="all entries handled")
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 1.0  # one block_ms at most, not a hang
    await until(lambda: _no_pending(redis_client, "earnings"), what="the last batch acked")
    expected = expected_earnings(await ledger(redis_client))
    assert await stored_earnings(redis_client, list(expected)) == expected


async def _handled(handler: Recorder, count: int) -> bool:
    return sum(handler.calls.values()) >= count


async def _no_pending(redis: aioredis.Redis, group: str) -> bool:
    return await pending(redis, group) == 0


async def test_two_consumers_of_one_group_share_the_entries(redis_client: aioredis.Redis) -> None:
    added = await settle(await new_wallet(redis_client), 30)
    first, second = Recorder(redis_client), Recorder(redis_client)
    a = LedgerConsumer(redis_client, "earnings", "a", first, batch=4, block_ms=10)
    b = LedgerConsumer(redis_client, "earnings", "b", second, batch=4, block_ms=10)
    for _ in range(50):
        if not await a.run_once() + await b.run_once():
            break
    assert first.calls and second.calls
    assert not set(first.calls) & set(second.calls)
    assert sum(first.calls.values()) + sum(second.calls.values()) == added
    expected = expected_earnings(await ledger(redis_client))
    assert await stored_earnings(redis_client, list(expected)) == expected


async def test_a_poison_entry_is_dead_lettered_after_max_deliveries(
    redis_client: aioredis.Redis,
) -> None:
    added = await settle(await new_wallet(redis_client), 20)
    entries = await ledger(redis_client)
    poison = next(e for e in entries if e.kind == "gift")
    handler = Recorder(redis_client, fail={poison.event: -1})
    metrics = ConsumerMetrics()
    consumer = LedgerConsumer(
        redis_client,
        "earnings",
        "c1",
        handler,
        block_ms=10,
        claim_idle_ms=30,
        max_deliveries=3,
        metrics=metrics,
    )
    deadline = time.monotonic() + 10
    while not await redis_client.exists(DEAD):
        assert time.monotonic() < deadline, "the poison entry never reached the dead letters"
        await consumer.run_once()
        await asyncio.sleep(0.02)
    assert handler.calls[poison.event] == 3
    assert all(handler.calls[e.event] == 1 for e in entries if e.event != poison.event)
    (letter,) = await dead_letters(redis_client)
    poisoned: Any = await redis_client.xrange(keys.LEDGER, poison.id, poison.id)
    raw = dict(poisoned[0][1])
    assert letter == {
        "data": text(raw[b"data"]),
        "stream_id": poison.id,
        "group": "earnings",
        "reason": f"ValueError: boom on {poison.event}",
        "deliveries": "3",
        "consumer": "c1",
    }
    assert await pending(redis_client, "earnings") == 0
    assert (
        metrics.registry.get_sample_value(
            "giftstream_consumer_dead_lettered_total", {"group": "earnings", "cause": "failed"}
        )
        == 1
    )
    assert (
        metrics.registry.get_sample_value(
            "giftstream_consumer_failures_total", {"group": "earnings"}
        )
        == 2
    )
    expected = expected_earnings(entries, skip=frozenset({poison.event}))
    assert await stored_earnings(redis_client, list(expected)) == expected
    assert sum(handler.calls.values()) == added + 2

    # the bug fixed, the dead letter is replayed: counted once, and gone from the stream
    handler.fail.clear()
    assert await replay_dead_letters(redis_client, "earnings", handler) == (1, 0)
    assert await replay_dead_letters(redis_client, "earnings", handler) == (0, 0)
    assert await redis_client.xlen(DEAD) == 0
    expected = expected_earnings(entries)
    assert await stored_earnings(redis_client, list(expected)) == expected


async def test_a_failure_is_retried_after_claim_idle_and_then_acked(
    redis_client: aioredis.Redis,
) -> None:
    await settle(await new_wallet(redis_client), 6, extras=False)
    entries = await ledger(redis_client)
    flaky = entries[-1]
    handler = Recorder(redis_client, fail={flaky.event: 2})
    consumer = LedgerConsumer(
        redis_client, "earnings", "c1", handler, block_ms=10, claim_idle_ms=200, max_deliveries=3
    )
    await consumer.run_once()
    assert handler.calls[flaky.event] == 1
    assert await pending(redis_client, "earnings") == 1
    await consumer.run_once()  # not idle long enough yet: left alone
    assert handler.calls[flaky.event] == 1
    deadline = time.monotonic() + 5
    while await pending(redis_client, "earnings"):
        assert time.monotonic() < deadline
        await consumer.run_once()
        await asyncio.sleep(0.05)
    assert handler.calls[flaky.event] == 3
    assert await redis_client.exists(DEAD) == 0
    expected = expected_earnings(entries)
    assert await stored_earnings(redis_client, list(expected)) == expected


async def test_a_handler_that_hangs_is_cancelled_and_retried(
    redis_client: aioredis.Redis,
) -> None:
    await settle(await new_wallet(redis_client), 2, extras=False)
    entries = await ledger(redis_client)
    stuck = entries[0]
    handler = Recorder(redis_client)

    async def hangs_once(entry: LedgerEntry) -> None:
        if entry.event == stuck.event and not handler.calls[entry.event]:
            handler.calls[entry.event] += 1
            await asyncio.sleep(3600)
        await handler(entry)

    consumer = LedgerConsumer(
        redis_client, "earnings", "c1", hangs_once, block_ms=10, claim_idle_ms=150
    )
    started = time.monotonic()
    async with asyncio.timeout(5):  # fails, rather than hangs, if the handler is not cut
        await consumer.run_once()
    assert 0.1 < time.monotonic() - started < 1.0  # cancelled at claim_idle_ms
    assert await pending(redis_client, "earnings") == 1
    deadline = time.monotonic() + 5
    while await pending(redis_client, "earnings"):
        assert time.monotonic() < deadline
        await consumer.run_once()
        await asyncio.sleep(0.05)
    assert handler.calls == Counter({e.event: 1 for e in entries}) + Counter({stuck.event: 1})
    assert handler.earnings.counted == sum(1 for e in entries if e.kind == "gift")


async def test_malformed_entries_are_dead_lettered_at_once(redis_client: aioredis.Redis) -> None:
    wallet = await new_wallet(redis_client)
    added = await settle(wallet, 4, extras=False, prefix="a")
    not_json = text(await redis_client.xadd(keys.LEDGER, {"data": b"not json"}))
    no_data = text(await redis_client.xadd(keys.LEDGER, {"other": b"x"}))
    tip = orjson.dumps({"event": "e-tip", "kind": "tip", "ts": 1})
    unknown = text(await redis_client.xadd(keys.LEDGER, {"data": tip}))
    added += await settle(wallet, 4, extras=False, prefix="b")
    handler = Recorder(redis_client)
    consumer = LedgerConsumer(
        redis_client, "earnings", "c1", handler, block_ms=10, max_deliveries=5
    )
    await drain(consumer)
    letters = {d["stream_id"]: d for d in await dead_letters(redis_client)}
    assert set(letters) == {not_json, no_data, unknown}
    assert all(d["deliveries"] == "1" and d["group"] == "earnings" for d in letters.values())
    assert "`data` is not JSON" in letters[not_json]["reason"]
    assert letters[not_json]["data"] == "not json"
    assert "no `data` field" in letters[no_data]["reason"]
    assert orjson.loads(letters[no_data]["data"]) == {"other": "x"}
    assert "unknown kind 'tip'" in letters[unknown]["reason"]
    assert "e-tip" not in handler.calls and sum(handler.calls.values()) == added
    assert await pending(redis_client, "earnings") == 0
    expected = expected_earnings(await _good_entries(redis_client))
    assert await stored_earnings(redis_client, list(expected)) == expected


async def _good_entries(redis: aioredis.Redis) -> list[LedgerEntry]:
    from giftstream.server.ledger.entries import LedgerError, parse_entry

    good = []
    entries: Any = await redis.xrange(keys.LEDGER)
    for stream_id, fields in entries:
        try:
            good.append(parse_entry(text(stream_id), fields))
        except LedgerError:
            pass
    return good


async def test_an_entry_whose_consumers_keep_dying_is_dead_lettered_unhandled(
    redis_client: aioredis.Redis,
) -> None:
    await settle(await new_wallet(redis_client), 2, extras=False)
    entries = await ledger(redis_client)
    victim = entries[0]
    consumer = LedgerConsumer(
        redis_client,
        "earnings",
        "c1",
        Recorder(redis_client),
        block_ms=10,
        claim_idle_ms=20,
        max_deliveries=3,
    )
    await consumer.ensure_group()
    # consumers that read it and died, three times over: the delivery count says so
    await redis_client.xreadgroup("earnings", "ghost", {keys.LEDGER: ">"}, count=1)
    await redis_client.xclaim(keys.LEDGER, "earnings", "ghost", 0, [victim.id], retrycount=3)
    await asyncio.sleep(0.05)
    handler = consumer.handler
    assert isinstance(handler, Recorder)
    await drain(consumer)
    (letter,) = await dead_letters(redis_client)
    assert letter["stream_id"] == victim.id and letter["deliveries"] == "4"
    assert "without an ack" in letter["reason"]
    assert victim.event not in handler.calls
    assert handler.calls == Counter({e.event: 1 for e in entries[1:]})


async def test_the_group_is_made_once_and_reads_from_the_first_entry(
    redis_client: aioredis.Redis,
) -> None:
    handler = Recorder(redis_client)
    consumer = LedgerConsumer(redis_client, "g", "c1", handler, block_ms=10)
    await consumer.ensure_group()  # no stream yet: MKSTREAM makes it
    assert text(await redis_client.type(keys.LEDGER)) == "stream"
    await LedgerConsumer(redis_client, "g", "c2", handler, block_ms=10).ensure_group()
    assert len(await redis_client.xinfo_groups(keys.LEDGER)) == 1
    added = await settle(await new_wallet(redis_client), 3, extras=False)
    late = LedgerConsumer(redis_client, "late", "c1", Recorder(redis_client), block_ms=10)
    assert await drain(late) == added  # made after the entries, and still reads them all
    assert await drain(consumer) == added


def test_consumer_settings_are_checked(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    for bad in ({"batch": 0}, {"max_deliveries": 0}, {"claim_idle_ms": 1.5}):
        with pytest.raises(ValueError):
            LedgerConsumer(client, "g", "c", Recorder(client), **bad)
    assert set(HANDLERS) == {"earnings", "checkpoint"}


async def test_run_consumer_unknown_handler_or_no_redis(redis_url: str) -> None:
    assert await run_consumer(redis_url, "g", "c", "nope") == 2
    assert await run_consumer(f"redis://127.0.0.1:{free_port()}", "g", "c") == 1


CHILD = """
import asyncio, logging, sys
from giftstream.server.ledger.consumer import run_consumer
logging.basicConfig(level="INFO", stream=sys.stderr)
sys.exit(asyncio.run(run_consumer(sys.argv[1], "earnings", "proc-1", block_ms=100)))
"""


async def test_run_consumer_process_consumes_until_sigterm(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, redis_url, stderr=asyncio.subprocess.PIPE, cwd=os.getcwd()
    )
    assert proc.stderr is not None
    try:
        async with asyncio.timeout(20):
            while b"consumer ready" not in (line := await proc.stderr.readline()):
                assert line, "the consumer process exited before it was ready"
        await settle(await new_wallet(redis_client), 10)
        expected = expected_earnings(await ledger(redis_client))

        async def caught_up() -> bool:
            return await stored_earnings(redis_client, list(expected)) == expected

        await until(caught_up, what="the process counted every gift")
        await until(lambda: _no_pending(redis_client, "earnings"), what="acks")
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            await proc.stderr.read()  # to its end, so the pipe never fills
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_the_lag_gauge_is_set_while_the_consumer_is_busy(
    redis_client: aioredis.Redis,
) -> None:
    """A consumer that always has work still sets its lag gauge (at least once a second),
    not only once it runs out of entries: falling behind shows while it happens."""
    added = await settle(await new_wallet(redis_client), 150)
    handled = 0

    async def slow(entry: LedgerEntry) -> None:
        nonlocal handled
        await asyncio.sleep(0.005)
        handled += 1

    metrics = ConsumerMetrics()
    consumer = LedgerConsumer(
        redis_client, "slow", "c1", slow, batch=5, block_ms=10, metrics=metrics
    )

    def lag() -> float | None:
        return metrics.registry.get_sample_value(
            "giftstream_consumer_lag_entries", {"group": "slow"}
        )

    async with consumer:

        async def gauge_set() -> bool:
            return bool(lag())

        await until(gauge_set, 10, "the lag gauge set")
        busy_at = handled
        assert busy_at < added  # set while entries were still waiting
        assert added - busy_at <= (lag() or 0) <= added  # what was not acked when it was set

        async def idle() -> bool:
            return lag() == 0

        await until(idle, 20, "the consumer catching up")
    assert handled == added


async def test_group_lag_after_deletions_counts_a_bounded_number(
    redis_client: aioredis.Redis,
) -> None:
    """Entries deleted behind a group leave Redis unable to tell its lag; the count that
    replaces it reads at most UNREAD_COUNT_CAP entries, exact below the cap, a floor above."""
    stream = "lagtest:ledger"
    await redis_client.xgroup_create(stream, "g", id="0", mkstream=True)
    pipe = redis_client.pipeline(transaction=False)
    for i in range(UNREAD_COUNT_CAP + 50):
        pipe.xadd(stream, {"data": str(i)})
    ids = await pipe.execute()
    await redis_client.xreadgroup("g", "c", {stream: ">"}, count=3)  # 3 pending
    await redis_client.xdel(stream, ids[10])  # a hole after what the group has read
    (info,) = await redis_client.xinfo_groups(stream)
    assert info.get("lag") is None  # Redis no longer knows
    assert await group_lag(redis_client, stream, "g") == 3 + UNREAD_COUNT_CAP
    await redis_client.xdel(stream, *ids[20:])  # 3 pending, 16 unread left (ids 3-19 but 10)
    assert await group_lag(redis_client, stream, "g") == 3 + 16  # exact below the cap
