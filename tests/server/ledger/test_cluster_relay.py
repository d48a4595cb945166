"""The JetStream relay over a Redis Cluster's ledgers: one lease per partition's ledger, relay
processes splitting them live by fair shares (one joining takes its share, one killed -9
leaves its ledgers to the others), every entry once in the one JetStream stream, each ledger
in its order. Skipped without NATS, like test_relay."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading
import time
from typing import Any

import orjson

from giftstream.server.ledger.entries import stream_id_key
from giftstream.server.ledger.relay.config import RelayConfig
from giftstream.server.ledger.relay.lag import relay_lag
from giftstream.server.ledger.relay.status import read_status
from giftstream.server.ledger.relay.worker import Relay
from giftstream.server.money import keys
from tests.cluster import RedisClusterProcesses
from tests.processes import run_cli
from tests.server.ledger.cluster_ledger import ClusterLedger, users_by_partition
from tests.server.ledger.test_relay import (  # noqa: F401 (fixtures)
    jetstream_messages,
    nats_server,
    relay_config,
)
from tests.server.ledger.worker_process import WorkerProcess

LEDGERS = 16  # the default partition count, over 3 masters


async def fill(url: str, rounds: int, start: int = 0, stop: threading.Event | None = None) -> int:
    """Each round: a purchase in every partition and a gift across partitions; stops early
    when `stop` is set. Returns the rounds written."""
    ledger = await ClusterLedger.open(url, LEDGERS)
    try:
        users = users_by_partition(ledger.space, LEDGERS)
        for n in range(start, start + rounds):
            if stop is not None and stop.wait(0.02):  # a steady trickle, not a flood
                return n - start
            for i, user in enumerate(users):
                await ledger.purchase(user, 10)
                await ledger.gift(user, users[(i + n + 1) % len(users)], 4)
        return rounds
    finally:
        await ledger.close()


class Writer:
    """Ledger entries appended in a thread of its own while the relays run (at most
    `rounds`, until stopped)."""

    def __init__(self, url: str, rounds: int, start: int) -> None:
        self.stop = threading.Event()
        self.written = 0
        self._thread = threading.Thread(target=self._run, args=(url, rounds, start))
        self._thread.start()

    def _run(self, url: str, rounds: int, start: int) -> None:
        self.written = asyncio.run(fill(url, rounds, start, self.stop))

    def finish(self) -> int:
        self.stop.set()
        self._thread.join(60)
        assert not self._thread.is_alive(), "the writer did not stop"
        return self.written


async def ledgers_of(url: str) -> dict[str, list[str]]:
    """Each ledger's event ids in its order."""
    ledger = await ClusterLedger.open(url, LEDGERS)
    try:
        events: dict[str, list[str]] = {}
        for key in ledger.space.ledgers():
            page = await ledger.redis.xrange(key) or []
            events[key] = [orjson.loads((fields or {})[b"data"])["event"] for _, fields in page]
        return events
    finally:
        await ledger.close()


async def lag_of(url: str) -> int:
    ledger = await ClusterLedger.open(url, LEDGERS)
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


def holdings(url: str) -> dict[str, int]:
    """How many leases each relay process holds, by pid, from `relay --status`'s data."""
    status = asyncio.run(read_status(url, keys.LEDGER))
    assert status is not None
    return {relay.split(":")[1]: len(each["ledgers"]) for relay, each in status["relays"].items()}


def wait_for_holdings(url: str, wanted: dict[str, int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (held := holdings(url)) != wanted:
        assert time.monotonic() < deadline, f"relays hold {held}, not {wanted}"
        time.sleep(0.2)


def test_relay_processes_split_the_ledgers_live_and_publish_each_entry_once(
    cluster_url: str,
    relay_config: RelayConfig,  # noqa: F811 (the fixture imported above)
) -> None:
    asyncio.run(fill(cluster_url, 5))
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
        "2000",
    ]
    relays: list[WorkerProcess] = []
    writer = Writer(cluster_url, rounds=3000, start=5)
    try:
        relays.append(WorkerProcess(command))
        relays[0].wait_for_log("took the relay lease", 30)
        relays.append(WorkerProcess(command))
        pids = [str(relay.proc.pid) for relay in relays]
        wait_for_holdings(cluster_url, {pids[0]: 8, pids[1]: 8}, 60)

        relays.append(WorkerProcess(command))  # joins: the others hand it its share
        pids.append(str(relays[2].proc.pid))
        wait_for_holdings(cluster_url, dict(zip(pids, (6, 5, 5), strict=True)), 60)
        assert any(relay.said("handed the relay lease") for relay in relays[:2])

        victim = relays[0]  # killed -9: its heartbeat and its leases expire
        victim.proc.kill()
        victim.proc.wait()
        wait_for_holdings(cluster_url, {pids[1]: 8, pids[2]: 8}, 60)
        written = writer.finish()
        assert written > 0, "no entries appended while the relays ran"
        wait_relayed(cluster_url, 90)

        events = asyncio.run(ledgers_of(cluster_url))
        sent = asyncio.run(jetstream_messages(relay_config))
        ids = [msg_id for msg_id, _, _ in sent]
        copies = collections.Counter(ids)
        assert [msg_id for msg_id, n in copies.items() if n > 1] == [], "published twice"
        in_ledgers = [e for each in events.values() for e in each]
        assert len(ids) == len(in_ledgers) and set(ids) == set(in_ledgers)
        position = {msg_id: n for n, msg_id in enumerate(ids)}
        for key, in_ledger in events.items():
            assert in_ledger, f"{key} is empty: the workload missed a partition"
            assert sorted(in_ledger, key=position.__getitem__) == in_ledger, f"{key} reordered"
        ledger_of = {e: key for key, each in events.items() for e in each}
        per_subject: dict[tuple[str, str], list[tuple[int, int]]] = collections.defaultdict(list)
        for msg_id, stream_id, subject in sent:
            per_subject[(ledger_of[msg_id], subject)].append(stream_id_key(stream_id))
        for (key, subject), stream_ids in per_subject.items():
            assert stream_ids == sorted(stream_ids), f"{key} reordered on {subject}"
        assert {subject for _, subject in per_subject} == {
            f"{relay_config.subject_prefix}.purchase",
            f"{relay_config.subject_prefix}.gift",
        }

        status = status_of(cluster_url)  # the CLI's own view: who holds which ledger
        assert status["entries"] == 0 and status["leases_held"] == LEDGERS
        assert sorted(
            ledger for each in status["relays"].values() for ledger in each["ledgers"]
        ) == sorted(events)
        for relay in relays[1:]:
            assert relay.stop() == 0
            assert relay.said("released the relay lease")
        status = status_of(cluster_url)
        assert status["leases_held"] == 0 and status["relays"] == {}
    finally:
        writer.stop.set()
        for relay in relays:
            relay.kill()
        writer.finish()


async def test_a_relay_publishes_nothing_its_ledgers_replicas_do_not_hold(
    cluster_url: str,
    redis_cluster: RedisClusterProcesses,
    relay_config: RelayConfig,  # noqa: F811 (a fixture)
) -> None:
    """An entry a master has but its replica does not could vanish in a failover; published,
    JetStream would keep it (and the gift's retry, a new event, would land beside it). So with
    the ledger's replica frozen the relay holds back, and publishes once it is back."""
    ledger_writer = await ClusterLedger.open(cluster_url, LEDGERS)
    rc = ledger_writer.redis
    try:
        user = users_by_partition(ledger_writer.space, 1)[0]
        await ledger_writer.purchase(user, 70)
        ledger = ledger_writer.space.ledger_of(user)
        replica = redis_cluster.replicas_of(redis_cluster.node_of(rc, ledger))[0]
        relay = Relay(rc, dataclasses.replace(relay_config, ledger_key=ledger))
        stop = asyncio.Event()
        with replica.frozen():
            task = asyncio.create_task(relay.run(stop))
            held_back = relay.metrics.errors.labels("replicas")
            deadline = time.monotonic() + 60
            while held_back._value.get() < 1:
                assert time.monotonic() < deadline, "the relay never waited for the replica"
                await asyncio.sleep(0.05)
            assert relay.metrics.published._value.get() == 0
        deadline = time.monotonic() + 60
        while relay.metrics.published._value.get() < 1:
            assert time.monotonic() < deadline, "the relay never published after the thaw"
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(task, 30)
        assert len(await jetstream_messages(relay.config)) == 1
    finally:
        await ledger_writer.close()
        redis_cluster.wait_ok()
