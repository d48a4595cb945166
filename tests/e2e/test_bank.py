"""The bank test over a real server process: concurrent senders, random drops and re-sends,
races against too few coins; then `kill -9` of the server and of Redis mid-workload. After
each run every invariant of DESIGN.md §2 is checked against what the clients were told."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from giftstream.server.embedded_redis import EmbeddedRedis
from tests.conftest import JWT_SECRET, WEBHOOK_SECRET
from tests.e2e.bank import BankRecord, Sender, Verdict, fund, open_rooms, verify
from tests.helpers import AdminClient, TokenMaker
from tests.processes import ServerProcess, run_cli

CREATORS = ["cara", "dan", "eli"]
RICH, POOR = 180, 30  # senders; the poor race three connections against 70 coins
REPORT = os.environ.get("GIFTSTREAM_RELIABILITY_REPORT")  # where to write the run's figures


async def bank_run(
    server: ServerProcess,
    redis: EmbeddedRedis,
    *,
    seconds: float,
    chaos: list[tuple[float, str]],
    seed: int,
) -> tuple[BankRecord, int, int]:
    """Run the workload for `seconds`; at each (t, what) of `chaos`, kill -9 "server" or
    "redis" and bring it back. Returns the record, the coins bought and crashes survived."""
    rng = random.Random(seed)
    tokens = TokenMaker(JWT_SECRET)
    record = BankRecord()
    async with AdminClient(server.admin_url, WEBHOOK_SECRET) as admin:
        coins = await fund(admin, [f"rich{i}" for i in range(RICH)], "coins_700")
        coins += await fund(admin, [f"poor{i}" for i in range(POOR)], "coins_70")
    creators = await open_rooms(server.ws_url, tokens, CREATORS)
    senders = [
        Sender(
            f"rich{i}", lambda: server.ws_url, tokens, CREATORS, record, random.Random(rng.random())
        )
        for i in range(RICH)
    ]
    senders += [
        Sender(
            f"poor{i}",
            lambda: server.ws_url,
            tokens,
            CREATORS,
            record,
            random.Random(rng.random()),
            connections=3,
        )
        for i in range(POOR)
    ]
    loop = asyncio.get_running_loop()
    stop_at = loop.time() + seconds
    work = [asyncio.create_task(s.run(stop_at, stop_at + 30, max_bursts=10_000)) for s in senders]
    crashes = 0
    for at, what in chaos:
        await asyncio.sleep(max(0.0, stop_at - seconds + at - loop.time()))
        if what == "server":
            server.kill()
            await asyncio.sleep(0.5)
            await asyncio.to_thread(server.start)
        else:
            redis.kill()
            await asyncio.sleep(0.5)
            await asyncio.to_thread(redis.start)
        crashes += 1
    await asyncio.gather(*work)
    for client in creators:
        await client.close()
    return record, coins, crashes


def report(name: str, verdict: Verdict, crashes: int) -> None:
    figures = {**verdict.figures, "crashes_survived": crashes}
    print(f"\n{name}: {json.dumps(figures)}")
    if REPORT:
        path = Path(REPORT)
        runs = json.loads(path.read_text()) if path.exists() else {}
        runs[name] = figures
        path.write_text(json.dumps(runs, indent=2) + "\n")


@pytest.fixture
def durable_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A Redis of our own that fsyncs every write, so we can kill it."""
    redis = EmbeddedRedis(tmp_path / "redis", appendfsync="always").start()
    yield redis
    redis.stop()


def test_bank_with_drops_and_races(tmp_path: Path, durable_redis: EmbeddedRedis) -> None:
    server = ServerProcess(tmp_path / "data", "--redis-url", durable_redis.url).start()
    try:
        record, coins, _ = asyncio.run(bank_run(server, durable_redis, seconds=8, chaos=[], seed=1))
    finally:
        server.kill()
    verdict = asyncio.run(verify(durable_redis.url, record, coins))
    report("bank", verdict, 0)
    verdict.assert_clean(record)
    assert verdict.figures["senders"] >= 200
    assert record.drops > 0 and record.resent_after_drop > 0
    assert record.refusals["insufficient_coins"] > 0  # the poor really ran dry
    assert verdict.figures["coins_lost"] == 0
    audit = run_cli("audit", "--redis-url", durable_redis.url)
    assert audit.returncode == 0, audit.stdout


def test_bank_survives_kill_9_of_server_and_redis(
    tmp_path: Path, durable_redis: EmbeddedRedis
) -> None:
    server = ServerProcess(tmp_path / "data", "--redis-url", durable_redis.url).start()
    try:
        record, coins, crashes = asyncio.run(
            bank_run(
                server, durable_redis, seconds=12, chaos=[(3.0, "server"), (7.0, "redis")], seed=2
            )
        )
    finally:
        server.kill()
    verdict = asyncio.run(verify(durable_redis.url, record, coins))
    report("bank_with_crashes", verdict, crashes)
    verdict.assert_clean(record)
    assert crashes == 2
    assert verdict.figures["coins_lost"] == 0
    audit = run_cli("audit", "--redis-url", durable_redis.url)
    assert audit.returncode == 0, audit.stdout


def test_everysec_loses_whole_movements_only(tmp_path: Path) -> None:
    """With `appendfsync everysec`, killing Redis loses nothing Redis had written (the
    kernel still has it), but a machine crash can lose the AOF's unsynced tail, up to about
    a second of writes. We cut the AOF at many points in its tail, as such a crash would,
    and check that what is lost is always whole movements: a balance change goes with its
    ledger entry and its idempotency record, never one without the others."""
    fast = EmbeddedRedis(tmp_path / "redis", appendfsync="everysec").start()
    server = ServerProcess(tmp_path / "data", "--redis-url", fast.url).start()
    try:
        record, coins, crashes = asyncio.run(
            bank_run(server, fast, seconds=5, chaos=[(3.0, "redis")], seed=3)
        )
    finally:
        server.kill()
    verdict = asyncio.run(verify(fast.url, record, coins))
    verdict.assert_clean(record)  # a killed process lost nothing it had written
    fast.kill()
    aof = _tail_aof(tmp_path / "redis")
    size = aof.stat().st_size
    rng = random.Random(4)
    cuts = sorted(rng.randrange(max(0, size - 256 * 1024), size) for _ in range(6))
    lost_per_cut = []
    for n, cut in enumerate(cuts):
        copy = tmp_path / f"cut{n}"
        shutil.copytree(tmp_path / "redis", copy)
        with open(copy / aof.relative_to(tmp_path / "redis"), "r+b") as handle:
            handle.truncate(cut)
        with EmbeddedRedis(copy) as crashed:
            cut_verdict = asyncio.run(verify(crashed.url, record, coins))
            assert not cut_verdict.breaches, cut_verdict.breaches[:5]  # wallets == ledger
            assert not cut_verdict.double_settled
            asyncio.run(_assert_keys_match_ledger(crashed.url))
        lost_per_cut.append(len(cut_verdict.acked_not_in_ledger))
    verdict.figures["acked_lost_per_aof_cut"] = lost_per_cut  # type: ignore[assignment]
    report("everysec", verdict, crashes)
    assert max(lost_per_cut) > 0, "the cuts should have reached acknowledged gifts"


def _tail_aof(redis_dir: Path) -> Path:
    """The AOF file new writes go to (Redis 7: the newest incr file; Redis 6: the one file)."""
    incr = sorted((redis_dir / "appendonlydir").glob("*.incr.aof"))
    return incr[-1] if incr else redis_dir / "appendonly.aof"


async def _assert_keys_match_ledger(redis_url: str) -> None:
    """Every gift in the ledger still has its key record, and every key record its entry."""
    import redis.asyncio as aioredis

    from giftstream.server.ledger.entries import read_entries
    from giftstream.server.money import keys

    client = aioredis.Redis.from_url(redis_url)
    try:
        ledger = {
            (e.data["sender"], e.data["key"]): e.event
            async for e in read_entries(client)
            if e.kind == "gift"
        }
        records = {}
        async for raw in client.scan_iter(match=keys.PREFIX + "gift_key:*", count=1000):
            sender, key = raw.decode().removeprefix(keys.PREFIX + "gift_key:").rsplit(":", 1)
            event = await client.hget(raw, "event")
            assert isinstance(event, bytes)
            records[(sender, key)] = event.decode()
    finally:
        await client.aclose()
    assert records == ledger
