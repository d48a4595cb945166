"""The JetStream relay against a real nats-server: every ledger entry arrives exactly once,
through kill -9 between publish and ack, NATS going away, and restarts."""

from __future__ import annotations

import asyncio
import random
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import nats
import pytest
import redis.asyncio as aioredis

from server.catalog import load_catalog
from server.embedded_redis import free_port
from server.ledger import read_entries
from server.relay import STREAM_ID_HEADER, Relay, RelayConfig, relay_lag
from server.wallet import Wallet
from tests.processes import GIFTSTREAM, run_cli


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
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)  # fmt: skip
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
            command=[binary, "-a", "127.0.0.1", "-p", str(port), "-js",
                     "-sd", str(tmp_path / "jetstream")],
        )  # fmt: skip
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
    return RelayConfig(nats_url=nats_server.url, stream=f"GSTEST_{tag}",
                       subject_prefix=f"gstest{tag}.ledger", block_ms=100)  # fmt: skip


@pytest.fixture
async def wallet(redis_client: aioredis.Redis) -> Wallet:
    wallet = Wallet(redis_client, load_catalog().economics)
    await wallet.load_scripts()
    return wallet


async def settle(wallet: Wallet, n: int, prefix: str = "r") -> None:
    """`n` ledger entries: purchases, and gifts from the buyers."""
    catalog = load_catalog()
    package, gift = catalog.packages["coins_70"], catalog.gifts["heart"]
    now = int(time.time() * 1000)
    for i in range(0, n, 2):
        user = f"{prefix}user{i}"
        await wallet.purchase(receipt=f"{prefix}-rc-{i}", user=user, package=package,
                              adult=True, now_ms=now)  # fmt: skip
        if i + 1 < n:
            key = f"{prefix}-key-{i:06d}"
            await wallet.send_gift(sender=user, adult=True, creator="cara", room="cara",
                                   gift=gift, count=1, key=key, now_ms=now)  # fmt: skip


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
            messages.append((headers["Nats-Msg-Id"], headers[STREAM_ID_HEADER], msg.subject))
        return messages
    finally:
        await nc.close()


async def wait_until_relayed(redis_client: aioredis.Redis, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (await relay_lag(redis_client)).entries:
        assert time.monotonic() < deadline, f"relay still lags: {await relay_lag(redis_client)}"
        await asyncio.sleep(0.1)


def assert_exactly_once(ledger: list[tuple[str, str]], sent: list[tuple[str, str, str]]) -> None:
    counts = Counter(msg_id for msg_id, _, _ in sent)
    assert [m for m, n in counts.items() if n > 1] == []
    assert [msg_id for msg_id, _, _ in sent] == [event for _, event in ledger]  # all, in order
    assert [stream_id for _, stream_id, _ in sent] == [stream_id for stream_id, _ in ledger]


@pytest.fixture
async def running_relay(
    redis_client: aioredis.Redis, relay_config: RelayConfig
) -> AsyncIterator[Any]:
    stop = asyncio.Event()
    task = asyncio.create_task(Relay(redis_client, relay_config).run(stop))
    yield task
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


class CrashAfterPublish(Relay):
    """A relay that dies after JetStream stored an entry and before Redis heard of it."""

    def __init__(self, *args: Any, crash_after: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.crash_after = crash_after

    async def _publish(self, stream_id: str, fields: dict[Any, Any]) -> None:
        await super()._publish(stream_id, fields)
        self.crash_after -= 1
        if self.crash_after == 0:
            raise _Crash


class _Crash(Exception):
    pass


async def test_crash_between_publish_and_ack_never_publishes_twice(
    redis_client: aioredis.Redis, wallet: Wallet, relay_config: RelayConfig
) -> None:
    """Even past JetStream's duplicate window, a restarted relay skips what it published."""
    from dataclasses import replace

    config = replace(relay_config, duplicate_window_s=0.5, batch=16)
    await settle(wallet, 120)
    rng = random.Random(7)
    for _ in range(8):
        relay = CrashAfterPublish(redis_client, config, crash_after=rng.randint(1, 20))
        with pytest.raises(_Crash):
            await relay._ensure_group()
            await relay._open()
            while True:
                await relay.relay_once()
        await relay._close_nats()
        await asyncio.sleep(0.6)  # past the duplicate window: dedupe cannot save us
    stop = asyncio.Event()
    finisher = Relay(redis_client, config)
    task = asyncio.create_task(finisher.run(stop))
    await wait_until_relayed(redis_client, 20)
    stop.set()
    await task
    assert finisher.metrics.skipped._value.get() >= 1  # a crash left a published, unacked entry
    assert_exactly_once(await ledger_events(redis_client), await jetstream_messages(config))


def test_kill_9_relay_process_many_times(
    redis_url: str, relay_config: RelayConfig, tmp_path: Path
) -> None:
    """The real `giftstream relay` process, killed -9 at random moments while relaying."""

    async def fill() -> None:
        client = aioredis.Redis.from_url(redis_url)
        wallet = Wallet(client, load_catalog().economics)
        await wallet.load_scripts()
        await settle(wallet, 3000)
        await client.aclose()

    asyncio.run(fill())
    command = [*GIFTSTREAM, "relay", "--nats", relay_config.nats_url, "--redis-url", redis_url,
               "--stream", relay_config.stream, "--subject-prefix", relay_config.subject_prefix,
               "--log-level", "WARNING"]  # fmt: skip
    rng = random.Random(11)
    kills = 0
    for _ in range(12):
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, 0.9))
        proc.kill()
        proc.wait()
        kills += 1
    status = run_cli("relay", "--status", "--redis-url", redis_url)
    assert status.returncode == 0 and '"entries"' in status.stdout
    metrics_port = free_port()
    proc = subprocess.Popen([*command, "--metrics-port", str(metrics_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:

        async def check() -> None:
            client = aioredis.Redis.from_url(redis_url)
            await wait_until_relayed(client, 60)
            assert_exactly_once(await ledger_events(client), await jetstream_messages(relay_config))
            await client.aclose()
            await asyncio.sleep(0.5)  # the lag gauge is refreshed when the relay is idle
            async with aiohttp.ClientSession() as http, http.get(
                f"http://127.0.0.1:{metrics_port}/metrics"
            ) as response:
                text = await response.text()
            assert "giftstream_relay_lag_entries 0.0" in text
            assert "giftstream_relay_oldest_age_seconds 0.0" in text

        asyncio.run(check())
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    assert kills == 12


async def test_nats_away_then_back_relay_catches_up(
    redis_client: aioredis.Redis,
    wallet: Wallet,
    relay_config: RelayConfig,
    nats_server: NatsServer,
    running_relay: Any,
) -> None:
    if nats_server.process is None:
        pytest.skip("needs a nats-server of our own to stop and start (none on PATH)")
    await settle(wallet, 50, prefix="a")
    await wait_until_relayed(redis_client, 20)
    nats_server.stop()
    await settle(wallet, 100, prefix="b")  # gifts go on while NATS is away
    await asyncio.sleep(1.5)
    lag = await relay_lag(redis_client)
    assert lag.entries >= 100 and lag.oldest_age_s > 1.0
    nats_server.start()
    await wait_until_relayed(redis_client, 30)
    assert_exactly_once(await ledger_events(redis_client), await jetstream_messages(relay_config))
