"""A refused gift costs Redis a script: the gift budget is per user, shared by every
connection of that user on the node, so more sockets do not buy more scripts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import redis.asyncio as aioredis

from giftstream.server.app import App
from tests.helpers import TokenMaker, WsClient

SOCKETS = 5
GIFTS_EACH = 40
USER_RATE = 5.0
USER_BURST = 5


async def scripts_run(redis: aioredis.Redis) -> int:
    """Script calls Redis has served so far (INFO commandstats)."""
    stats = await redis.info("commandstats")
    return sum(
        int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))
        for name in ("evalsha", "eval", "fcall")
    )


async def test_refusals_are_bounded_per_user_whatever_the_sockets(
    make_app: Callable[..., App], tokens: TokenMaker, redis_client: aioredis.Redis
) -> None:
    lifted = {  # each connection alone could send all its gifts at once
        "gifts_per_s": 1000.0,
        "gifts_burst": 1000,
        "messages_burst": 1000,
        "flood_strikes": 1000,
    }
    # the memory broker: Redis then runs no room scripts of its own (the Redis broker's
    # presence and viewers scripts), so every script counted is a gift's; and no heartbeat
    quiet = {"stats_interval_s": 3600.0}  # the heartbeat's script, once at start, not here
    async with make_app(
        "memory", user_gifts_per_s=USER_RATE, user_gifts_burst=USER_BURST, **lifted, **quiet
    ) as node:
        creator, _ = await WsClient.login(node.ws_url, tokens("cara", "creator"))
        await creator.request({"type": "go_live", "title": "t"})
        sockets = []
        for _ in range(SOCKETS):  # one user with no coins, several sockets
            client, welcome = await WsClient.login(node.ws_url, tokens("pauper"))
            assert welcome["coins"] == 0
            await client.request({"type": "join", "room": "cara"})
            sockets.append(client)
        before = await scripts_run(redis_client)
        started = time.monotonic()
        replies = await asyncio.gather(
            *(
                client.request(
                    {
                        "type": "gift",
                        "room": "cara",
                        "gift": "rose",
                        "count": 1,
                        "key": f"pauper-{s}-{n:04d}",
                    },
                    timeout=30,
                )
                for s, client in enumerate(sockets)
                for n in range(GIFTS_EACH)
            )
        )
        elapsed = time.monotonic() - started
        ran = await scripts_run(redis_client) - before
        codes = [r.get("code") for r in replies]
        assert set(codes) == {"insufficient_coins", "rate_limited"}, set(codes)
        assert codes.count("insufficient_coins") == ran
        assert ran <= USER_BURST + USER_RATE * elapsed + 1, (ran, elapsed)
        assert codes.count("rate_limited") == SOCKETS * GIFTS_EACH - ran
        for client in [*sockets, creator]:
            await client.close()
