"""The JetStream relay against a real nats-server: every ledger entry arrives exactly once,
through kill -9 between publish and ack, NATS going away, and restarts."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import nats
import orjson
import pytest
import redis.asyncio as aioredis
from nats.js import api
from nats.js.errors import APIError

from giftstream.server.embedded_redis import free_port
from giftstream.server.ledger.audit import audit
from giftstream.server.ledger.checkpoint import GROUP as CHECKPOINT_GROUP
from giftstream.server.ledger.checkpoint import CheckpointFolder
from giftstream.server.ledger.consumer import LedgerConsumer
from giftstream.server.ledger.earnings import EarningsConsumer
from giftstream.server.ledger.entries import read_entries
from giftstream.server.ledger.lease import Lease, lease_holder
from giftstream.server.ledger.relay.config import CONSUMER, GROUP, RelayConfig, lease_key
from giftstream.server.ledger.relay.jetstream import STREAM_ID_HEADER, JetStream, Message
from giftstream.server.ledger.relay.lag import relay_lag
from giftstream.server.ledger.relay.worker import Relay, RelayMetrics
from giftstream.server.ledger.trim import trim_ledger
from giftstream.server.money import keys
from giftstream.server.money.catalog import load_catalog
from giftstream.server.money.wallet import Wallet
from tests.processes import GIFTSTREAM, run_cli
from tests.server.ledger.ledger_workload import until
from tests.server.ledger.relay_throughput import add_gift_entries, gift_entry
from tests.server.ledger.worker_process import WorkerProcess


@dataclass
class NatsServer:
    """A nats-server with JetStream we started (restartable), or the machine's own."""

    url: str
    process: subprocess.Popen[bytes] | None = None
    command: list[str] | None = None

    def stop(self) -> None:
        assert self.process is not None, "cannot stop a NATS server we did not start"
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(10)

    def start(self) -> None:
        assert self.command is not None
        self.process = subprocess.Popen(
            self.command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        _wait_for_port(self.url, 10)


def _wait_for_port(url: str, timeout: float) -> None:
    host, port = url.removeprefix("nats://").rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, int(port)), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nats-server did not listen on {url}")


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    binary = shutil.which("nats-server")
    if binary is not None:
        port = free_port()
        server = NatsServer(
            url=f"nats://127.0.0.1:{port}",
            command=[
                binary,
                "-a",
                "127.0.0.1",
                "-p",
                str(port),
                "-js",
                "-sd",
                str(tmp_path / "jetstream"),
            ],
        )
        server.start()
        yield server
        if server.process is not None and server.process.poll() is None:
            server.stop()
    elif _reachable("127.0.0.1", 4222):
        yield NatsServer(url="nats://127.0.0.1:4222")
    else:
        pytest.skip("JetStream relay tests need nats-server on PATH or NATS on 127.0.0.1:4222")


@pytest.fixture
def relay_config(nats_server: NatsServer) -> RelayConfig:
    """A stream and subjects of this test's own, so tests never see each other's messages."""
    tag = uuid.uuid4().hex[:10]
    return RelayConfig(
        nats_url=nats_server.url,
        stream=f"GSTEST_{tag}",
        subject_prefix=f"gstest{tag}.ledger",
        block_ms=100,
    )


@pytest.fixture
async def wallet(redis_client: aioredis.Redis) -> Wallet:
    wallet = Wallet(redis_client, load_catalog().economics)
    await wallet.load_scripts()
    return wallet


async def settle(wallet: Wallet, n: int, prefix: str = "r") -> None:
    """`n` ledger entries: purchases, and gifts from the buyers."""
    catalog = load_catalog()
    package, gift = catalog.packages["coins_70"], catalog.gifts["heart"]
    for i in range(0, n, 2):
        user = f"{prefix}user{i}"
        await wallet.purchase(receipt=f"{prefix}-rc-{i}", user=user, package=package, adult=True)
        if i + 1 < n:
            key = f"{prefix}-key-{i:06d}"
            await wallet.send_gift(
                sender=user,
                adult=True,
                creator="cara",
                room="cara",
                gift=gift,
                count=1,
                key=key,
            )


async def ledger_events(redis_client: aioredis.Redis) -> list[tuple[str, str]]:
    return [(e.id, e.event) async for e in read_entries(redis_client)]


async def jetstream_messages(config: RelayConfig) -> list[tuple[str, str, str]]:
    """(Nats-Msg-Id, stream id header, subject) of every message in the test's stream."""
    nc = await nats.connect(config.nats_url)
    try:
        jsm = nc.jsm()
        info = await jsm.stream_info(config.stream)
        messages = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await jsm.get_msg(config.stream, seq=seq)
            headers = msg.headers or {}
            messages.append((headers["Nats-Msg-Id"], headers[STREAM_ID_HEADER], str(msg.subject)))
        return messages
    finally:
        await nc.close()


async def wait_until_relayed(redis_client: aioredis.Redis, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (await relay_lag(redis_client)).entries:
        assert time.monotonic() < deadline, f"relay still lags: {await relay_lag(redis_client)}"
        await asyncio.sleep(0.1)


async def relay_until_caught_up(redis_client: aioredis.Redis, relay: Relay) -> None:
    """Run `relay` until it has nothing left to relay (20 s at most), then stop it."""
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    try:
        await wait_until_relayed(redis_client, 20)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


def assert_exactly_once(ledger: list[tuple[str, str]], sent: list[tuple[str, str, str]]) -> None:
    counts = Counter(msg_id for msg_id, _, _ in sent)
    assert [m for m, n in counts.items() if n > 1] == []
    assert [msg_id for msg_id, _, _ in sent] == [event for _, event in ledger]  # all, in order
    assert [stream_id for _, stream_id, _ in sent] == [stream_id for stream_id, _ in ledger]


@pytest.fixture
async def running_relay(
    redis_client: aioredis.Redis, relay_config: RelayConfig
) -> AsyncIterator[Relay]:
    stop = asyncio.Event()
    relay = Relay(redis_client, relay_config)
    task = asyncio.create_task(relay.run(stop))
    yield relay
    stop.set()
    await asyncio.wait_for(task, 10)


async def test_every_entry_once_in_order_by_kind(
    redis_client: aioredis.Redis, wallet: Wallet, relay_config: RelayConfig, running_relay: Any
) -> None:
    await settle(wallet, 200)
    await wait_until_relayed(redis_client, 20)
    sent = await jetstream_messages(relay_config)
    assert_exactly_once(await ledger_events(redis_client), sent)
    kinds = Counter(subject.rsplit(".", 1)[1] for _, _, subject in sent)
    assert kinds == {"purchase": 100, "gift": 100}
    lag = await relay_lag(redis_client)
    assert lag.entries == 0 and lag.oldest_age_s == 0


class StoreThenCrash(JetStream):
    """JetStream as a relay that dies once it has stored `crash_after` entries sees it: the
    batch that reaches that count is published only up to it, then the relay is gone."""

    def __init__(self, config: RelayConfig, *, crash_after: int) -> None:
        super().__init__(config)
        self.crash_after = crash_after

    async def publish(self, batch: list[Message]) -> tuple[int, Exception | None]:
        stored, error = await super().publish(batch[: self.crash_after])
        assert error is None, error
        self.crash_after -= stored
        if self.crash_after == 0:
            raise _Crash
        return stored, error


class CrashAfterPublish(Relay):
    """A relay that dies once JetStream has stored `crash_after` entries, before Redis heard
    of the last batch: the batch that reaches that count is published only up to it."""

    def __init__(self, redis: aioredis.Redis, config: RelayConfig, *, crash_after: int) -> None:
        super().__init__(redis, config, jetstream=StoreThenCrash(config, crash_after=crash_after))

    async def start(self) -> None:
        """What run() does before relaying: the group, the lease, JetStream's last message."""
        await self._ensure_group()
        assert await self.lease.acquire()
        await self._open()

    async def crashed(self) -> None:
        """Dead: NATS gone, and the lease released (a dead process's would expire)."""
        await self.jetstream.close()
        await self.lease.release()


class _Crash(Exception):
    pass


async def test_crash_between_publish_and_ack_never_publishes_twice(
    redis_client: aioredis.Redis, wallet: Wallet, relay_config: RelayConfig
) -> None:
    """Even past JetStream's duplicate window, a restarted relay skips what it published."""
    config = replace(relay_config, duplicate_window_s=0.5, batch=16)
    await settle(wallet, 120)
    rng = random.Random(7)
    for _ in range(8):
        relay = CrashAfterPublish(redis_client, config, crash_after=rng.randint(1, 20))
        with pytest.raises(_Crash):
            await relay.start()
            for _ in range(50):  # it crashes within its first 20 publishes
                await relay.relay_once()
        await relay.crashed()
        await asyncio.sleep(0.6)  # past the duplicate window: dedupe cannot save us
    stop = asyncio.Event()
    finisher = Relay(redis_client, config)
    task = asyncio.create_task(finisher.run(stop))
    await wait_until_relayed(redis_client, 20)
    stop.set()
    await task
    # a crash left a published, unacked entry
    assert reading(finisher.metrics, "giftstream_relay_already_published_total") >= 1
    assert_exactly_once(await ledger_events(redis_client), await jetstream_messages(config))


async def lag_below(redis_url: str, entries: int, timeout: float) -> int:
    """Poll until the relay has relayed something more: its lag below `entries`; the lag."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + timeout
        while (lag := (await relay_lag(client)).entries) >= entries:
            assert time.monotonic() < deadline, f"the relay did not get below {entries}"
            await asyncio.sleep(0.005)
        return lag
    finally:
        await client.aclose()


def test_kill_9_relay_process_many_times(
    redis_url: str, relay_config: RelayConfig, tmp_path: Path
) -> None:
    """The real `giftstream relay` process, killed -9 twelve times while it relays: each
    time once it has relayed something, at a random moment of its publish-then-ack cycle
    (with a short lease, which each killed relay leaves behind for the next to wait out).
    Entries shaped like gifts, added directly: the relay moves a few thousand per 0.1 s."""
    total = 30_000

    async def fill() -> None:
        client = aioredis.Redis.from_url(redis_url)
        await add_gift_entries(client, total)
        await client.aclose()

    asyncio.run(fill())
    command = [
        *GIFTSTREAM,
        "relay",
        "--nats",
        relay_config.nats_url,
        "--redis-url",
        redis_url,
        "--stream",
        relay_config.stream,
        "--subject-prefix",
        relay_config.subject_prefix,
        "--log-level",
        "WARNING",
        "--lease-ttl-ms",
        "300",
    ]
    rng = random.Random(11)
    left = [total]  # the relay's lag after each kill
    for _ in range(12):
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            asyncio.run(lag_below(redis_url, left[-1], timeout=30))  # it is relaying
            time.sleep(rng.uniform(0, 0.02))  # a relay moves a batch of 256 every ~15 ms
        finally:
            proc.kill()
            proc.wait()
        left.append(asyncio.run(relay_lag_of(redis_url)))
    # every kill landed while the relay was under way: it moved on, and had more to do
    assert all(a > b > 0 for a, b in itertools.pairwise(left)), left
    status = run_cli("relay", "--status", "--redis-url", redis_url)
    assert status.returncode == 0 and status.stdout.startswith(f'{{"entries":{left[-1]},')
    metrics_port = free_port()
    proc = subprocess.Popen(
        [*command, "--metrics-port", str(metrics_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        async def check() -> None:
            client = aioredis.Redis.from_url(redis_url)
            await wait_until_relayed(client, 60)
            assert_exactly_once(await ledger_events(client), await jetstream_messages(relay_config))
            await client.aclose()
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            deadline = time.monotonic() + 10
            async with aiohttp.ClientSession() as http:
                while True:  # the gauges are refreshed once the relay finds nothing new
                    async with http.get(url) as response:
                        metrics = await response.text()
                    if "giftstream_relay_lag_entries 0.0" in metrics:
                        break
                    assert time.monotonic() < deadline, metrics
                    await asyncio.sleep(0.05)
            assert "giftstream_relay_oldest_age_seconds 0.0" in metrics
            # what the kills left: each entry published, or found in JetStream and acked
            published = _sample(metrics, "giftstream_relay_published_total")
            skipped = _sample(metrics, "giftstream_relay_already_published_total")
            assert published + skipped == left[-1]

        asyncio.run(check())
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0


async def relay_lag_of(redis_url: str) -> int:
    client = aioredis.Redis.from_url(redis_url)
    try:
        return (await relay_lag(client)).entries
    finally:
        await client.aclose()


def reading(metrics: RelayMetrics, name: str, **labels: str) -> float:
    """A sample of the relay's registry, read through its public API (0 before its first
    change, as a counter or gauge starts)."""
    return metrics.registry.get_sample_value(name, labels) or 0.0


def _sample(metrics: str, name: str, missing: int | None = None) -> int:
    """A sample's value from a Prometheus text page; `missing` if it is not there (yet)."""
    for line in metrics.splitlines():
        if line.startswith(name + " "):
            return int(float(line.split()[1]))
    assert missing is not None, f"no {name} in:\n{metrics}"
    return missing


async def test_nats_away_then_back_relay_catches_up(
    redis_client: aioredis.Redis,
    wallet: Wallet,
    relay_config: RelayConfig,
    nats_server: NatsServer,
    running_relay: Relay,
) -> None:
    if nats_server.process is None:
        pytest.skip("needs a nats-server of our own to stop and start (none on PATH)")
    await settle(wallet, 50, prefix="a")
    await wait_until_relayed(redis_client, 20)
    nats_server.stop()
    await settle(wallet, 100, prefix="b")  # gifts go on while NATS is away
    deadline = time.monotonic() + 10
    gauges = running_relay.metrics
    # the relay's own gauges show the backlog while it retries, as relay_lag does
    while (
        reading(gauges, "giftstream_relay_lag_entries") < 100
        or reading(gauges, "giftstream_relay_oldest_age_seconds") <= 1.0
    ):
        assert time.monotonic() < deadline, (
            reading(gauges, "giftstream_relay_lag_entries"),
            reading(gauges, "giftstream_relay_oldest_age_seconds"),
        )
        await asyncio.sleep(0.05)
    lag = await relay_lag(redis_client)
    assert lag.entries == 100 and lag.oldest_age_s > 1.0  # nothing relayed meanwhile
    assert reading(gauges, "giftstream_relay_errors_total", cause="nats") >= 1
    nats_server.start()
    await wait_until_relayed(redis_client, 30)
    assert_exactly_once(await ledger_events(redis_client), await jetstream_messages(relay_config))


# ---- a stopped relay, and trimming meanwhile ---------------------------------------------


async def _caught_up(consumer: LedgerConsumer) -> None:
    for _ in range(100):
        if not await consumer.run_once():
            return
    raise AssertionError(f"group {consumer.group} never caught up")


async def test_a_stopped_relay_loses_nothing_while_the_ledger_is_trimmed(
    redis_url: str, redis_client: aioredis.Redis, wallet: Wallet, relay_config: RelayConfig
) -> None:
    """The relay runs, stops, and dies once mid-batch (published part of it, acked none);
    meanwhile five times more entries than the trim keeps are settled, the other groups keep
    up, and the ledger is trimmed. The restarted relay still delivers every entry once;
    once it has caught up, trimming removes everything but what it keeps."""
    keep = 20
    config = replace(relay_config, batch=16)
    other_groups = [
        LedgerConsumer(
            redis_client, CHECKPOINT_GROUP, "c1", CheckpointFolder(redis_client), block_ms=10
        ),
        LedgerConsumer(redis_client, "earnings", "c1", EarningsConsumer(redis_client), block_ms=10),
    ]

    stop = asyncio.Event()
    task = asyncio.create_task(Relay(redis_client, config).run(stop))
    await settle(wallet, 30, prefix="a")
    await wait_until_relayed(redis_client, 20)
    stop.set()
    await asyncio.wait_for(task, 10)

    await settle(wallet, 5 * keep, prefix="b")  # the relay is down
    # it read a batch of 16, JetStream stored 5 of them, and it died before acking any
    crashing = CrashAfterPublish(redis_client, config, crash_after=5)
    with pytest.raises(_Crash):
        await crashing.start()
        for _ in range(10):
            await crashing.relay_once()
    await crashing.crashed()
    for consumer in other_groups:
        await _caught_up(consumer)
    settled = await ledger_events(redis_client)  # every entry, before any trim
    assert len(settled) == 30 + 5 * keep
    summary: Any = await redis_client.xpending(keys.LEDGER, GROUP)
    assert summary["pending"] == 16 and summary["min"].decode() == settled[30][0]
    assert (await relay_lag(redis_client)).entries == 5 * keep

    # trimming now removes only what the relay acked before it stopped
    trimmed = await asyncio.to_thread(
        run_cli, "trim", "--keep", str(keep), "--redis-url", redis_url
    )
    assert trimmed.returncode == 0, trimmed.stderr
    assert trimmed.stdout.strip() == (
        f"trimmed 30 entries of {keys.LEDGER} below {settled[30][0]} (held there by group "
        f"{GROUP}); {5 * keep} entries left"
    )
    assert await trim_ledger(redis_client, keep_min_entries=0) == 0  # keep 0: still held
    assert await ledger_events(redis_client) == settled[30:]

    finisher = Relay(redis_client, config)
    stop = asyncio.Event()
    task = asyncio.create_task(finisher.run(stop))
    await wait_until_relayed(redis_client, 20)
    stop.set()
    await asyncio.wait_for(task, 10)
    # published before the crash
    assert reading(finisher.metrics, "giftstream_relay_already_published_total") == 5
    assert_exactly_once(settled, await jetstream_messages(config))

    # every group has acked everything: the trim keeps only the last `keep`
    trimmed = await asyncio.to_thread(
        run_cli, "trim", "--keep", str(keep), "--redis-url", redis_url
    )
    assert trimmed.returncode == 0, trimmed.stderr
    assert trimmed.stdout.startswith(f"trimmed {5 * keep - keep} entries of {keys.LEDGER}")
    assert f"(held there by the last {keep} entries kept); {keep} entries left" in trimmed.stdout
    assert await ledger_events(redis_client) == settled[-keep:]
    report = await audit(redis_client)
    assert report.ok and report.entries == len(settled), report.breaches


async def test_an_emptied_jetstream_stream_does_not_stall_the_relay(
    redis_client: aioredis.Redis, wallet: Wallet, relay_config: RelayConfig
) -> None:
    """Purged (or aged out by max_age while the relay was down): the stream keeps its last
    sequence number but no message; the relay must carry on with the new entries."""
    stop = asyncio.Event()
    task = asyncio.create_task(Relay(redis_client, relay_config).run(stop))
    await settle(wallet, 10, prefix="a")
    await wait_until_relayed(redis_client, 20)
    stop.set()
    await asyncio.wait_for(task, 10)
    nc = await nats.connect(relay_config.nats_url)
    try:
        await nc.jsm().purge_stream(relay_config.stream)
    finally:
        await nc.close()

    await settle(wallet, 10, prefix="b")
    relay = Relay(redis_client, relay_config)
    await relay_until_caught_up(redis_client, relay)
    assert reading(relay.metrics, "giftstream_relay_errors_total", cause="nats") == 0
    assert_exactly_once(
        (await ledger_events(redis_client))[10:], await jetstream_messages(relay_config)
    )


def test_relay_process_retries_while_nats_is_unreachable_and_stops_on_sigterm(
    redis_url: str,
) -> None:
    """No NATS at all: the relay retries with its own backoff (errors counted, its lag
    gauges showing the backlog) and SIGTERM still stops it at once. nats.connect used to
    retry inside itself for ever, so none of that happened and SIGTERM hung."""

    async def fill() -> None:
        client = aioredis.Redis.from_url(redis_url)
        wallet = Wallet(client, load_catalog().economics)
        await wallet.load_scripts()
        await settle(wallet, 6)
        await client.aclose()

    asyncio.run(fill())
    metrics_port = free_port()
    proc = subprocess.Popen(
        [
            *GIFTSTREAM,
            "relay",
            "--nats",
            f"nats://127.0.0.1:{free_port()}",
            "--redis-url",
            redis_url,
            "--metrics-port",
            str(metrics_port),
            "--log-level",
            "ERROR",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        async def retrying() -> str:
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            nats_errors = 'giftstream_relay_errors_total{cause="nats"}'
            deadline = time.monotonic() + 20
            metrics = ""
            async with aiohttp.ClientSession() as http:
                while time.monotonic() < deadline:
                    try:
                        async with http.get(url) as response:
                            metrics = await response.text()
                    except aiohttp.ClientError:  # not listening yet
                        metrics = ""
                    if _sample(metrics, nats_errors, missing=0) >= 3:
                        return metrics
                    await asyncio.sleep(0.1)
            raise AssertionError(f"the relay did not retry three times:\n{metrics}")

        metrics = asyncio.run(retrying())
        assert _sample(metrics, "giftstream_relay_lag_entries") == 6
        assert _sample(metrics, "giftstream_relay_published_total") == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
    assert code == 0


# ---- one relay per ledger: the lease ----------------------------------------------------


async def test_lease_take_renew_release_and_expiry(redis_client: aioredis.Redis) -> None:
    """SET NX PX takes it; only the holder's token renews or releases it; it expires."""
    key = lease_key()
    first = Lease(redis_client, key, 300, "host-a:1:x")
    second = Lease(redis_client, key, 300, "host-b:2:y")
    assert await first.acquire() and first.held()
    assert not await second.acquire() and not second.held()
    assert not await second.renew() and not await second.release()
    holder = await lease_holder(redis_client, key)
    assert holder is not None and holder.token == "host-a:1:x" and 0 < holder.ttl_ms <= 300
    assert await first.renew() and await first.acquire()  # taking it again keeps it
    await until(lambda: second.acquire(), 5, "the lease expiring")  # first stopped renewing
    assert not first.held()  # past its TTL, less the margin, without a renewal
    assert not await first.renew()  # and it cannot get it back while second holds it
    assert await second.release() and await lease_holder(redis_client, key) is None
    assert await first.acquire()


@pytest.mark.parametrize("lost", ["as the renewal completes", "inside the renewal"])
async def test_the_lease_renewer_ends_even_if_run_s_cancel_is_lost(
    redis_client: aioredis.Redis, lost: str
) -> None:
    """run() ends the lease renewer and awaits it. The cancel it sends can be lost: on
    Python 3.11 an asyncio.wait_for whose operation completes as the cancel lands returns
    normally, as ours around the renewal did and redis-py's around each command's send
    does. A renewer stopped by the cancel alone renewed on, and a SIGTERM'd relay hung.
    Here run() ends during a real renewal, and its cancel is lost in either place."""
    relay = Relay(redis_client, RelayConfig(nats_url="nats://127.0.0.1:4222", lease_ttl_ms=300))
    assert await relay.lease.acquire()
    ended = asyncio.Event()
    renew = relay.lease.renew
    renewals: list[bool] = []

    async def renew_as_run_ends() -> bool:
        renewals.append(await renew())  # answered by Redis
        ended.set()  # run() ends, as it does
        renewer.cancel()
        if lost == "inside the renewal":
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0)  # as a wait_for inside redis-py would
        return renewals[-1]

    relay.lease.renew = renew_as_run_ends  # type: ignore[method-assign]
    renewer = asyncio.create_task(relay._keep_lease(ended))
    await asyncio.wait({renewer}, timeout=5)
    assert renewer.done(), "the renewer went on after run() ended"
    renewer.cancel()  # a no-op once done; ends it if the check above failed
    assert renewals == [True]


async def test_two_relays_started_at_once_only_one_publishes(
    redis_client: aioredis.Redis, wallet: Wallet, relay_config: RelayConfig
) -> None:
    config = replace(relay_config, lease_ttl_ms=1000, batch=16)
    relays = [Relay(redis_client, config, lease_token=f"relay-{n}") for n in range(2)]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(relay.run(stop)) for relay in relays]
    try:
        await settle(wallet, 300)  # while both run
        await wait_until_relayed(redis_client, 30)
        published = [
            int(reading(relay.metrics, "giftstream_relay_published_total")) for relay in relays
        ]
        held = [reading(relay.metrics, "giftstream_relay_lease_held") for relay in relays]
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert sorted(published) == [0, 300], published
    assert sorted(held) == [0, 1]
    assert_exactly_once(await ledger_events(redis_client), await jetstream_messages(config))
    assert await lease_holder(redis_client, lease_key()) is None  # released on stop


def relay_status_of(redis_url: str) -> dict[str, Any]:
    status = run_cli("relay", "--status", "--redis-url", redis_url)
    assert status.returncode == 0, status.stderr
    parsed: dict[str, Any] = orjson.loads(status.stdout)
    return parsed


def test_holder_killed_9_the_standby_takes_over(redis_url: str, relay_config: RelayConfig) -> None:
    """Two relay processes: the second waits, saying so; the holder is killed -9 while it
    relays; the second takes the lease once its TTL has run out and finishes. JetStream
    holds every entry once, in order, and `--status` names the holder and its TTL."""
    total = 40_000

    async def fill() -> None:
        client = aioredis.Redis.from_url(redis_url)
        await add_gift_entries(client, total)
        await client.aclose()

    command = [
        "relay",
        "--nats",
        relay_config.nats_url,
        "--redis-url",
        redis_url,
        "--stream",
        relay_config.stream,
        "--subject-prefix",
        relay_config.subject_prefix,
        "--lease-ttl-ms",
        "1000",
    ]
    holder = WorkerProcess(command)
    standby: WorkerProcess | None = None
    try:
        holder.wait_for_log("took the relay lease", 20)
        status = relay_status_of(redis_url)
        assert status["lease"]["holder"].startswith(f"{socket.gethostname()}:{holder.proc.pid}:")
        assert 0 < status["lease"]["ttl_ms"] <= 1000
        standby = WorkerProcess(command)
        standby.wait_for_log("another relay holds the lease, waiting", 20)
        asyncio.run(fill())  # faster than one relay moves them: the holder is still at it
        assert asyncio.run(lag_below(redis_url, total, timeout=30)) > 0  # relaying, not done
        holder.proc.kill()
        holder.proc.wait()
        left = asyncio.run(relay_lag_of(redis_url))
        assert left > 0, "the holder finished before it was killed"
        standby.wait_for_log("took the relay lease", 20)
        assert relay_status_of(redis_url)["lease"]["holder"].split(":")[1] == str(standby.proc.pid)

        async def check() -> None:
            client = aioredis.Redis.from_url(redis_url)
            try:
                await wait_until_relayed(client, 60)
                assert_exactly_once(
                    await ledger_events(client), await jetstream_messages(relay_config)
                )
            finally:
                await client.aclose()

        asyncio.run(check())
        assert standby.stop() == 0
        assert standby.said("released the relay lease"), "".join(standby.log)
        assert relay_status_of(redis_url)["lease"] is None
    finally:
        holder.kill()
        if standby is not None:
            standby.kill()


async def test_a_relay_whose_lease_is_stolen_stops_publishing(
    redis_client: aioredis.Redis, wallet: Wallet, relay_config: RelayConfig
) -> None:
    """The lease deleted and taken by someone else: the relay's next renewal is refused,
    and from then on it publishes nothing, however much is settled, until it can take the
    lease again; then it goes on from where JetStream is."""
    config = replace(relay_config, lease_ttl_ms=600)
    relay = Relay(redis_client, config, lease_token="victim")
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    try:
        await settle(wallet, 20, prefix="a")
        await wait_until_relayed(redis_client, 20)
        await redis_client.delete(lease_key())
        await redis_client.set(lease_key(), "thief", px=60_000)

        async def lost() -> bool:
            return not relay.lease.held()

        await until(lost, 5, "the relay seeing its lease gone")
        published = reading(relay.metrics, "giftstream_relay_published_total")
        await settle(wallet, 20, prefix="b")
        await asyncio.sleep(1.0)  # several of its passes and renewals
        assert reading(relay.metrics, "giftstream_relay_published_total") == published
        assert reading(relay.metrics, "giftstream_relay_lease_held") == 0
        assert (await relay_lag(redis_client)).entries == 20
        assert len(await jetstream_messages(config)) == 20

        await redis_client.delete(lease_key())  # the thief is gone: the relay takes it back
        await wait_until_relayed(redis_client, 20)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    assert reading(relay.metrics, "giftstream_relay_published_total") == 40
    assert_exactly_once(await ledger_events(redis_client), await jetstream_messages(config))


async def test_a_refused_message_mid_batch_stores_and_acks_only_the_prefix(
    redis_client: aioredis.Redis, relay_config: RelayConfig
) -> None:
    """JetStream refuses the 6th message of a batch of 10 (too large for the stream): the
    5 before it are stored and acked, none after it is stored (each expects the one before
    it as the stream's last), so the stream stays in ledger order; once the stream takes
    it, the relay goes on from there."""
    config = replace(relay_config, batch=10)
    now_ms = int(time.time() * 1000)
    for i in range(12):
        data = orjson.loads(gift_entry(i, now_ms))
        if i == 5:
            data["key"] = "x" * 2000
        await redis_client.xadd(keys.LEDGER, {"data": orjson.dumps(data)})
    nc = await nats.connect(config.nats_url)
    stream = api.StreamConfig(
        name=config.stream,
        subjects=[f"{config.subject_prefix}.>"],
        storage=api.StorageType.FILE,
        duplicate_window=3600.0,
        max_msg_size=1024,
    )
    try:
        await nc.jsm().add_stream(stream)
        relay = Relay(redis_client, config)
        await relay._ensure_group()
        assert await relay.lease.acquire()
        await relay._open()
        with pytest.raises(APIError, match="exceeds maximum"):
            await relay.relay_once()
        await relay.jetstream.close()
        ledger = await ledger_events(redis_client)
        assert_exactly_once(ledger[:5], await jetstream_messages(config))
        summary: Any = await redis_client.xpending(keys.LEDGER, GROUP)
        assert summary["pending"] == 5 and summary["min"].decode() == ledger[5][0]
        assert reading(relay.metrics, "giftstream_relay_published_total") == 5

        await nc.jsm().update_stream(replace(stream, max_msg_size=-1))
        await relay_until_caught_up(redis_client, relay)
        assert_exactly_once(ledger, await jetstream_messages(config))
        assert reading(relay.metrics, "giftstream_relay_published_total") == 12
    finally:
        await nc.close()


async def test_an_entry_read_by_a_lapsed_relay_during_handover_is_still_published(
    redis_client: aioredis.Redis, relay_config: RelayConfig
) -> None:
    """The handover race: the new holder's read of pending entries came back empty, then the
    old holder (its lease lapsed) read a new entry and stopped without publishing it, then
    the new holder read and published the next ones. The stolen entry is pending *below*
    what the new holder published; it must still be published, not acked as if stored."""
    now_ms = int(time.time() * 1000)

    async def add(i: int) -> None:
        await redis_client.xadd(keys.LEDGER, {"data": gift_entry(i, now_ms)})

    relay = Relay(redis_client, relay_config)
    await relay._ensure_group()
    assert await relay.lease.acquire()
    await relay._open()
    try:
        for i in range(3):
            await add(i)
        assert await relay.relay_once() == 3
        assert await relay.relay_once() == 0  # nothing pending, nothing new
        await add(3)  # what the lapsed holder reads (same group and consumer) and drops
        stolen: Any = await redis_client.xreadgroup(GROUP, CONSUMER, {keys.LEDGER: ">"}, count=1)
        assert len(stolen[0][1]) == 1
        await add(4)
        assert await relay._relay_batch(">") == 1  # the new holder's read of new entries
        await relay_until_caught_up(redis_client, relay)  # its next pass finds entry 3
    finally:
        await relay.jetstream.close()
    sent = await jetstream_messages(relay_config)
    ledger = await ledger_events(redis_client)
    assert sorted(msg_id for msg_id, _, _ in sent) == sorted(event for _, event in ledger)
    assert len(sent) == 5  # every entry once: the stolen one late, but not lost


async def test_a_relay_that_slept_through_losing_its_lease_cannot_add_a_stale_batch(
    redis_client: aioredis.Redis, relay_config: RelayConfig
) -> None:
    """A relay frozen past its lease (a suspended VM: its monotonic clock stood still, so it
    still believes it holds the lease) wakes and publishes: its batch's first message
    expects the stream's last sequence as it knew it, JetStream refuses it, nothing of its
    is stored or acked, and the new holder relays everything once, in order."""
    now_ms = int(time.time() * 1000)
    config = replace(relay_config, lease_ttl_ms=60_000)
    sleeper = Relay(redis_client, config, lease_token="sleeper")
    await sleeper._ensure_group()
    assert await sleeper.lease.acquire()
    await sleeper._open()  # learns last sequence 0; then "freezes"
    await redis_client.delete(lease_key())  # its lease expired meanwhile
    holder = Relay(redis_client, config, lease_token="holder")
    assert await holder.lease.acquire()
    await holder._open()
    try:
        for i in range(3):
            await redis_client.xadd(keys.LEDGER, {"data": gift_entry(i, now_ms)})
        assert await holder.relay_once() == 3
        await redis_client.xadd(keys.LEDGER, {"data": gift_entry(3, now_ms)})
        assert sleeper.lease.held()  # by its own clock
        with pytest.raises(APIError, match="wrong last sequence"):
            await sleeper.relay_once()
        assert len(await jetstream_messages(config)) == 3
        await relay_until_caught_up(redis_client, holder)
    finally:
        await sleeper.jetstream.close()
        await holder.jetstream.close()
    assert_exactly_once(await ledger_events(redis_client), await jetstream_messages(config))
