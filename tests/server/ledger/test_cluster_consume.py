"""`giftstream consume` over a Redis Cluster's ledgers, as real processes: one process reads
every partition's ledger in its group (each XREADGROUP on its own slot), the earnings count
each gift once, a poison entry goes to its own ledger's dead letters, the checkpoint group
folds every ledger so trim can cut each, and the audit passes from the checkpoints."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

from giftstream.server.ledger.audit import audit
from giftstream.server.ledger.consumer import group_lag
from giftstream.server.ledger.earnings import earnings
from giftstream.server.ledger.trim import trim_all
from giftstream.server.money import keys
from tests.server.ledger.cluster_ledger import TS, ClusterLedger, users_by_partition
from tests.server.ledger.worker_process import WorkerProcess


async def wait_consumed(ledger: ClusterLedger, group: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        lags = [await group_lag(ledger.redis, key, group) for key in ledger.space.ledgers()]
        if not any(lags):
            return
        assert time.monotonic() < deadline, f"group {group} still lags: {lags}"
        await asyncio.sleep(0.1)  # polling a condition with a deadline


def consume(url: str, group: str, handler: str) -> WorkerProcess:
    return WorkerProcess(
        [
            "consume",
            "--redis-url",
            url,
            "--group",
            group,
            "--handler",
            handler,
            "--consumer",
            f"{group}-1",
            "--block-ms",
            "100",
            "--claim-idle-ms",
            "200",
            "--max-deliveries",
            "2",
        ]
    )


async def test_one_process_consumes_every_ledger(cluster_url: str) -> None:
    ledger = await ClusterLedger.open(cluster_url)
    workers: list[WorkerProcess] = []
    try:
        users = users_by_partition(ledger.space, ledger.space.partitions)
        diamonds: Counter[str] = Counter()
        for n, user in enumerate(users):
            await ledger.purchase(user, 100)
            for k in range(1, 3):
                creator = users[(n + k) % len(users)]
                await ledger.gift(user, creator, 10 * k)
                diamonds[creator] += 10 * k // 2
        poisoned = ledger.space.ledger_of(users[3])
        poison = keys.text(await ledger.redis.xadd(poisoned, {"data": b"not json"}))

        workers = [
            consume(cluster_url, "earnings", "earnings"),
            consume(cluster_url, "checkpoint", "checkpoint"),
        ]
        for worker in workers:
            worker.wait_for_log("consumer ready", 30)
            assert worker.said(f"{ledger.space.partitions} partitions' ledgers")
        await wait_consumed(ledger, "earnings", 60)
        await wait_consumed(ledger, "checkpoint", 60)

        day = keys.utc_day(TS)
        for creator, expected in diamonds.items():
            counted = await earnings(ledger.redis, creator, day, ledger.space)
            assert (counted["diamonds"], counted["gifts"]) == (expected, 2), creator
        dead = await ledger.redis.xrange(keys.dead_letters(poisoned)) or []
        assert [keys.text((fields or {})[b"stream_id"]) for _, fields in dead] == [poison] * 2
        assert {keys.text((fields or {})[b"group"]) for _, fields in dead} == {
            "earnings",
            "checkpoint",
        }

        for key in ledger.space.ledgers():
            if key != poisoned:  # the poison entry leaves its breach in its checkpoint
                assert await ledger.redis.hget(keys.checkpoint(key), "last_id") is not None
        done = await trim_all(ledger.redis, ledger.space, keep_min_entries=0)
        assert sum(each.removed for each in done.values()) == len(users) * 3 + 1
        report = await audit(ledger.redis, keyspace=ledger.space)
        assert report.replayed == 0 and report.entries == len(users) * 3 + 1
        assert len(report.breaches) == 1
        assert report.breaches[0].startswith(f"entry {poison}: `data` is not JSON")
        for worker in workers:
            assert worker.stop() == 0
    finally:
        for worker in workers:
            worker.kill()
        await ledger.close()
