"""The ops feed: who watches which rooms, `room_opened` notices and once-a-second stats, for
the whole service: notices go through the ops log (every gateway reads them) and stats are the
sum of every live gateway's heartbeat (server/realtime/registry.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator

from websockets.asyncio.server import ServerConnection

from giftstream.protocol.codec import encode
from giftstream.protocol.events import RoomOpened, Stats
from giftstream.protocol.rules import ALL_ROOMS
from giftstream.server.realtime.fanout import Fanout
from giftstream.server.realtime.opslog import Notice, OpsLog
from giftstream.server.realtime.registry import GatewayRegistry, ServiceMeter

log = logging.getLogger(__name__)

ROOM_OPENED = "room_opened"


class OpsFeed:
    """Owns the ops watchers; rooms ask it who else should get a room's frames."""

    def __init__(self, fanout: Fanout, ops_log: OpsLog, registry: GatewayRegistry) -> None:
        self.fanout = fanout
        self.ops_log = ops_log
        self.registry = registry
        self.meter = ServiceMeter()
        self._watching: dict[str, dict[ServerConnection, None]] = {}
        self._rooms_of: dict[ServerConnection, tuple[str, ...]] = {}
        self._opened_listeners: list[Callable[[str], object]] = []
        self.gifts = 0  # settled here since start, for this gateway's heartbeat
        self.coins = 0
        self._refusals: dict[str, int] = {}  # error replies sent here since start, by code

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
        """Tell every ops watcher of the service, on every gateway (this one too, through the
        log, so each gets it once). Queued: the ops loop's next turn writes it."""
        frame = encode(RoomOpened(room=room, creator=creator, title=title))
        self.ops_log.append(Notice(room=room, kind=ROOM_OPENED, frame=frame))

    def on_room_opened(self, listener: Callable[[str], object]) -> None:
        """Call `listener(room)` for each room that opened anywhere in the service, as this
        gateway reads it from the ops log (it reads while it has ops watchers)."""
        self._opened_listeners.append(listener)

    def record_gift(self, coins: int) -> None:
        """Count a settled gift for this gateway's heartbeat."""
        self.gifts += 1
        self.coins += coins

    def record_refusal(self, code: str) -> None:
        """Count an error reply for this gateway's heartbeat (the dashboard's refusals)."""
        self._refusals[code] = self._refusals.get(code, 0) + 1

    @property
    def refusals(self) -> tuple[tuple[str, int], ...]:
        """The error replies sent here since start, by code, codes sorted."""
        return tuple(sorted(self._refusals.items()))

    async def start(self) -> None:
        """Read the ops log from now on (before the gateway takes connections)."""
        await self.ops_log.start()

    async def flush(self) -> None:
        """Write the queued notices without reading (at shutdown)."""
        await self.ops_log.exchange(read=False)

    async def run(self, tick_s: float, stats_interval_s: float, stop: asyncio.Event) -> None:
        """The ops clock, until `stop` is set (a cancel alone can be swallowed by redis-py):
        every tick, write queued notices and deliver new ones when someone here watches;
        every stats interval, this gateway's heartbeat, and the service's stats line to
        every watcher here (one heartbeat an interval, in step with the readings).

        With no watcher, the log is skipped through once a stats interval instead of read
        every tick: a watcher gets the notices from at most one interval before it came."""
        loop = asyncio.get_running_loop()
        next_stats = loop.time() + stats_interval_s  # the app beat once as it started
        failing: set[str] = set()
        while not stop.is_set():
            await asyncio.sleep(tick_s)
            due = loop.time() >= next_stats
            if due:
                next_stats = loop.time() + stats_interval_s
            watched = self.has_watchers
            if watched or due or self.ops_log.has_pending:
                with _retried("ops log", failing):
                    self._deliver(await self.ops_log.exchange(read=watched))
                    if not watched and not self.has_watchers:
                        self.ops_log.skip()
            if due:
                with _retried("gateway heartbeat", failing):
                    await self._beat_and_send_stats()

    def _deliver(self, notices: list[Notice]) -> None:
        for notice in notices:
            watchers = list(self.watchers_of(notice.room))
            if watchers:
                self.fanout.deliver(watchers, notice.frame)
            if notice.kind == ROOM_OPENED:
                for listener in self._opened_listeners:
                    listener(notice.room)

    async def _beat_and_send_stats(self) -> None:
        """This gateway's heartbeat and, when someone here watches, the service's figures to
        every watcher; the meter starts afresh after a stretch with no watcher, so its rates
        never span it."""
        if not self._rooms_of:
            self.meter.reset()
            await self.registry.beat()
            return
        figures = self.meter.update(await self.registry.survey())
        if not self._rooms_of:  # every watcher left while Redis answered
            return
        frame = encode(
            Stats(
                ts=figures.ts,
                rooms=figures.rooms,
                connections=figures.connections,
                gifts_per_s=figures.gifts_per_s,
                coins_per_s=figures.coins_per_s,
                refusals=figures.refusals,
            )
        )
        self.fanout.deliver(list(self._rooms_of), frame)


@contextlib.contextmanager
def _retried(step: str, failing: set[str]) -> Iterator[None]:
    """One turn of `step`; a failure (Redis away) is logged once until it works again, and
    the next turn tries again: the ops clock never stops."""
    try:
        yield
    except Exception:
        if step not in failing:
            log.warning("%s failed; retrying every turn", step, exc_info=True)
        failing.add(step)
    else:
        if step in failing:
            log.info("%s works again", step)
        failing.discard(step)
