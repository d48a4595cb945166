"""How many ledger entries a second the JetStream relay moves: a bounded measurement, not a
test (nothing here asserts on speed). It starts its own redis-server, XADDs N gift entries
shaped like the wallet's, and times one in-process relay from the first entry to lag 0.

    .venv/bin/python -m tests.server.ledger.relay_throughput [--entries 20000] [--nats URL]

NATS: --nats, else a nats-server from PATH on a free port, else 127.0.0.1:4222. Each run
uses a stream of its own and deletes it afterwards. Gives up after --timeout seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import nats
import orjson
import redis.asyncio as aioredis

from giftstream.server.embedded_redis import EmbeddedRedis, free_port
from giftstream.server.ledger.relay.config import RelayConfig
from giftstream.server.ledger.relay.lag import relay_lag
from giftstream.server.ledger.relay.worker import Relay
from giftstream.server.money import keys


def gift_entry(i: int, now_ms: int) -> bytes:
    """A gift entry as server/lua writes it (FIELDS["gift"] plus event, kind and ts)."""
    return orjson.dumps(
        {
            "event": f"bench-{uuid.uuid4().hex}",
            "kind": "gift",
            "ts": now_ms + i,
            "sender": f"viewer{i % 500}",
            "creator": "cara",
            "room": "cara",
            "gift": "heart",
            "key": f"k-{i:08d}",
            "count": 1 + i % 3,
            "coins": 5,
            "diamonds": 2,
            "platform": 3,
            "combo": 1 + i % 7,
        }
    )


async def add_gift_entries(client: aioredis.Redis, n: int, ledger_key: str = keys.LEDGER) -> None:
    """XADD `n` gift entries (gift_entry), a thousand per pipeline."""
    now_ms = int(time.time() * 1000)
    for start in range(0, n, 1000):
        async with client.pipeline(transaction=False) as pipe:
            for i in range(start, min(start + 1000, n)):
                pipe.xadd(ledger_key, {"data": gift_entry(i, now_ms)})
            await pipe.execute()


async def measure(redis_url: str, nats_url: str, entries: int, timeout: float) -> float:
    client = aioredis.Redis.from_url(redis_url)
    tag = uuid.uuid4().hex[:10]
    config = RelayConfig(
        nats_url=nats_url, stream=f"GSBENCH_{tag}", subject_prefix=f"gsbench{tag}.ledger"
    )
    try:
        await add_gift_entries(client, entries)
        stop = asyncio.Event()
        relay = Relay(client, config)
        started = time.monotonic()
        task = asyncio.create_task(relay.run(stop))
        try:
            while (await relay_lag(client)).entries:
                if time.monotonic() - started > timeout:
                    raise SystemExit(f"the relay did not finish {entries} entries in {timeout}s")
                if task.done():
                    task.result()
                    raise SystemExit("the relay stopped before it finished")
                await asyncio.sleep(0.01)
            elapsed = time.monotonic() - started
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
        published = int(
            relay.metrics.registry.get_sample_value("giftstream_relay_published_total") or 0
        )
        if published != entries:
            raise SystemExit(f"published {published} of {entries}")
        return entries / elapsed
    finally:
        await client.aclose()
        nc = await nats.connect(nats_url)
        with contextlib.suppress(Exception):
            await nc.jsm().delete_stream(config.stream)
        await nc.close()


def _listens(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=20_000)
    parser.add_argument("--nats", help="NATS URL (default: nats-server from PATH, or :4222)")
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        nats_url = args.nats
        binary = shutil.which("nats-server")
        if nats_url is None and binary is not None:
            port = free_port()
            proc = subprocess.Popen(
                [binary, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(tmp / "js")],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            stack.callback(proc.wait, 10)
            stack.callback(proc.terminate)  # callbacks run last first: terminate, then wait
            nats_url = f"nats://127.0.0.1:{port}"
            deadline = time.monotonic() + 10
            while not _listens(port):
                if time.monotonic() > deadline:
                    raise SystemExit(f"nats-server did not listen on {port}")
                time.sleep(0.05)
        nats_url = nats_url or "nats://127.0.0.1:4222"
        redis = EmbeddedRedis(tmp / "redis")
        redis.start()
        stack.callback(redis.stop)
        rate = asyncio.run(measure(redis.url, nats_url, args.entries, args.timeout))
    print(f"relayed {args.entries} entries at {rate:,.0f} entries/s", file=sys.stdout)


if __name__ == "__main__":
    main()
