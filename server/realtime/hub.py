"""The hub: live rooms, who is in them, the tick, and batched fan-out to viewers and ops.

Nothing else touches a room's viewer set. A room's events go through the broker
(server/realtime/broker.py), which numbers them, keeps their history for `since` and hands
each room's events of one tick back through the hub's subscription; the hub frames them once
and writes the same bytes to every viewer and ops watcher of the room, awaiting none.

A room's viewer count counts users, not sockets: a viewer with the room open in two tabs is
one viewer until they have left it in both.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from websockets.asyncio.server import ServerConnection

from giftstream.protocol.codec import join_room_frame
from giftstream.protocol.errors import ErrorCode, ProtocolError
from giftstream.protocol.events import Joined, RoomEnded, ViewersEvent
from giftstream.server.metrics import Metrics
from giftstream.server.money import keys
from giftstream.server.realtime.broker import Broker, Event, MakeEvent, room_key
from giftstream.server.realtime.fanout import Fanout, text_frame
from giftstream.server.realtime.ops import OpsFeed

log = logging.getLogger(__name__)

LIVE_ROOMS_KEY = "giftstream:rooms:live"


def _viewers_event(room_id: str, count: int, seq: int) -> Event:
    return ViewersEvent(room=room_id, seq=seq, count=count).as_dict()


@dataclass(eq=False, slots=True)
class Room:
    id: str
    creator: str
    title: str
    started_ms: int
    viewers: dict[ServerConnection, str] = field(default_factory=dict)  # socket -> its user
    users: dict[str, int] = field(default_factory=dict)  # user -> their sockets in the room
    viewers_announced: int = 0

    def add(self, conn: ServerConnection, user: str) -> None:
        if conn not in self.viewers:
            self.viewers[conn] = user
            self.users[user] = self.users.get(user, 0) + 1

    def remove(self, conn: ServerConnection) -> None:
        user = self.viewers.pop(conn, None)
        if user is not None:
            left = self.users[user] - 1
            if left:
                self.users[user] = left
            else:
                del self.users[user]


class Hub:
    """Owns every live room on this node; see the module docstring for the rules."""

    def __init__(
        self,
        redis: aioredis.Redis,
        broker: Broker,
        fanout: Fanout,
        ops: OpsFeed,
        metrics: Metrics,
    ) -> None:
        self.redis = redis
        self.broker = broker
        self.fanout = fanout
        self.ops = ops
        self.metrics = metrics
        self.rooms: dict[str, Room] = {}
        self._joined: dict[ServerConnection, set[str]] = {}

    # ---- lifecycle of rooms -------------------------------------------------------------

    async def restore(self) -> int:
        """Load the rooms Redis says are live (after a restart); returns how many."""
        room_ids = sorted(keys.text(m) for m in await self.redis.smembers(LIVE_ROOMS_KEY))
        async with self.redis.pipeline(transaction=False) as pipe:
            for room_id in room_ids:
                pipe.hgetall(room_key(room_id))
            records = await pipe.execute()
        rooms: list[Room] = []
        for room_id, raw in zip(room_ids, records, strict=True):
            record = {keys.text(k): keys.text(v) for k, v in raw.items()}
            if record.get("live") != "1":
                continue
            rooms.append(
                Room(
                    id=room_id,
                    creator=record.get("creator", room_id),
                    title=record.get("title", ""),
                    started_ms=int(record.get("started", "0")),
                )
            )
        await asyncio.gather(*(self.broker.subscribe(room.id, self._deliver) for room in rooms))
        for room in rooms:
            self.rooms[room.id] = room
        self.metrics.rooms_live.set(len(self.rooms))
        return len(self.rooms)

    async def go_live(self, creator: str, title: str, now_ms: int) -> Room:
        """Open the creator's room (their room id is their user id); live again is a no-op
        that keeps the room and updates its title."""
        room = self.rooms.get(creator)
        if room is not None:
            if title and title != room.title:
                room.title = title
                await self.redis.hset(room_key(creator), "title", title)
            return room
        # the seq first: Redis never records a room live that this node could not number
        await self.broker.subscribe(creator, self._deliver)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                room_key(creator),
                mapping={"creator": creator, "title": title, "live": "1", "started": now_ms},
            )
            pipe.sadd(LIVE_ROOMS_KEY, creator)
            await pipe.execute()
        if creator in self.rooms:  # two go_live from the same creator raced; keep the first
            return self.rooms[creator]
        room = Room(id=creator, creator=creator, title=title, started_ms=now_ms)
        self.rooms[creator] = room
        self.metrics.rooms_live.set(len(self.rooms))
        self.ops.room_opened(room.id, room.creator, room.title)
        log.info("room %s is live", creator)
        return room

    async def end_live(self, creator: str) -> Room:
        """End the creator's room: every viewer gets `room_ended`, then the room is gone."""
        room = self.rooms.get(creator)
        if room is None:
            raise ProtocolError(ErrorCode.ROOM_NOT_LIVE, "your room is not live")
        self.publish(room, lambda seq: RoomEnded(room=room.id, seq=seq).as_dict())
        await self.broker.flush((room.id,))
        del self.rooms[creator]
        for conn in room.viewers:
            joined = self._joined.get(conn)
            if joined is not None:
                joined.discard(room.id)
        room.viewers.clear()
        room.users.clear()
        await self.broker.unsubscribe(room.id)  # its seq bound was persisted by the flush
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(room_key(creator), "live", "0")
            pipe.srem(LIVE_ROOMS_KEY, creator)
            await pipe.execute()
        self.metrics.rooms_live.set(len(self.rooms))
        log.info("room %s ended", creator)
        return room

    async def live_room(self, room_id: str) -> Room:
        """The live room `room_id`, or the error saying whether it was ever live."""
        room = self.rooms.get(room_id)
        if room is not None:
            return room
        if await self.redis.exists(room_key(room_id)):
            raise ProtocolError(ErrorCode.ROOM_NOT_LIVE, f"room {room_id} is not live")
        raise ProtocolError(ErrorCode.UNKNOWN_ROOM, f"no room {room_id}")

    # ---- membership ---------------------------------------------------------------------

    def join(
        self, conn: ServerConnection, room: Room, since: int | None, *, user: str
    ) -> tuple[Joined, bytes | None]:
        """Add `conn` (of `user`) to `room`; the `joined` reply and, for `since`, the frame of
        missed events. The caller writes both before it awaits anything, so no flush slips
        between."""
        room.add(conn, user)
        self._joined.setdefault(conn, set()).add(room.id)
        broker = self.broker
        broker.report_presence(room.id, len(room.users))
        recovered: bool | None = None
        missed: bytes | None = None
        if since is None:
            seq = broker.top_seq(room.id)
        else:
            history = broker.history(room.id, since)
            seq, recovered = history.top_seq, history.recovered
            if history.events:
                missed = join_room_frame(history.events)
        joined = Joined(
            room=room.id,
            creator=room.creator,
            title=room.title,
            viewers=broker.presence(room.id),
            seq=seq,
            recovered=recovered,
        )
        return joined, missed

    def leave(self, conn: ServerConnection, room_id: str) -> bool:
        """Remove `conn` from `room_id`; False when it was not there."""
        joined = self._joined.get(conn)
        if joined is None or room_id not in joined:
            return False
        joined.discard(room_id)
        room = self.rooms.get(room_id)
        if room is not None:
            room.remove(conn)
            self.broker.report_presence(room_id, len(room.users))
        return True

    def leave_all(self, conn: ServerConnection) -> None:
        for room_id in self._joined.pop(conn, set()):
            room = self.rooms.get(room_id)
            if room is not None:
                room.remove(conn)
                self.broker.report_presence(room_id, len(room.users))

    def is_member(self, conn: ServerConnection, room_id: str) -> bool:
        joined = self._joined.get(conn)
        return joined is not None and room_id in joined

    # ---- events and fan-out -------------------------------------------------------------

    def publish(self, room: Room, make_event: MakeEvent) -> None:
        """Queue an event (built by `make_event(seq)`) for the next tick; never awaits."""
        self.broker.publish(room.id, make_event)

    def first_publication(self, room: Room, event: str, ts_ms: int, *, replayed: bool) -> bool:
        """Whether a settled gift is to be published in `room` now (see the broker's
        `first_publication`): never twice, even when its key is replayed."""
        if self.rooms.get(room.id) is not room:
            return False  # ended meanwhile: its viewers are gone
        return self.broker.first_publication(room.id, event, ts_ms, replayed=replayed)

    def announce_viewers(self) -> None:
        """A `viewers` event for each room whose count changed since it was last announced."""
        presence = self.broker.presence
        for room in self.rooms.values():
            count = presence(room.id)
            if count != room.viewers_announced:
                room.viewers_announced = count
                self.publish(room, functools.partial(_viewers_event, room.id, count))

    async def flush(self) -> None:
        """Send every room's queued events, one frame per room."""
        await self.broker.flush()

    def _deliver(self, room_id: str, encoded: Sequence[bytes]) -> None:
        """A room's events of one tick, from the broker: framed once, written to all."""
        room = self.rooms.get(room_id)
        if room is None:
            return
        frame = text_frame(join_room_frame(encoded))
        self.fanout.send(room.viewers, frame)
        if self.ops.has_watchers:
            watchers = [w for w in self.ops.watchers_of(room.id) if w not in room.viewers]
            self.fanout.send(watchers, frame)
        self.metrics.broadcast_frames.inc()

    async def run(self, tick_s: float, viewers_interval_s: float, stop: asyncio.Event) -> None:
        """The fan-out clock: flush every tick, announce viewer counts every interval, until
        `stop` is set (a cancel, which cuts a sleep short, can be swallowed by redis-py)."""
        loop = asyncio.get_running_loop()
        next_viewers = loop.time() + viewers_interval_s
        while not stop.is_set():
            await asyncio.sleep(tick_s)
            if loop.time() >= next_viewers:
                next_viewers = loop.time() + viewers_interval_s
                self.announce_viewers()
            try:
                await self.flush()
            except Exception:  # one failed flush (Redis away) must not stop the clock
                log.exception("room flush failed; retrying next tick")
