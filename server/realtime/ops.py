"""The ops feed: who watches which rooms, `room_opened` notices and once-a-second stats."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator

from websockets.asyncio.server import ServerConnection

from giftstream.protocol.codec import encode
from giftstream.protocol.events import RoomOpened, Stats
from giftstream.protocol.rules import ALL_ROOMS
from giftstream.server.realtime.fanout import Fanout


class OpsFeed:
    """Owns the ops watchers; rooms ask it who else should get a room's frames."""

    def __init__(self, fanout: Fanout) -> None:
        self.fanout = fanout
        self._watching: dict[str, dict[ServerConnection, None]] = {}
        self._rooms_of: dict[ServerConnection, tuple[str, ...]] = {}
        self._gifts = 0
        self._coins = 0

    def watch(self, conn: ServerConnection, rooms: tuple[str, ...]) -> None:
        """Replace what `conn` watches with `rooms` (room ids, or "*" for all)."""
        self.unwatch(conn)
        for room in rooms:
            self._watching.setdefault(room, {})[conn] = None
        self._rooms_of[conn] = rooms

    def unwatch(self, conn: ServerConnection) -> None:
        for room in self._rooms_of.pop(conn, ()):
            watchers = self._watching.get(room)
            if watchers is not None:
                watchers.pop(conn, None)
                if not watchers:
                    del self._watching[room]

    def watchers_of(self, room: str) -> Iterator[ServerConnection]:
        """Every watcher of `room`, each once (a watcher of both "*" and the room included)."""
        everyone = self._watching.get(ALL_ROOMS, {})
        yield from everyone
        for conn in self._watching.get(room, ()):
            if conn not in everyone:
                yield conn

    def watched_rooms(self) -> tuple[str, ...]:
        """The room ids (or "*") someone here watches: the hub follows them."""
        return tuple(self._watching)

    @property
    def has_watchers(self) -> bool:
        return bool(self._rooms_of)

    def room_opened(self, room: str, creator: str, title: str) -> None:
        watchers = list(self.watchers_of(room))
        if watchers:
            frame = encode(RoomOpened(room=room, creator=creator, title=title))
            self.fanout.deliver(watchers, frame)

    def record_gift(self, coins: int) -> None:
        """Count a settled gift for the next stats line."""
        self._gifts += 1
        self._coins += coins

    async def run_stats(
        self,
        interval_s: float,
        counts: Callable[[], tuple[int, int]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Every `interval_s`: rates since the last line, sent to every watcher; runs until
        cancelled. `counts` returns (live rooms, connections)."""
        last = clock()
        while True:
            await asyncio.sleep(interval_s)
            now = clock()
            elapsed = max(now - last, 1e-9)
            gifts, coins, self._gifts, self._coins = self._gifts, self._coins, 0, 0
            last = now
            if not self._rooms_of:
                continue
            rooms, connections = counts()
            frame = encode(
                Stats(
                    ts=int(time.time() * 1000),
                    rooms=rooms,
                    connections=connections,
                    gifts_per_s=round(gifts / elapsed, 2),
                    coins_per_s=round(coins / elapsed, 2),
                )
            )
            self.fanout.deliver(list(self._rooms_of), frame)
