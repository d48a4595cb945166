"""The hub: live rooms, who is in them, each room's seq and history, and batched fan-out.

Nothing else touches a room's viewer set. Events are numbered when published, collected in
the room's outbox, and once per tick encoded into one frame that goes to every viewer and
ops watcher of the room (the same bytes, no per-viewer await). Only flushed events enter
the history, so a `since` join never sees an event twice; they enter it as their encoded
bytes, which the garbage collector never scans (kept as dicts, a busy room's history was
what made the full collections that stalled every room for tens of ms).

A room's seq must never go backwards, even across a crash: the hub persists a reserved
upper bound (`seq_reserved`, in blocks) before it sends any seq past it, and a restarted
server resumes from that bound, so a client's `since` is either recovered or answered
`recovered:false`, never silently wrong.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from websockets.asyncio.server import ServerConnection

from giftstream.protocol.codec import encode_event, join_room_frame
from giftstream.protocol.errors import ErrorCode, ProtocolError
from giftstream.protocol.events import Joined, RoomEnded, ViewersEvent
from giftstream.server.metrics import Metrics
from giftstream.server.money import keys
from giftstream.server.realtime.fanout import Fanout, text_frame
from giftstream.server.realtime.ops import OpsFeed

log = logging.getLogger(__name__)

SEQ_BLOCK = 1024  # seqs reserved per Redis write
LIVE_ROOMS_KEY = "giftstream:rooms:live"
Event = dict[str, Any]


def room_key(room_id: str) -> str:
    return f"giftstream:room:{room_id}"


def _viewers_event(room_id: str, count: int, seq: int) -> Event:
    return ViewersEvent(room=room_id, seq=seq, count=count).as_dict()


@dataclass(eq=False, slots=True)
class Room:
    id: str
    creator: str
    title: str
    started_ms: int
    seq: int  # last seq given to an event
    seq_reserved: int  # persisted bound: no seq above it has been sent
    flushed_seq: int = 0  # last seq sent to viewers
    viewers: dict[ServerConnection, None] = field(default_factory=dict)
    history: deque[tuple[int, bytes]] = field(default_factory=deque)  # (seq, encoded event)
    outbox: list[Event] = field(default_factory=list)
    viewers_announced: int = 0


class Hub:
    """Owns every live room on this node; see the module docstring for the rules."""

    def __init__(
        self,
        redis: aioredis.Redis,
        fanout: Fanout,
        ops: OpsFeed,
        metrics: Metrics,
        *,
        history_size: int,
    ) -> None:
        self.redis = redis
        self.fanout = fanout
        self.ops = ops
        self.metrics = metrics
        self.history_size = history_size
        self.rooms: dict[str, Room] = {}
        self._joined: dict[ServerConnection, set[str]] = {}
        self._dirty: dict[str, Room] = {}

    # ---- lifecycle of rooms -------------------------------------------------------------

    async def restore(self) -> int:
        """Load the rooms Redis says are live (after a restart); returns how many."""
        room_ids = sorted(keys.text(m) for m in await self.redis.smembers(LIVE_ROOMS_KEY))
        async with self.redis.pipeline(transaction=False) as pipe:
            for room_id in room_ids:
                pipe.hgetall(room_key(room_id))
            records = await pipe.execute()
        for room_id, raw in zip(room_ids, records, strict=True):
            record = {keys.text(k): keys.text(v) for k, v in raw.items()}
            if record.get("live") != "1":
                continue
            reserved = int(record.get("seq_reserved", "0"))
            self.rooms[room_id] = Room(
                id=room_id,
                creator=record.get("creator", room_id),
                title=record.get("title", ""),
                started_ms=int(record.get("started", "0")),
                seq=reserved,
                seq_reserved=reserved,
                flushed_seq=reserved,
                history=deque(maxlen=self.history_size),
            )
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
        reserved = int(await self.redis.hget(room_key(creator), "seq_reserved") or 0)
        room = Room(
            id=creator,
            creator=creator,
            title=title,
            started_ms=now_ms,
            seq=reserved,
            seq_reserved=reserved + SEQ_BLOCK,
            flushed_seq=reserved,
            history=deque(maxlen=self.history_size),
        )
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                room_key(creator),
                mapping={
                    "creator": creator,
                    "title": title,
                    "live": "1",
                    "started": now_ms,
                    "seq_reserved": room.seq_reserved,
                },
            )
            pipe.sadd(LIVE_ROOMS_KEY, creator)
            await pipe.execute()
        if creator in self.rooms:  # two go_live from the same creator raced; keep the first
            return self.rooms[creator]
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
        await self._flush_rooms([room])
        del self.rooms[creator]
        self._dirty.pop(creator, None)
        for conn in room.viewers:
            joined = self._joined.get(conn)
            if joined is not None:
                joined.discard(room.id)
        room.viewers.clear()
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(room_key(creator), mapping={"live": "0", "seq_reserved": room.seq_reserved})
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
        self, conn: ServerConnection, room: Room, since: int | None
    ) -> tuple[Joined, bytes | None]:
        """Add `conn` to `room`; the `joined` reply and, for `since`, the frame of missed
        events. The caller writes both before it awaits anything, so no flush slips between."""
        room.viewers[conn] = None
        self._joined.setdefault(conn, set()).add(room.id)
        recovered: bool | None = None
        missed: bytes | None = None
        if since is not None:
            encoded = [data for seq, data in room.history if seq > since]
            oldest = room.history[0][0] if room.history else room.flushed_seq + 1
            recovered = oldest <= since + 1 and since <= room.flushed_seq
            if encoded:
                missed = join_room_frame(encoded)
        joined = Joined(
            room=room.id,
            creator=room.creator,
            title=room.title,
            viewers=len(room.viewers),
            seq=room.flushed_seq,
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
            room.viewers.pop(conn, None)
        return True

    def leave_all(self, conn: ServerConnection) -> None:
        for room_id in self._joined.pop(conn, set()):
            room = self.rooms.get(room_id)
            if room is not None:
                room.viewers.pop(conn, None)

    def is_member(self, conn: ServerConnection, room_id: str) -> bool:
        joined = self._joined.get(conn)
        return joined is not None and room_id in joined

    # ---- events and fan-out -------------------------------------------------------------

    def publish(self, room: Room, make_event: Callable[[int], Event]) -> Event:
        """Number an event (built by `make_event(seq)`) and queue it for the next tick."""
        room.seq += 1
        event = make_event(room.seq)
        room.outbox.append(event)
        self._dirty[room.id] = room
        return event

    def announce_viewers(self) -> None:
        """A `viewers` event for each room whose count changed since it was last announced."""
        for room in self.rooms.values():
            count = len(room.viewers)
            if count != room.viewers_announced:
                room.viewers_announced = count
                self.publish(room, functools.partial(_viewers_event, room.id, count))

    async def flush(self) -> None:
        """Send every room's queued events, one frame per room."""
        if self._dirty:
            rooms = list(self._dirty.values())
            self._dirty.clear()
            try:
                await self._flush_rooms(rooms)
            except BaseException:
                for room in rooms:  # keep them queued for the next tick
                    if room.outbox and room.id in self.rooms:
                        self._dirty[room.id] = room
                raise

    async def _flush_rooms(self, rooms: list[Room]) -> None:
        await self._reserve_seqs(rooms)
        for room in rooms:
            if not room.outbox:
                continue
            events, room.outbox = room.outbox, []
            encoded = [encode_event(event) for event in events]
            frame = text_frame(join_room_frame(encoded))  # encoded and framed once
            for event, data in zip(events, encoded, strict=True):
                room.history.append((event["seq"], data))
            room.flushed_seq = events[-1]["seq"]
            self.fanout.send(room.viewers, frame)
            if self.ops.has_watchers:
                watchers = [w for w in self.ops.watchers_of(room.id) if w not in room.viewers]
                self.fanout.send(watchers, frame)
            self.metrics.broadcast_frames.inc()

    async def _reserve_seqs(self, rooms: list[Room]) -> None:
        """Persist a new seq bound for each room about to send a seq past its old one."""
        while True:
            bounds = {room: room.seq + SEQ_BLOCK for room in rooms if room.seq > room.seq_reserved}
            if not bounds:
                return
            async with self.redis.pipeline(transaction=False) as pipe:
                for room, bound in bounds.items():
                    pipe.hset(room_key(room.id), "seq_reserved", bound)
                await pipe.execute()
            for room, bound in bounds.items():
                room.seq_reserved = max(room.seq_reserved, bound)

    async def run(self, tick_s: float, viewers_interval_s: float) -> None:
        """The fan-out clock: flush every tick, announce viewer counts every interval.
        Runs until cancelled."""
        loop = asyncio.get_running_loop()
        next_viewers = loop.time() + viewers_interval_s
        while True:
            await asyncio.sleep(tick_s)
            if loop.time() >= next_viewers:
                next_viewers = loop.time() + viewers_interval_s
                self.announce_viewers()
            try:
                await self.flush()
            except Exception:  # one failed flush (Redis away) must not stop the clock
                log.exception("room flush failed; retrying next tick")

    @property
    def connections_in_rooms(self) -> int:
        return len(self._joined)
