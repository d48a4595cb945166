"""The relay's lag (relay_lag) at every stage of its consumer group, and `relay --status`
saying the same: a real Redis, no NATS needed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import Connection

from giftstream.server.ledger.relay.config import GROUP
from giftstream.server.ledger.relay.lag import Lag, relay_lag
from giftstream.server.money import keys
from tests.processes import run_cli


async def test_relay_lag_at_every_stage_of_the_group(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    """No stream, an empty stream, unread, pending, acked, trimmed and deleted entries."""
    assert await relay_lag(redis_client) == Lag(0, 0.0, None)  # no stream at all
    await redis_client.xadd("other:ledger", {"data": b"{}"})
    no_group = await relay_lag(redis_client, "other:ledger")  # entries, the relay never ran
    assert (no_group.entries, no_group.last_delivered) == (1, None)

    await redis_client.xgroup_create(keys.LEDGER, GROUP, id="0", mkstream=True)
    assert await relay_lag(redis_client) == Lag(0, 0.0, "0-0")  # empty stream, a group

    now_ms = int(time.time() * 1000)
    ids = [f"{now_ms - 9000 + 1000 * i}-0" for i in range(4)]  # 9, 8, 7 and 6 s old
    for stream_id in ids[:3]:
        await redis_client.xadd(keys.LEDGER, {"data": b"{}"}, id=stream_id)

    def close_to(age: float, want: float) -> bool:
        return want <= age < want + 5  # the clock moves on while the test runs

    lag = await relay_lag(redis_client)  # unread only
    assert (lag.entries, lag.last_delivered) == (3, "0-0") and close_to(lag.oldest_age_s, 9)
    await redis_client.xreadgroup(GROUP, "relay", {keys.LEDGER: ">"}, count=2)
    lag = await relay_lag(redis_client)  # two pending, one unread
    assert (lag.entries, lag.last_delivered) == (3, ids[1]) and close_to(lag.oldest_age_s, 9)
    await redis_client.xack(keys.LEDGER, GROUP, *ids[:2])
    lag = await relay_lag(redis_client)  # nothing pending, one unread
    assert (lag.entries, lag.last_delivered) == (1, ids[1]) and close_to(lag.oldest_age_s, 7)
    await redis_client.xreadgroup(GROUP, "relay", {keys.LEDGER: ">"})
    await redis_client.xack(keys.LEDGER, GROUP, ids[2])
    assert await relay_lag(redis_client) == Lag(0, 0.0, ids[2])  # everything acked
    await redis_client.xtrim(keys.LEDGER, minid="9999999999999-0")
    assert await relay_lag(redis_client) == Lag(0, 0.0, ids[2])  # acked and trimmed: empty

    # an unread entry deleted: Redis no longer knows the lag (nil); it is counted instead
    await redis_client.xadd(keys.LEDGER, {"data": b"{}"}, id=ids[3])
    gone = await redis_client.xadd(keys.LEDGER, {"data": b"{}"})
    await redis_client.xdel(keys.LEDGER, gone)
    lag = await relay_lag(redis_client)
    assert (lag.entries, lag.last_delivered) == (1, ids[2]) and close_to(lag.oldest_age_s, 6)
    for ledger_key in (keys.LEDGER, "other:ledger"):  # and `relay --status` says the same
        status = await asyncio.to_thread(
            run_cli, "relay", "--status", "--redis-url", redis_url, "--ledger-key", ledger_key
        )
        assert status.returncode == 0 and status.stderr == "", status.stderr
        assert status.stdout.startswith('{"entries":1,'), status.stdout


def _sending(command: str | bytes | Iterable[bytes]) -> bytes:
    if isinstance(command, str):
        return command.encode()
    if isinstance(command, bytes):
        return command
    return b"".join(bytes(part) for part in command)


def _acks_before_xpending(ack: Callable[[], Awaitable[None]]) -> type[Connection]:
    """A connection that, just before it sends an XPENDING, lets another client ack: what a
    running relay does whenever its batch ends between two of relay_lag's reads."""

    class AckFirst(Connection):
        async def send_packed_command(
            self, command: str | bytes | Iterable[bytes], check_health: bool = True
        ) -> None:
            if b"XPENDING" in _sending(command).upper():
                await ack()
            await super().send_packed_command(command, check_health)

    return AckFirst


async def test_relay_lag_while_the_relay_acks_its_last_pending_entries(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    """The intermittent `ValueError: invalid literal for int() … 'None'`: relay_lag read
    XINFO GROUPS (pending 2), the relay acked its batch, and the XPENDING summary read next
    had no oldest entry (None). Here the ack always lands at that moment."""
    for _ in range(3):
        await redis_client.xadd(keys.LEDGER, {"data": b"{}"})
    await redis_client.xgroup_create(keys.LEDGER, GROUP, id="0")
    read: Any = await redis_client.xreadgroup(GROUP, "relay", {keys.LEDGER: ">"}, count=2)
    batch: list[bytes] = [i for i, _ in read[0][1]]
    acks = 0

    async def ack() -> None:
        nonlocal acks
        acks += await redis_client.xack(keys.LEDGER, GROUP, *batch)

    racing = aioredis.Redis.from_url(redis_url, connection_class=_acks_before_xpending(ack))
    try:
        lag = await relay_lag(racing)
    finally:
        await racing.aclose()
    assert acks == 2  # the ack did land while relay_lag was reading
    assert (lag.entries, lag.last_delivered) == (1, batch[1].decode())  # one left unread
    assert 0 <= lag.oldest_age_s < 5
