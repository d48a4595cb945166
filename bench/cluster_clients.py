"""Which Redis Cluster client giftstream uses, chosen by measurement (issue 14): redis-py's
asyncio `RedisCluster` (what the code uses), `coredis` and `valkey-glide`, side by side on a
real cluster of 3 masters and 3 replicas (tests/cluster.py), one client after the other, each
in this process. Per client:

1. EVALSHA of a gift in miniature (check the sender, debit, credit, append to a ledger stream:
   3 keys of one hash-tagged slot), N closed-loop callers spread over 16 tags like giftstream's
   partitions: calls/s and this process's CPU (time.process_time, every thread) per call;
2. its latency p50/p99;
3. a script and a WAIT on one connection to the key's master (crediting and --durable-ack need
   the WAIT to count the script's writes): how the client does it, whether it answers 0 with
   the replica paused (SIGSTOP) and 1 once it runs, and its calls/s under the same N callers;
   and whether one caller's WAIT on a paused replica holds up 90 other callers' gifts to that
   master (it does where the node's one connection is shared);
4. failover: a master killed -9 mid-run (the one holding the first tag): errors, the longest
   time without an answer on the killed master's tags, and how long the promotion took;
5. maintenance: version, latest on PyPI, license, Python versions, wheel build date.

Run on demand, not by `make bench`. coredis and valkey-glide are no dependency of giftstream:
they go into a throwaway venv with giftstream itself (a client not installed is skipped):

    python3 -m venv /tmp/clientbench-venv
    /tmp/clientbench-venv/bin/pip install -e . coredis valkey-glide
    nice -n 10 /tmp/clientbench-venv/bin/python -m bench.cluster_clients --callers 200 --seconds 5

It prints a Markdown table (docs/benchmarks.md, "Cluster clients"). Every loop is bounded in
count and time; the cluster is stopped at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.metadata
import itertools
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

import redis
import redis.cluster
import uvloop

from giftstream.server.money.same_connection import script_then_wait
from giftstream.server.redis_cluster import cluster_client
from tests.cluster import ClusterNode, RedisClusterProcesses

GIFT = """-- a gift in miniature: every check, then every write
local coins = tonumber(redis.call('HGET', KEYS[1], 'coins') or '0')
local price = tonumber(ARGV[1])
if coins < price then return {'insufficient', coins} end
redis.call('HINCRBY', KEYS[1], 'coins', -price)
redis.call('HINCRBY', KEYS[2], 'diamonds', price)
local id = redis.call('XADD', KEYS[3], 'MAXLEN', '~', '10000', '*',
    'sender', ARGV[2], 'creator', ARGV[3], 'coins', price)
return {'ok', id}
"""
TAGS = 16  # like giftstream's partitions: callers spread over every master
PRICE = 1
CALL_TIMEOUT_S = 10.0  # a call that hangs this long counts as an error
ERROR_PAUSE_S = 0.05  # a caller's pause after an error, as an application's retry would
MAX_CALLS_PER_CALLER = 1_000_000
WARMUP_S = 1.0
WAIT_TIMEOUT_MS = 100
PAUSED_WAIT_TIMEOUT_MS = 300
KILL_AFTER_S = 1.0
AFTER_RECOVERY_S = 3.0
# on one master: below redis-py's 100 connections per node, past which it raises
# MaxConnectionsError instead of waiting for a free one
ONE_TAG_CALLERS = 90
STALL_S = 2.0  # a replica paused this long is marked failing, not replaced (it is a replica)
FAILOVER_CAP_S = 60.0


def gift_keys(tag: int) -> list[str]:
    return [
        f"{{p{tag:02d}}}:wallet:sender",
        f"{{p{tag:02d}}}:wallet:creator",
        f"{{p{tag:02d}}}:ledger",
    ]


def gift_args(caller: int) -> list[str]:
    return [str(PRICE), f"s{caller}", "cara"]


class Client(Protocol):
    """What the bench asks of each client; `wait_how` says how it puts a WAIT after a script."""

    name: str
    dist: str
    wait_how: str

    async def start(self, url: str) -> None: ...
    async def gift(self, keys: list[str], args: list[str]) -> object: ...
    async def gift_then_wait(
        self, keys: list[str], args: list[str], replicas: int, timeout_ms: int
    ) -> int: ...
    async def stop(self) -> None: ...


class RedisPy:
    """redis-py 8's asyncio RedisCluster, built as giftstream builds it."""

    name = "redis-py RedisCluster"
    dist = "redis"
    wait_how = (
        "`ClusterNode.execute_pipeline([EVALSHA, WAIT])` on `get_node_from_key`'s node: one "
        "connection, in order, no retry (server/money/same_connection.py)"
    )

    async def start(self, url: str) -> None:
        self.redis = cluster_client(url)
        await self.redis.initialize()
        self.script = self.redis.register_script(GIFT)

    async def gift(self, keys: list[str], args: list[str]) -> object:
        return await self.script(keys=keys, args=args)

    async def gift_then_wait(
        self, keys: list[str], args: list[str], replicas: int, timeout_ms: int
    ) -> int:
        node = self.redis.get_node_from_key(keys[0])
        assert node is not None
        _, acked = await script_then_wait(node, self.script, keys, args, replicas, timeout_ms)
        return acked

    async def stop(self) -> None:
        await self.redis.aclose()


class Coredis:
    """coredis's RedisCluster (anyio): used inside `async with`, as its docs ask."""

    name = "coredis RedisCluster"
    dist = "coredis"
    wait_how = (
        "`with client.ensure_replication(n, ms)`: the client sends WAIT after each command on "
        "the command's own connection (held, not shared, meanwhile); fewer acks raise "
        "ReplicationError"
    )

    async def start(self, url: str) -> None:
        coredis = importlib.import_module("coredis")
        self.replication_error: type[Exception] = importlib.import_module(
            "coredis.exceptions"
        ).ReplicationError
        self.stack = AsyncExitStack()
        self.client = await self.stack.enter_async_context(coredis.RedisCluster.from_url(url))
        self.script = self.client.register_script(GIFT)

    async def gift(self, keys: list[str], args: list[str]) -> object:
        return await self.script(keys=keys, args=args)

    async def gift_then_wait(
        self, keys: list[str], args: list[str], replicas: int, timeout_ms: int
    ) -> int:
        try:
            with self.client.ensure_replication(replicas, timeout_ms):
                await self.script(keys=keys, args=args)
        except self.replication_error:
            return 0  # fewer than `replicas`: the exact count is not told
        return replicas

    async def stop(self) -> None:
        await self.stack.aclose()


class Glide:
    """valkey-glide's GlideClusterClient: a Rust core, one multiplexed connection per node."""

    name = "valkey-glide GlideClusterClient"
    dist = "valkey-glide"
    wait_how = (
        "`invoke_script`, then `wait(n, ms, route=SlotKeyRoute(PRIMARY, key))`: the node's one "
        "multiplexed connection carries both, so the WAIT counts them, but it also blocks "
        "every other caller's commands to that node until it answers"
    )

    def __init__(self, timeout_ms: int | None = None) -> None:
        self.timeout_ms = timeout_ms
        if timeout_ms is not None:
            self.name = f"valkey-glide, request_timeout {timeout_ms} ms"

    async def start(self, url: str) -> None:
        self.glide = importlib.import_module("glide")
        self.glide.Logger.set_logger_config(self.glide.LogLevel.ERROR)  # its WARNs flood stderr
        parsed = urlparse(url)
        config = self.glide.GlideClusterClientConfiguration(
            [self.glide.NodeAddress(parsed.hostname, parsed.port)],
            request_timeout=self.timeout_ms,  # None: glide's default, 250 ms
        )
        self.client = await self.glide.GlideClusterClient.create(config)
        self.script = self.glide.Script(GIFT)

    async def gift(self, keys: list[str], args: list[str]) -> object:
        return await self.client.invoke_script(self.script, keys=keys, args=args)

    async def gift_then_wait(
        self, keys: list[str], args: list[str], replicas: int, timeout_ms: int
    ) -> int:
        await self.client.invoke_script(self.script, keys=keys, args=args)
        route = self.glide.SlotKeyRoute(self.glide.SlotType.PRIMARY, keys[0])
        return int(await self.client.wait(replicas, timeout_ms, route=route))

    async def stop(self) -> None:
        await self.client.close()


@dataclass
class Run:
    """One closed-loop run: what each call did and when (perf_counter seconds)."""

    elapsed: float = 0.0
    cpu_s: float = 0.0
    redis_cpu_s: float = 0.0  # every live redis-server's, when measured
    latencies: list[float] = field(default_factory=list)
    errors: list[tuple[float, int, str]] = field(default_factory=list)  # (when, tag, error)
    oks: list[tuple[float, int]] = field(default_factory=list)  # (when it answered, tag)

    @property
    def calls(self) -> int:
        return len(self.latencies)

    def per_s(self) -> float:
        return self.calls / self.elapsed if self.elapsed else 0.0

    def cpu_us(self) -> float:
        return self.cpu_s / self.calls * 1e6 if self.calls else float("nan")

    def redis_cpu_us(self) -> float:
        return self.redis_cpu_s / self.calls * 1e6 if self.calls else float("nan")

    def pct_ms(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def closed_loop(
    call: Callable[[int, int], Awaitable[object]],
    callers: int,
    seconds: float,
    until: threading.Event | None = None,
) -> Run:
    """`callers` tasks each calling `call(caller, tag)` back to back for `seconds` (or, given
    `until`, until it is set and then `AFTER_RECOVERY_S` more, at most FAILOVER_CAP_S)."""
    run = Run()
    started = time.perf_counter()
    cap = started + (FAILOVER_CAP_S if until is not None else seconds)
    deadline = [cap]

    async def caller(i: int) -> None:
        tag = i % TAGS
        for _ in range(MAX_CALLS_PER_CALLER):
            if time.perf_counter() >= deadline[0]:
                return
            t0 = time.perf_counter()
            try:
                async with asyncio.timeout(CALL_TIMEOUT_S):
                    await call(i, tag)
            except Exception as exc:
                run.errors.append((t0, tag, f"{type(exc).__name__}: {str(exc)[:60]}"))
                await asyncio.sleep(ERROR_PAUSE_S)
                continue
            t1 = time.perf_counter()
            run.latencies.append(t1 - t0)
            run.oks.append((t1, tag))

    async def watch() -> None:
        assert until is not None
        for _ in range(int(FAILOVER_CAP_S / 0.05)):
            if until.is_set():
                deadline[0] = min(cap, time.perf_counter() + AFTER_RECOVERY_S)
                return
            await asyncio.sleep(0.05)

    cpu0 = time.process_time()
    await asyncio.gather(*(caller(i) for i in range(callers)), *([watch()] if until else []))
    run.elapsed = time.perf_counter() - started
    run.cpu_s = time.process_time() - cpu0
    return run


@dataclass
class Failover:
    errors: int
    error_kinds: dict[str, int]
    promoted_s: float  # kill -> replica promoted and every node says ok (tests/cluster.py)
    gap_s: float  # the longest time without an answer on the killed master's tags
    last_error_s: float  # kill -> last error (0: none)
    calls_per_s: float


@dataclass
class Result:
    name: str
    version: str
    gift: Run
    wait_how: str
    wait_truthful: str
    waited: Run
    one_tag: Run
    stalled: Run
    failover: Failover


def redis_cpu_s(cluster: RedisClusterProcesses) -> float:
    """CPU seconds used so far by every live redis-server (INFO cpu: user + sys)."""
    total = 0.0
    for node in cluster.nodes:
        if node.alive():
            cpu = node.info("cpu")
            total += float(str(cpu["used_cpu_user"])) + float(str(cpu["used_cpu_sys"]))
    return total


def master_of(url: str, key: str) -> int:
    """The port of the master holding `key` now, asked of a fresh (sync) cluster client."""
    with redis.cluster.RedisCluster.from_url(url) as client:
        node = client.get_node_from_key(key)
        return int(node.port)


def seed(url: str) -> None:
    """Every tag's sender holds enough coins for any run."""
    with redis.cluster.RedisCluster.from_url(url) as client:
        for tag in range(TAGS):
            client.hset(gift_keys(tag)[0], "coins", 10**15)


async def check_wait(client: Client, cluster: RedisClusterProcesses) -> str:
    """Pause the replica of tag 0's master (SIGSTOP), send a gift and a WAIT 1 the client's
    way: it must answer 0 (no false ack), and 1 once the replica runs again. On Redis 7.0 a
    WAIT on a fresh connection right after others' writes waits too, so this shows no false
    ack, not by itself the one connection: that is each client's code (`wait_how`)."""
    keys = gift_keys(0)
    port = await asyncio.to_thread(master_of, cluster.url, keys[0])
    master = next(n for n in cluster.nodes if n.port == port)
    replica = cluster.replicas_of(master)[0]
    assert replica.process is not None
    replica.process.send_signal(signal.SIGSTOP)
    try:
        paused = await client.gift_then_wait(keys, gift_args(0), 1, PAUSED_WAIT_TIMEOUT_MS)
    finally:
        replica.process.send_signal(signal.SIGCONT)
    healthy = await client.gift_then_wait(keys, gift_args(0), 1, 1000)
    verdict = "yes" if paused == 0 and healthy == 1 else "NO"
    return f"{verdict} (paused: {paused}, healthy: {healthy})"


async def stalled(
    client: Client, cluster: RedisClusterProcesses, callers: int, seconds: float
) -> Run:
    """Gifts on tag 0 while one more caller sends gift + WAIT 1 there the client's way with
    that master's replica paused (a slow replica): whether its WAIT holds up everyone else's
    gifts to the node (it does where the node's one connection is shared)."""
    keys = gift_keys(0)
    port = await asyncio.to_thread(master_of, cluster.url, keys[0])
    master = next(n for n in cluster.nodes if n.port == port)
    replica = cluster.replicas_of(master)[0]
    assert replica.process is not None
    stop = time.perf_counter() + seconds

    async def waiter() -> None:
        for _ in range(int(seconds * 1000 / PAUSED_WAIT_TIMEOUT_MS) + 1):
            if time.perf_counter() >= stop:
                return
            await client.gift_then_wait(keys, gift_args(0), 1, PAUSED_WAIT_TIMEOUT_MS)

    async def gift(i: int, tag: int) -> object:
        return await client.gift(keys, gift_args(i))

    replica.process.send_signal(signal.SIGSTOP)
    try:
        run, _ = await asyncio.gather(closed_loop(gift, callers, seconds), waiter())
    finally:
        replica.process.send_signal(signal.SIGCONT)
    await asyncio.to_thread(cluster.wait_ok)
    return run


async def failover(client: Client, cluster: RedisClusterProcesses, callers: int) -> Failover:
    """Gifts from every caller while tag 0's master is killed -9; the killed node is started
    again afterwards (it rejoins as a replica) so the next client meets 3 + 3 nodes."""
    port = await asyncio.to_thread(master_of, cluster.url, gift_keys(0)[0])
    victim = next(n for n in cluster.nodes if n.port == port)
    url = cluster.url
    on_victim = {t for t in range(TAGS) if master_of(url, gift_keys(t)[0]) == port}
    recovered = threading.Event()
    killed_at: list[float] = []
    promoted_at: list[float] = []

    def kill() -> None:
        try:
            killed_at.append(time.perf_counter())
            cluster.kill_master(victim)
            promoted_at.append(time.perf_counter())
        finally:
            recovered.set()

    async def killer() -> None:
        await asyncio.sleep(KILL_AFTER_S)
        await asyncio.to_thread(kill)

    async def call(i: int, tag: int) -> object:
        return await client.gift(gift_keys(tag), gift_args(i))

    run_t0 = [time.perf_counter()]
    run, _ = await asyncio.gather(closed_loop(call, callers, 0, until=recovered), killer())
    await asyncio.to_thread(restart, cluster, victim)
    kill_t = killed_at[0]
    answered = sorted(t for t, tag in run.oks if tag in on_victim)
    gaps = [b - a for a, b in itertools.pairwise(answered)]
    if answered:  # no answer from some time before the kill to the end: that much, at least
        gaps.append(run.elapsed + run_t0[0] - answered[-1])
    errors_after = [t for t, _, _ in run.errors if t > kill_t]
    return Failover(
        errors=len(run.errors),
        error_kinds=kinds(run),
        promoted_s=(promoted_at[0] - kill_t) if promoted_at else float("nan"),
        gap_s=max(gaps, default=float("nan")),
        last_error_s=(max(errors_after) - kill_t) if errors_after else 0.0,
        calls_per_s=run.per_s(),
    )


def kinds(run: Run) -> dict[str, int]:
    """How many errors of each type a run met."""
    found: dict[str, int] = {}
    for _, _, kind in run.errors:
        found[kind] = found.get(kind, 0) + 1
    return found


def restart(cluster: RedisClusterProcesses, node: ClusterNode) -> None:
    cluster.restart(node)
    cluster.wait_ok()


async def measure(
    client: Client, cluster: RedisClusterProcesses, args: argparse.Namespace
) -> Result:
    await client.start(cluster.url)
    try:

        async def gift(i: int, tag: int) -> object:
            return await client.gift(gift_keys(tag), gift_args(i))

        async def gift_tag0(i: int, tag: int) -> object:
            return await client.gift(gift_keys(0), gift_args(i))

        async def gift_wait(i: int, tag: int) -> object:
            return await client.gift_then_wait(gift_keys(tag), gift_args(i), 1, WAIT_TIMEOUT_MS)

        await closed_loop(gift, args.callers, WARMUP_S)  # connections, scripts loaded
        redis_cpu0 = await asyncio.to_thread(redis_cpu_s, cluster)
        gift_run = await closed_loop(gift, args.callers, args.seconds)
        gift_run.redis_cpu_s = await asyncio.to_thread(redis_cpu_s, cluster) - redis_cpu0
        log(
            f"  gift: {gift_run.per_s():,.0f}/s, {gift_run.cpu_us():.0f} µs CPU/call, "
            f"Redis {gift_run.redis_cpu_us():.0f} µs/call"
        )
        truthful = await check_wait(client, cluster)
        log(f"  WAIT truthful: {truthful}")
        waited = await closed_loop(gift_wait, args.callers, args.wait_seconds)
        log(f"  gift+WAIT: {waited.per_s():,.0f}/s, errors {len(waited.errors)}")
        one_tag = await closed_loop(gift_tag0, ONE_TAG_CALLERS, STALL_S)
        stall = await stalled(client, cluster, ONE_TAG_CALLERS, STALL_S)
        log(
            f"  one tag: {one_tag.per_s():,.0f}/s p99 {one_tag.pct_ms(0.99):.0f} ms, errors "
            f"{kinds(one_tag)}; with a "
            f"WAIT on a paused replica: {stall.per_s():,.0f}/s p99 {stall.pct_ms(0.99):.0f} ms, "
            f"errors {kinds(stall)}"
        )
        over = await failover(client, cluster, args.callers)
        log(f"  failover: {over}")
    finally:
        await client.stop()
    return Result(
        client.name,
        version(client.dist),
        gift_run,
        client.wait_how,
        truthful,
        waited,
        one_tag,
        stall,
        over,
    )


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- maintenance facts, from the installed metadata and PyPI (pip, the ordinary client) ----
def pypi_facts(dist: str) -> dict[str, str]:
    """License, Python versions (installed metadata), the latest version (`pip index`), and
    when that version's wheel was built (its METADATA's date in the wheel `pip download`s)."""
    facts: dict[str, str] = {"installed": version(dist)}
    try:
        meta = importlib.metadata.metadata(dist)
    except importlib.metadata.PackageNotFoundError:
        return facts
    facts["license"] = first(meta.get_all("License-Expression") or meta.get_all("License"))
    facts["requires_python"] = first(meta.get_all("Requires-Python"))
    pythons = sorted(
        {
            c.rsplit("::", 1)[1].strip()
            for c in meta.get_all("Classifier") or []
            if c.startswith("Programming Language :: Python :: 3.")
        },
        key=lambda v: [int(p) for p in v.split(".")],
    )
    facts["classifiers"] = ", ".join(pythons) or "?"
    pip = [sys.executable, "-m", "pip"]
    out = subprocess.run(
        [*pip, "index", "versions", dist], capture_output=True, text=True, timeout=120
    ).stdout
    latest = out.split("(", 1)[1].split(")", 1)[0] if "(" in out else "?"
    facts["latest"] = latest
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                *pip,
                "download",
                "-q",
                "--no-deps",
                "--only-binary",
                ":all:",
                "-d",
                tmp,
                f"{dist}=={latest}",
            ],
            capture_output=True,
            timeout=300,
        )
        for wheel in Path(tmp).glob("*.whl"):
            with zipfile.ZipFile(wheel) as zf:
                info = next(i for i in zf.infolist() if i.filename.endswith(".dist-info/METADATA"))
                y, m, d = info.date_time[:3]
                built = f"{y:04d}-{m:02d}-{d:02d}"
                # a reproducible build stamps every file with one fixed old date
                facts["wheel_built"] = built if y >= 2021 else f"unknown (stamped {built})"
    return facts


def first(values: list[Any] | None) -> str:
    return str(values[0]).splitlines()[0] if values else "?"


def table(results: Sequence[Result], callers: int) -> str:
    rows = [
        "| client | version | gifts/s | client CPU µs/gift | Redis CPU µs/gift | p50 ms | p99 ms "
        "| gift+WAIT/s (p99 ms) | WAIT counts the script (replica paused) "
        f"| one tag, {ONE_TAG_CALLERS} callers: gifts/s (p99 ms), alone / beside a WAIT on a "
        "paused replica "
        "| failover: errors, longest gap on the killed master's tags (s), promotion (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        f = r.failover
        rows.append(
            f"| {r.name} | {r.version} | {r.gift.per_s():,.0f} | {r.gift.cpu_us():.0f} "
            f"| {r.gift.redis_cpu_us():.0f} "
            f"| {r.gift.pct_ms(0.5):.1f} | {r.gift.pct_ms(0.99):.1f} "
            f"| {r.waited.per_s():,.0f} ({r.waited.pct_ms(0.99):.0f}; "
            f"{len(r.waited.errors)} errors) | {r.wait_truthful} "
            f"| {r.one_tag.per_s():,.0f} ({r.one_tag.pct_ms(0.99):.0f}; "
            f"errors {json.dumps(kinds(r.one_tag))}) / "
            f"{r.stalled.per_s():,.0f} ({r.stalled.pct_ms(0.99):.0f}; "
            f"errors {json.dumps(kinds(r.stalled))}) "
            f"| {f.errors} {json.dumps(f.error_kinds)}, {f.gap_s:.1f}, {f.promoted_s:.1f} |"
        )
    return (
        "\n".join(rows)
        + f"\n\n{callers} closed-loop callers; gift errors: "
        + ", ".join(f"{r.name} {len(r.gift.errors)}" for r in results)
    )


CLIENTS: dict[str, Callable[[], Client]] = {"redis-py": RedisPy, "coredis": Coredis, "glide": Glide}
IMPORTS = {"redis-py": "redis", "coredis": "coredis", "glide": "glide"}
DISTS = {"redis-py": "redis", "coredis": "coredis", "glide": "valkey-glide"}


def installed(name: str) -> bool:
    try:
        importlib.import_module(IMPORTS[name])
    except ImportError:
        return False
    return True


async def main_async(args: argparse.Namespace) -> list[Result]:
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="giftstream-clientbench-") as tmp:
        cluster = RedisClusterProcesses(Path(tmp))
        await asyncio.to_thread(cluster.start)
        try:
            await asyncio.to_thread(seed, cluster.url)
            for name in args.clients:
                if not installed(name):
                    log(f"{name}: not installed, skipped (see the docstring)")
                    continue
                log(f"{name}: measuring")
                client = Glide(args.glide_timeout_ms) if name == "glide" else CLIENTS[name]()
                results.append(await measure(client, cluster, args))
        finally:
            await asyncio.to_thread(cluster.stop)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--callers", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--wait-seconds", type=float, default=3.0)
    parser.add_argument("--clients", nargs="+", default=list(CLIENTS), choices=list(CLIENTS))
    parser.add_argument(
        "--glide-timeout-ms", type=int, default=None, help="glide's request_timeout (250 ms)"
    )
    parser.add_argument("--no-pypi", action="store_true", help="skip the maintenance facts")
    args = parser.parse_args()
    results = uvloop.run(main_async(args))
    print(table(results, args.callers))
    for r in results:
        print(f"\n{r.name}: script + WAIT on one connection: {r.wait_how}")
    if not args.no_pypi:
        for name in args.clients:
            print(f"\n{DISTS[name]}: {json.dumps(pypi_facts(DISTS[name]))}")


if __name__ == "__main__":
    main()
