"""A consumer in a child process, for the kill -9 tests: it runs a real handler (from
HANDLERS) in the group of the same name, prints each stream id it has handled, and after
`stall_after` of them stalls inside the handler (effects applied, nothing acked) until the
test kills it.

    python -m tests.server.ledger.consumer_child REDIS_URL HANDLER STALL_AFTER
"""

from __future__ import annotations

import asyncio
import sys

import redis.asyncio as aioredis

from giftstream.server.ledger.consumer import HANDLERS, LedgerConsumer
from giftstream.server.ledger.entries import LedgerEntry
from giftstream.server.money import keys

CONSUMER = "doomed"


async def main(redis_url: str, handler_name: str, stall_after: int) -> None:
    client = aioredis.Redis.from_url(redis_url)
    real = HANDLERS[handler_name](client, keys.SINGLE, keys.SINGLE.ledger())
    handled = 0

    async def handler(entry: LedgerEntry) -> None:
        nonlocal handled
        await real(entry)
        handled += 1
        print(f"handled {entry.id}", flush=True)
        if handled >= stall_after:
            print("stalling", flush=True)
            await asyncio.sleep(3600)

    consumer = LedgerConsumer(client, handler_name, CONSUMER, handler, batch=1000, block_ms=100)
    await consumer.run(asyncio.Event())


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
