"""Gifts settled per second by the wallet alone (no sockets): N closed-loop senders against
a fresh embedded Redis. Shows what sharing round trips buys on the money path.

    .venv/bin/python bench/wallet_settle.py --senders 500 --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import redis.asyncio as aioredis
import uvloop

from giftstream.server.embedded_redis import EmbeddedRedis
from giftstream.server.money.catalog import load_catalog
from giftstream.server.money.wallet import Wallet


async def run(url: str, senders: int, seconds: float) -> tuple[int, float]:
    catalog = load_catalog()
    pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=64, timeout=10)
    redis = aioredis.Redis.from_pool(pool)
    wallet = Wallet(redis, catalog.economics)
    await wallet.load_scripts()
    big = catalog.packages["coins_17500"]
    for i in range(senders):
        for r in range(20):
            await wallet.purchase(
                receipt=f"bench-{i}-{r:03d}", user=f"s{i}", package=big, adult=True
            )
    rose = catalog.gifts["rose"]
    settled = 0
    deadline = time.perf_counter() + seconds

    async def sender(i: int) -> None:
        nonlocal settled
        n = 0
        while time.perf_counter() < deadline:
            await wallet.send_gift(
                sender=f"s{i}",
                adult=True,
                creator="cara",
                room="cara",
                gift=rose,
                count=1,
                key=f"k-{i}-{n:08d}",
            )
            n += 1
            settled += 1

    started = time.perf_counter()
    await asyncio.gather(*(sender(i) for i in range(senders)))
    elapsed = time.perf_counter() - started
    await redis.aclose()
    return settled, elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--senders", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(Path(tmp)) as redis:
        settled, elapsed = uvloop.run(run(redis.url, args.senders, args.seconds))
    print(
        f"{settled} gifts in {elapsed:.2f}s: {settled / elapsed:,.0f} gifts/s "
        f"({args.senders} closed-loop senders)"
    )


if __name__ == "__main__":
    main()
