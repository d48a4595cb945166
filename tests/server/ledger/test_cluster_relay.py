"""The JetStream relay over a Redis Cluster's ledgers: one lease per partition's ledger, relay
processes sharing them (one killed -9 hands its ledgers to the other), every entry once in
the one JetStream stream, each ledger in its order. Skipped without NATS, like test_relay."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson

from giftstream.server.ledger.relay.config import RelayConfig
from giftstream.server.ledger.relay.lag import relay_lag
from tests.processes import run_cli
from tests.server.ledger.cluster_ledger import PARTITIONS, ClusterLedger, users_by_partition
from tests.server.ledger.test_relay import (  # noqa: F401 (fixtures)
    jetstream_messages,
    nats_server,
    relay_config,
)
from tests.server.ledger.worker_process import WorkerProcess


async def fill(url: str, rounds: int, start: int = 0) -> None:
    """Each round: a purchase in every partition and a gift across partitions."""
    ledger = await ClusterLedger.open(url)
    try:
        users = users_by_partition(ledger.space, PARTITIONS)
        for n in range(start, start + rounds):
            for i, user in enumerate(users):
                await ledger.purchase(user, 10)
                await ledger.gift(user, users[(i + n + 1) % len(users)], 4)
    finally:
        await ledger.close()


async def ledgers_of(url: str) -> dict[str, list[str]]:
    """Each ledger's event ids in its order."""
    ledger = await ClusterLedger.open(url)
    try:
        events: dict[str, list[str]] = {}
        for key in ledger.space.ledgers():
            page = await ledger.redis.xrange(key) or []
            events[key] = [orjson.loads((fields or {})[b"data"])["event"] for _, fields in page]
        return events
    finally:
        await ledger.close()


async def lag_of(url: str) -> int:
    ledger = await ClusterLedger.open(url)
    try:
        return sum([(await relay_lag(ledger.redis, key)).entries for key in ledger.space.ledgers()])
    finally:
        await ledger.close()


def wait_relayed(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (left := asyncio.run(lag_of(url))) > 0:
        assert time.monotonic() < deadline, f"{left} entries still not relayed"
        time.sleep(0.1)


def status_of(url: str) -> dict[str, Any]:
    result = run_cli("relay", "--status", "--redis-url", url)
    assert result.returncode == 0, result.stderr
    parsed: dict[str, Any] = orjson.loads(result.stdout)
    return parsed


def test_relay_processes_share_the_ledgers_and_publish_each_entry_once(
    cluster_url: str,
    relay_config: RelayConfig,  # noqa: F811 (the fixture imported above)
) -> None:
    asyncio.run(fill(cluster_url, 20))
    command = [
        "relay",
        "--nats",
        relay_config.nats_url,
        "--redis-url",
        cluster_url,
        "--stream",
        relay_config.stream,
        "--subject-prefix",
        relay_config.subject_prefix,
        "--lease-ttl-ms",
        "1000",
    ]
    first = WorkerProcess(command)
    second: WorkerProcess | None = None
    try:
        first.wait_for_log("took the relay lease", 30)
        second = WorkerProcess(command)
        second.wait_for_log("another relay holds the lease, waiting", 30)
        wait_relayed(cluster_url, 60)
        status = status_of(cluster_url)
        assert status["entries"] == 0 and status["leases_held"] == PARTITIONS
        ledgers = status["ledgers"]
        assert isinstance(ledgers, dict) and len(ledgers) == PARTITIONS
        asyncio.run(fill(cluster_url, 20, start=20))  # while it relays: then killed -9
        first.proc.kill()
        first.proc.wait()
        second.wait_for_log("took the relay lease", 30)
        asyncio.run(fill(cluster_url, 10, start=40))
        wait_relayed(cluster_url, 60)
        holders = {
            each["lease"]["holder"].split(":")[1]
            for each in status_of(cluster_url)["ledgers"].values()
        }
        assert holders == {str(second.proc.pid)}

        events = asyncio.run(ledgers_of(cluster_url))
        sent = [msg_id for msg_id, _, _ in asyncio.run(jetstream_messages(relay_config))]
        assert len(sent) == len(set(sent)), "an entry published twice"
        assert sorted(sent) == sorted(e for each in events.values() for e in each)
        position = {msg_id: n for n, msg_id in enumerate(sent)}
        for key, in_ledger in events.items():
            assert in_ledger, f"{key} is empty: the workload missed a partition"
            assert sorted(in_ledger, key=position.__getitem__) == in_ledger, f"{key} reordered"
        assert second.stop() == 0
        assert second.said("released the relay lease")
        assert status_of(cluster_url)["leases_held"] == 0
    finally:
        first.kill()
        if second is not None:
            second.kill()
