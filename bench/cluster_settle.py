"""The processes of scenario 11 (bench/cluster.py), each its own OS process so that its CPU is
its own: `gifts` is the gateway's money path alone (the real Wallet, no sockets), `credit` is
one crediting runner (server/money/crediting.py). Both talk to Redis as `giftstream serve`
does; they print one line per step for the parent to time its CPU windows on.

    python -m bench.cluster_settle gifts --url URL [--cluster] [--durable] [--plain] ...
        prints `funded`, `go` (the timed window opens), `stop`, then `result {json}`
    python -m bench.cluster_settle credit --url URL
        prints `credited N` every 0.2 s; on SIGTERM `result {json}` (credit lag percentiles)

`--plain` (one Redis only) sends each gift script as its own EVALSHA through a redis-py
connection pool instead of the Wallet's ScriptBatcher: what the batcher wins.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
import uvloop
from redis.asyncio.cluster import RedisCluster

from giftstream.server.money import keys
from giftstream.server.money.catalog import load_catalog
from giftstream.server.money.crediting import Crediting, Entry
from giftstream.server.money.refusal import Reason, Refusal
from giftstream.server.money.wallet import Wallet
from giftstream.server.redis_cluster import RedisClient

T = TypeVar("T")
FUND_CONCURRENCY = 50
FUNDED_GIFTS = 100_000


class PlainWallet(Wallet):
    """The Wallet with each script sent as its own EVALSHA over the client's pool (redis-py's
    AsyncScript), as a plain redis-py program would: the same scripts, keys and replies."""

    async def _call(
        self,
        name: str,
        script_keys: Sequence[str],
        args: Sequence[Any],
        result: Callable[[list[Any]], T],
        *,
        durable: bool = False,
    ) -> T:
        reply = await self._scripts[name](keys=script_keys, args=args, client=self._redis)
        if keys.text(reply[0]) != "ok":
            raise Refusal(Reason(keys.text(reply[0])), keys.text(reply[1]))
        return result(reply[1:])


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def client(url: str, cluster: bool, pool: int) -> RedisClient:
    if cluster:
        return RedisCluster.from_url(url, max_connections=pool)
    return aioredis.Redis.from_pool(
        aioredis.BlockingConnectionPool.from_url(url, max_connections=pool, timeout=10)
    )


def keyspace(cluster: bool, partitions: int) -> keys.KeySpace:
    return keys.KeySpace(partitions=partitions, cluster=True) if cluster else keys.SINGLE


async def gifts(args: argparse.Namespace) -> dict[str, Any]:
    catalog = load_catalog()
    redis = client(args.url, args.cluster, args.senders + 8)
    kind = PlainWallet if args.plain else Wallet
    wallet = kind(
        redis,
        catalog.economics,
        keyspace=keyspace(args.cluster, args.partitions),
        durable_ack=args.durable,
    )
    await wallet.load_scripts()
    big = catalog.packages["coins_17500"]
    gate = asyncio.Semaphore(FUND_CONCURRENCY)

    # enough for FUNDED_GIFTS roses over all senders (a lone sender settles thousands a second)
    purchases = max(1, -(-FUNDED_GIFTS // (args.senders * big.coins)))

    async def fund(i: int) -> None:
        async with gate:
            for r in range(purchases):
                await wallet.purchase(
                    receipt=f"bench-{i}-{r}", user=f"s{i}", package=big, adult=True
                )

    await asyncio.gather(*(fund(i) for i in range(args.senders)))
    print("funded", flush=True)
    rose = catalog.gifts["rose"]
    latencies: list[float] = []
    settled = total = 0
    start = time.perf_counter() + args.warm
    end = start + args.seconds

    async def sender(i: int) -> None:
        nonlocal settled, total
        n = 0
        creator = f"c{i % args.creators}"
        while (t0 := time.perf_counter()) < end:
            await wallet.send_gift(
                sender=f"s{i}",
                adult=True,
                creator=creator,
                room=creator,
                gift=rose,
                count=1,
                key=f"k-{i}-{n:08d}",
            )
            n += 1
            total += 1
            if start <= t0:
                settled += 1
                latencies.append(time.perf_counter() - t0)

    async def window() -> float:
        await asyncio.sleep(args.warm)
        print("go", flush=True)
        cpu0 = time.process_time()
        await asyncio.sleep(args.seconds)
        used = time.process_time() - cpu0
        print("stop", flush=True)
        return used

    cpu, *_ = await asyncio.gather(window(), *(sender(i) for i in range(args.senders)))
    await redis.aclose()
    return {
        "settled": settled,
        "total": total,
        "seconds": args.seconds,
        "gifts_per_s": settled / args.seconds,
        "p50_ms": percentile(latencies, 0.5) * 1e3,
        "p99_ms": percentile(latencies, 0.99) * 1e3,
        "cpu_s": cpu,
    }


class TimedCrediting(Crediting):
    """A crediting runner that notes, for each gift it credits, how long after its settlement
    (the ledger entry's ts, Redis's clock on this machine) the credit was written."""

    lags_ms: list[float]
    credited: int = 0

    async def credit(
        self, source: int, target: int, expected: str, entries: Sequence[Entry]
    ) -> int:
        applied = await super().credit(source, target, expected, entries)
        if applied:
            now = time.time() * 1000
            self.lags_ms.extend(now - e.ts for e in entries)
            self.credited += applied
        return applied


async def credit(args: argparse.Namespace) -> dict[str, Any]:
    redis = client(args.url, True, 64)
    runner = TimedCrediting(redis, keyspace(True, args.partitions))
    runner.lags_ms = []
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)

    async def report() -> None:
        while not stop.is_set():
            print(f"credited {runner.credited}", flush=True)
            await asyncio.sleep(0.2)

    started = time.process_time()
    await asyncio.gather(runner.run(stop, args.interval), report())
    await redis.aclose()
    lags = runner.lags_ms
    return {
        "credited": runner.credited,
        "lag_p50_ms": percentile(lags, 0.5),
        "lag_p99_ms": percentile(lags, 0.99),
        "lag_max_ms": max(lags, default=float("nan")),
        "lag_mean_ms": statistics.fmean(lags) if lags else float("nan"),
        "cpu_s": time.process_time() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("gifts", "credit"))
    parser.add_argument("--url", required=True)
    parser.add_argument("--cluster", action="store_true")
    parser.add_argument("--partitions", type=int, default=keys.DEFAULT_PARTITIONS)
    parser.add_argument("--senders", type=int, default=200)
    parser.add_argument("--creators", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--warm", type=float, default=1.0)
    parser.add_argument("--durable", action="store_true")
    parser.add_argument("--plain", action="store_true")
    # a gateway under load is poked by every gift: its rounds run back to back
    parser.add_argument("--interval", type=float, default=0.0)
    args = parser.parse_args()
    result = uvloop.run(gifts(args) if args.mode == "gifts" else credit(args))
    print("result " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
