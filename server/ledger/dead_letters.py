"""The dead-letter stream: its name, and replaying its entries once the handler is fixed."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from giftstream.server.ledger.entries import LedgerEntry, parse_entry, read_raw
from giftstream.server.money import keys
from giftstream.server.redis_cluster import RedisClient

log = logging.getLogger(__name__)


def dead_letter_stream(ledger_key: str = keys.LEDGER) -> str:
    """The default dead-letter stream of a ledger: giftstream:ledger:dead."""
    return keys.dead_letters(ledger_key)


async def replay_dead_letters(
    redis: RedisClient,
    group: str,
    handler: Callable[[LedgerEntry], Awaitable[None]],
    *,
    ledger_key: str = keys.LEDGER,
    dead_letter_key: str | None = None,
) -> tuple[int, int]:
    """Hand `group`'s dead letters to `handler` again (once its bug is fixed), oldest first;
    each one it now handles is deleted from the dead-letter stream, the others stay.
    Returns (handled, still failing). Safe to run twice: handlers are idempotent."""
    dead_key = dead_letter_key or dead_letter_stream(ledger_key)
    handled = failing = 0
    async for dead_id, fields in read_raw(redis, dead_key):
        if keys.text(fields.get(b"group", fields.get("group", ""))) != group:
            continue
        stream_id = keys.text(fields.get(b"stream_id", fields.get("stream_id", "")))
        try:
            await handler(parse_entry(stream_id, {b"data": fields.get(b"data", b"")}))
        except Exception as exc:
            failing += 1
            log.warning("dead letter %s (entry %s) still fails: %s", dead_id, stream_id, exc)
            continue
        await redis.xdel(dead_key, dead_id)
        handled += 1
    return handled, failing
