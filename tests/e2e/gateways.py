"""Several `giftstream serve` processes on one Redis, and room members that follow one room
across them: what the multi-gateway tests (PROTOCOL.md §6) share."""

from __future__ import annotations

import asyncio
import functools
import subprocess
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import orjson
import redis as syncredis

from giftstream.server.money import keys
from tests.helpers import Frame, WsClient
from tests.processes import GIFTSTREAM, ServerProcess

ROOM_DEADLINE_S = 30.0  # generous: a loaded 2-core machine runs several gateways and Redis
PRESENCE_DEADLINE_S = 15.0 + 30.0  # a dead gateway's viewers leave within 15 s; plus margin


@functools.cache
def serve_options() -> str:
    """`giftstream serve --help`, read once: which options this build has."""
    return subprocess.run(
        [*GIFTSTREAM, "serve", "--help"], capture_output=True, text=True, timeout=60, check=True
    ).stdout


def gateway_args(redis_url: str) -> list[str]:
    """The options every gateway of one service shares (the secrets come from
    ServerProcess): one Redis, and the Redis broker where this build has the option."""
    args = ["--redis-url", redis_url]
    if "--broker" in serve_options():
        args += ["--broker", "redis"]
    return args


def gateway(
    root: Path, name: str, redis_url: str, host: str | None = None, prefix: Iterable[str] = ()
) -> ServerProcess:
    """One gateway with its own data dir (nothing in it is shared: Redis and secrets are)."""
    return ServerProcess(root / name, *gateway_args(redis_url), host=host, prefix=tuple(prefix))


async def start(*procs: ServerProcess) -> None:
    """Start gateways side by side, off the event loop (clients keep reading meanwhile)."""
    await asyncio.gather(*(asyncio.to_thread(p.start) for p in procs))


async def kill9(proc: ServerProcess) -> None:
    await asyncio.to_thread(proc.kill)


def stop_all(procs: Iterable[ServerProcess]) -> None:
    for proc in procs:
        if proc.running:
            proc.stop()


def ledger_gifts(redis_url: str, room: str) -> list[dict[str, object]]:
    """Every gift entry of `room` in the ledger, in ledger order."""
    client = syncredis.Redis.from_url(redis_url)
    try:
        entries = client.xrange(keys.LEDGER)
    finally:
        client.close()
    found = []
    for _, fields in entries or []:
        assert fields is not None
        data = orjson.loads(fields[b"data"])
        if data["kind"] == "gift" and data["room"] == room:
            found.append(data)
    return found


class Member:
    """One user in one room, followed across reconnections: the room events of every
    connection it had, in arrival order, make one stream that must have no hole."""

    def __init__(self, user: str, token: str, room: str) -> None:
        self.user = user
        self.token = token
        self.room = room
        self.client: WsClient | None = None
        self.earlier: list[Frame] = []  # room events of the connections before this one
        self.first_seq: int | None = None  # the room's seq at the first join
        self.gateway = ""

    async def join(self, url: str, name: str) -> Frame:
        """Connect to the gateway at `url` and join the room; after a first join, with
        `since` = the last seq seen, which must recover every missed event."""
        if self.client is not None:
            self.earlier.extend(self.client.room_events)
        self.client, _ = await WsClient.login(url, self.token)
        self.gateway = name
        if self.first_seq is None:
            joined = await self.client.request({"type": "join", "room": self.room})
            assert joined["type"] == "joined", joined
            self.first_seq = int(joined["seq"])
        else:
            since = self.last_seq()
            joined = await self.client.request({"type": "join", "room": self.room, "since": since})
            assert joined["type"] == "joined", joined
            assert joined["recovered"] is True, (self.user, since, joined)
        return joined

    def events(self) -> list[Frame]:
        current = self.client.room_events if self.client is not None else []
        return [*self.earlier, *current]

    def last_seq(self) -> int:
        assert self.first_seq is not None
        return max((int(e["seq"]) for e in self.events()), default=self.first_seq)

    def gift_events(self) -> Counter[str]:
        """How many times each gift event (by event id) arrived."""
        return Counter(str(e["event"]) for e in self.events() if e["type"] == "gift")

    def seq_hole(self) -> str | None:
        """Why the stream is not the room's seqs first_seq+1, +2, ... each once; None if it is."""
        assert self.first_seq is not None
        seqs = [int(e["seq"]) for e in self.events()]
        expected = list(range(self.first_seq + 1, self.first_seq + 1 + len(seqs)))
        if seqs == expected:
            return None
        return f"{self.user}: seqs {seqs} after joining at {self.first_seq}"

    def latest_viewers(self) -> int | None:
        counts = [int(e["count"]) for e in self.events() if e["type"] == "viewers"]
        return counts[-1] if counts else None

    async def wait_for_gifts(self, wanted: set[str], timeout: float = ROOM_DEADLINE_S) -> None:
        """Until every event id in `wanted` has arrived (on this or an earlier connection)."""
        assert self.client is not None

        def done() -> bool | None:
            return wanted <= set(self.gift_events()) or None

        try:
            await self.client.wait_until(done, timeout, f"{len(wanted)} gifts")
        except AssertionError:
            missing = wanted - set(self.gift_events())
            raise AssertionError(
                f"{self.user} on gateway {self.gateway} never saw {len(missing)} of "
                f"{len(wanted)} gifts it waited for"
            ) from None

    async def wait_for_viewers(self, count: int, timeout: float = PRESENCE_DEADLINE_S) -> None:
        assert self.client is not None
        try:
            await self.client.wait_until(
                lambda: self.latest_viewers() == count or None, timeout, f"viewers {count}"
            )
        except AssertionError:
            raise AssertionError(
                f"{self.user}: viewer count {self.latest_viewers()}, not {count}"
            ) from None

    async def gift(self, key: str, gift: str = "heart") -> Frame:
        assert self.client is not None
        ok = await self.client.request(
            {"type": "gift", "room": self.room, "gift": gift, "count": 1, "key": key}
        )
        assert ok["type"] == "gift_ok", ok
        return ok

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
