"""The hub: live rooms, who is in them, the tick, and batched fan-out to viewers and ops.

Nothing else touches a room's viewer set. A room's events go through the broker
(server/realtime/broker.py), which numbers them, keeps their history for `since` and hands
each room's events of one tick back through the hub's subscription; the hub frames them once
and writes the same bytes to every viewer and ops watcher of the room, awaiting none.

A room's viewer count counts users, not sockets: a viewer with the room open in two tabs is
one viewer until they have left it in both.

With a shared (Redis) broker, rooms live in Redis and every gateway serves any room: a room
not followed here is loaded on its first `join`; a delivered `room_ended` drops it here,
whichever gateway ended it; a room no one here views or watches is let go after a grace; the
gateway holding a creator's connection keeps their room's `creator_seen` fresh, and every
gateway's sweep ends the rooms whose creator has been away for the idle time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import orjson
from redis.exceptions import NoScriptError
from websockets.asyncio.server import ServerConnection

from giftstream.protocol.codec import is_room_ended, join_room_frame, text_json
from giftstream.protocol.errors import ErrorCode, ProtocolError
from giftstream.protocol.events import Joined, LiveRoom
from giftstream.protocol.rules import ALL_ROOMS
from giftstream.server import scripts
from giftstream.server.metrics import Metrics
from giftstream.server.money import keys
from giftstream.server.realtime.broker import LIVE_ROOMS_KEY, Broker, MakeEvent
from giftstream.server.realtime.fanout import Fanout, text_frame
from giftstream.server.realtime.ops import OpsFeed
from giftstream.server.redis_cluster import RedisClient

log = logging.getLogger(__name__)

# A `watching` reply lists at most this many live rooms (its frame stays far below a
# connection's backlog bound).
MAX_LIVE_LISTED = 500

__all__ = ["LIVE_ROOMS_KEY", "Hub", "Room", "RoomTimes"]


@dataclass(frozen=True, slots=True)
class RoomTimes:
    """How a shared broker's rooms are kept: the creator's heartbeat, the idle time after
    which a room whose creator is away is ended, and how long a room no one here views or
    watches stays followed."""

    creator_seen_s: float = 5.0
    room_idle_s: float = 300.0
    unfollow_after_s: float = 5.0

    @property
    def sweep_s(self) -> float:
        """How often each gateway looks for idle rooms: a few times per idle time."""
        return min(max(self.room_idle_s / 4, 0.05), 30.0)


@dataclass(eq=False, slots=True)
class Room:
    id: str
    creator: str
    title: str
    started_ms: int
    viewers: dict[ServerConnection, str] = field(default_factory=dict)  # socket -> its user
    users: dict[str, int] = field(default_factory=dict)  # user -> their sockets in the room
    json: bytes = b""  # the room id as JSON: a gift event's part (protocol/codec.py)
    unused_since: float | None = None  # loop time since which no one here views or watches

    def __post_init__(self) -> None:
        self.json = orjson.dumps(self.id)

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
    """Owns every room followed on this node; see the module docstring for the rules."""

    def __init__(
        self,
        redis: RedisClient,
        broker: Broker,
        fanout: Fanout,
        ops: OpsFeed,
        metrics: Metrics,
        times: RoomTimes | None = None,
    ) -> None:
        self.redis = redis
        self.broker = broker
        self.keyspace = broker.keyspace  # one naming of room keys, the broker's
        self.fanout = fanout
        self.ops = ops
        self.metrics = metrics
        self.times = times or RoomTimes()
        self.rooms: dict[str, Room] = {}
        self._joined: dict[ServerConnection, set[str]] = {}
        self._loading: dict[str, asyncio.Future[Room | None]] = {}
        self._ended: list[str] = []  # rooms whose `room_ended` was delivered this flush
        self._creators: dict[str, int] = {}  # creator -> their connections here
        self._open = scripts.register(redis, "room_open")
        self._seen = scripts.register(redis, "creator_seen")

    # ---- lifecycle of rooms -------------------------------------------------------------

    async def restore(self) -> int:
        """After a restart: with the memory broker, load the rooms Redis says are live (their
        history was memory); a shared broker loads each on demand. Returns how many are live."""
        room_ids = sorted(await self._live_room_ids())
        if self.broker.shared:
            return len(room_ids)
        rooms = [room for room in await self._records(room_ids) if room is not None]
        await asyncio.gather(*(self.broker.subscribe(room.id, self._deliver) for room in rooms))
        for room in rooms:
            self.rooms[room.id] = room
        self.metrics.rooms_live.set(len(self.rooms))
        return len(self.rooms)

    async def _live_room_ids(self) -> set[str]:
        """The ids in every partition's live-room set (one Redis: the one set), one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for live_set in self.keyspace.all_live_rooms():
                pipe.smembers(live_set)
            members = await pipe.execute()
        return {keys.text(m) for part in members for m in part}

    async def _records(self, room_ids: Sequence[str]) -> list[Room | None]:
        """Each room's record as a Room, None for one that is not live."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for room_id in room_ids:
                pipe.hgetall(self.keyspace.room(room_id))
            records = await pipe.execute()
        rooms: list[Room | None] = []
        for room_id, raw in zip(room_ids, records, strict=True):
            record = {keys.text(k): keys.text(v) for k, v in raw.items()}
            if record.get("live") != "1":
                rooms.append(None)
                continue
            rooms.append(
                Room(
                    id=room_id,
                    creator=record.get("creator", room_id),
                    title=record.get("title", ""),
                    started_ms=int(record.get("started", "0")),
                )
            )
        return rooms

    async def go_live(self, creator: str, title: str, now_ms: int, name: str = "") -> Room:
        """Open the creator's room (their room id is their user id), from any gateway; live
        again is a no-op that keeps the room and updates its title. `name`, the creator's
        display name, is what the creators_day board shows for them."""
        room = self.rooms.get(creator)
        if room is not None:
            if title and title != room.title:
                room.title = title
                await self.redis.hset(self.keyspace.room(creator), "title", title)
            return room
        if not self.broker.shared:
            # the seq first: Redis never records a room live that this node could not number
            await self.broker.subscribe(creator, self._deliver)
        ks = self.keyspace
        opened, stored_title, started = await self._open(
            keys=[ks.room(creator), ks.live_rooms_of(creator), ks.board_session(creator)],
            args=[creator, title, now_ms, text_json(name) if name else b""],
        )
        if creator in self.rooms:  # two go_live from the same creator raced; keep the first
            return self.rooms[creator]
        room = Room(
            id=creator, creator=creator, title=keys.text(stored_title), started_ms=int(started)
        )
        await self._follow(room)
        if opened:
            self.ops.room_opened(room.id, room.creator, room.title)
            log.info("room %s is live", creator)
        return self.rooms[creator]

    async def _follow(self, room: Room) -> None:
        if self.broker.shared:
            await self.broker.subscribe(room.id, self._deliver)
        if room.id not in self.rooms:
            self.rooms[room.id] = room
            room.unused_since = asyncio.get_running_loop().time()
            self.metrics.rooms_live.set(len(self.rooms))

    async def end_live(self, creator: str) -> None:
        """End the creator's room, from any gateway: every viewer, on every gateway, gets
        `room_ended`, then the room is gone."""
        ended = await self.broker.end_room(creator)
        await self._drop_ended()
        if not ended:
            raise ProtocolError(ErrorCode.ROOM_NOT_LIVE, "your room is not live")
        log.info("room %s ended", creator)

    async def live_room(self, room_id: str) -> Room:
        """The live room `room_id` (with a shared broker, loaded and followed here if need
        be), or the error saying whether it was ever live."""
        room = self.rooms.get(room_id)
        if room is not None:
            return room
        if self.broker.shared:
            room = await self._load(room_id)
            if room is not None:
                return room
        if await self.redis.exists(self.keyspace.room(room_id)):
            raise ProtocolError(ErrorCode.ROOM_NOT_LIVE, f"room {room_id} is not live")
        raise ProtocolError(ErrorCode.UNKNOWN_ROOM, f"no room {room_id}")

    async def refusal_elsewhere(self, room_id: str) -> ProtocolError:
        """Why a request about a room not followed here is refused (without following it):
        live elsewhere, it was not joined here; else not live, or unknown."""
        live = await self.redis.hget(self.keyspace.room(room_id), "live")
        if live == b"1":
            return ProtocolError(ErrorCode.NOT_JOINED, f"join room {room_id} before gifting")
        if live is not None or await self.redis.exists(self.keyspace.room(room_id)):
            return ProtocolError(ErrorCode.ROOM_NOT_LIVE, f"room {room_id} is not live")
        return ProtocolError(ErrorCode.UNKNOWN_ROOM, f"no room {room_id}")

    async def _load(self, room_id: str) -> Room | None:
        """Follow a live room here, once however many ask at the same time."""
        loading = self._loading.get(room_id)
        if loading is not None:
            return await asyncio.shield(loading)
        future: asyncio.Future[Room | None] = asyncio.get_running_loop().create_future()
        self._loading[room_id] = future
        try:
            (room,) = await self._records([room_id])
            if room is not None:
                await self._follow(room)
                room = self.rooms.get(room_id)
            future.set_result(room)
            return room
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: those waiting get it, no one else must
            raise
        finally:
            del self._loading[room_id]

    async def follow_live(self, room_ids: Iterable[str] = (ALL_ROOMS,)) -> None:
        """Follow these rooms here when they are live ("*": every live room), for the ops
        watchers of this gateway; a shared broker only (the memory broker follows all)."""
        if not self.broker.shared:
            return
        wanted = set(room_ids)
        if ALL_ROOMS in wanted:
            live = await self._live_room_ids()
            wanted = (wanted - {ALL_ROOMS}) | live
        for room_id in sorted(wanted - self.rooms.keys()):
            await self._load(room_id)

    async def live_rooms(self, room_ids: Iterable[str]) -> tuple[LiveRoom, ...]:
        """The rooms followed here among `room_ids` ("*": all), most viewers first, at most
        `MAX_LIVE_LISTED`: what a `watch` answers, so a dashboard lists the rooms already
        live (after `follow_live`, every live one), with the viewers a `joined` would say
        and the coins gifted this session (`session_coins`, counted by the money scripts with
        the session board). With the Redis broker `coins` and `seq` are one atomic read of
        the room's record, which the script that counts a gift also numbers its event in: the
        coins are exactly those of the gifts up to `seq`. The memory broker numbers events
        here after the script, so its `seq` (this node's) may be off by the gifts in flight."""
        wanted = set(room_ids)
        rooms = (
            list(self.rooms.values())
            if ALL_ROOMS in wanted
            else [self.rooms[r] for r in wanted if r in self.rooms]
        )
        rooms.sort(key=lambda room: (-self.broker.presence(room.id), room.id))
        rooms = rooms[:MAX_LIVE_LISTED]
        async with self.redis.pipeline(transaction=False) as pipe:
            for room in rooms:
                pipe.hmget(self.keyspace.room(room.id), ["session_coins", "seq"])
            figures = await pipe.execute()
        listed = []
        for room, (coins, seq) in zip(rooms, figures, strict=True):
            listed.append(
                LiveRoom(
                    room=room.id,
                    creator=room.creator,
                    title=room.title,
                    viewers=self.broker.presence(room.id),
                    coins=int(coins or 0),
                    seq=int(seq or 0) if self.broker.shared else self.broker.top_seq(room.id),
                )
            )
        listed.sort(key=lambda live: (-live.viewers, live.room))
        return tuple(listed)

    async def catch_up(self, room: Room, since: int | None) -> None:
        """A `since` beyond what this gateway has read of a shared room (the client saw newer
        events on another gateway, which read the log first): read the room's log to its end
        now, delivering it to the viewers here, so the join recovers from `since` instead of
        answering `recovered: false` for events Redis has."""
        broker = self.broker
        if since is None or not broker.shared or since <= broker.top_seq(room.id):
            return
        try:
            await broker.flush((room.id,))
        finally:
            await self._drop_ended()

    # ---- membership ---------------------------------------------------------------------

    def join(
        self, conn: ServerConnection, room: Room, since: int | None, *, user: str
    ) -> tuple[Joined, bytes | None]:
        """Add `conn` (of `user`) to `room`; the `joined` reply and, for `since`, the frame of
        missed events. The caller writes both before it awaits anything, so no flush slips
        between."""
        if self.rooms.get(room.id) is not room:
            raise ProtocolError(ErrorCode.ROOM_NOT_LIVE, f"room {room.id} is not live")
        room.add(conn, user)
        room.unused_since = None
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
            self._remove(room, conn)
        return True

    def leave_all(self, conn: ServerConnection) -> None:
        for room_id in self._joined.pop(conn, set()):
            room = self.rooms.get(room_id)
            if room is not None:
                self._remove(room, conn)

    def _remove(self, room: Room, conn: ServerConnection) -> None:
        room.remove(conn)
        self.broker.report_presence(room.id, len(room.users))
        if not room.viewers:
            room.unused_since = asyncio.get_running_loop().time()

    def is_member(self, conn: ServerConnection, room_id: str) -> bool:
        joined = self._joined.get(conn)
        return joined is not None and room_id in joined

    def creator_connected(self, creator: str) -> None:
        """A creator's connection is here: with a shared broker, their room's `creator_seen`
        is kept fresh while it lasts (see `keep_creators_seen`)."""
        self._creators[creator] = self._creators.get(creator, 0) + 1

    def creator_gone(self, creator: str) -> None:
        left = self._creators.get(creator, 0) - 1
        if left > 0:
            self._creators[creator] = left
        else:
            self._creators.pop(creator, None)

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
        """A `viewers` event for each room whose count changed since it was last announced,
        and a `leaders` check for each room that had gifts (the broker knows which)."""
        broker = self.broker
        for room_id in self.rooms:
            broker.announce_viewers(room_id)
            broker.announce_leaders(room_id)

    async def flush(self) -> None:
        """Send every room's queued events, one frame per room; drop the rooms that ended."""
        try:
            await self.broker.flush()
        finally:
            await self._drop_ended()

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
        if is_room_ended(encoded[-1]):
            self._ended.append(room_id)

    async def _drop_ended(self) -> None:
        """Forget the rooms whose `room_ended` went out: their viewers are no longer in them."""
        while self._ended:
            room = self.rooms.pop(self._ended.pop(), None)
            if room is None:
                continue
            for conn in room.viewers:
                joined = self._joined.get(conn)
                if joined is not None:
                    joined.discard(room.id)
            room.viewers.clear()
            room.users.clear()
            self.metrics.rooms_live.set(len(self.rooms))
            await self.broker.unsubscribe(room.id)

    # ---- keeping shared rooms -----------------------------------------------------------

    async def let_go_unused(self, now: float) -> None:
        """Stop following the rooms no one here has viewed or watched for the grace time
        (shared broker): each gateway reads only the rooms it serves."""
        grace = self.times.unfollow_after_s
        for room in list(self.rooms.values()):
            since = room.unused_since
            if room.viewers or since is None or now - since < grace:
                continue
            if any(True for _ in self.ops.watchers_of(room.id)):
                room.unused_since = now
                continue
            del self.rooms[room.id]
            self.metrics.rooms_live.set(len(self.rooms))
            await self.broker.unsubscribe(room.id)

    async def keep_creators_seen(self) -> None:
        """Their rooms' `creator_seen`, now (Redis's clock), for the creators connected here."""
        if not self._creators:
            return
        try:
            await self._keep_seen()
        except NoScriptError:  # not loaded yet, or lost (a restart, a cluster's failover)
            await scripts.load(self.redis, self._seen)
            await self._keep_seen()

    async def _keep_seen(self) -> None:
        """One EVALSHA per creator, pipelined (a cluster's pipeline sends each to its shard)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for creator in self._creators:
                pipe.evalsha(self._seen.sha, 1, self.keyspace.room(creator))
            await pipe.execute()

    async def end_idle_rooms(self) -> int:
        """End every live room whose creator has not been seen for the idle time, whichever
        gateway holds it (each room's end re-checks, atomically); returns how many."""
        room_ids = sorted(await self._live_room_ids())
        if not room_ids:
            return 0
        async with self.redis.pipeline(transaction=False) as pipe:
            for room_id in room_ids:
                pipe.hmget(self.keyspace.room(room_id), ["creator_seen", "started"])
            records = await pipe.execute()
        # Redis's clock, asked on its own: a cluster pipeline refuses TIME (no key, no shard).
        # A first sift only: each room's end re-checks by its own shard's clock.
        seconds, micros = await self.redis.time()
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        idle_ms = round(self.times.room_idle_s * 1000)
        ended = 0
        for room_id, (seen, started) in zip(room_ids, records, strict=True):
            last = max(int(seen or 0), int(started or 0))
            if now_ms - last >= idle_ms and await self.broker.end_room(room_id, idle_ms=idle_ms):
                ended += 1
                log.info("room %s ended: its creator was away %.0f s", room_id, idle_ms / 1000)
        await self._drop_ended()
        return ended

    async def _housekeeping(self, now: float, due: dict[str, float]) -> None:
        """The shared broker's periodic chores, each on its own interval."""
        times = self.times
        if now >= due.get("seen", 0.0):
            due["seen"] = now + times.creator_seen_s
            await self.keep_creators_seen()
        if now >= due.get("sweep", 0.0):
            due["sweep"] = now + times.sweep_s
            await self.end_idle_rooms()
        if self.ops.has_watchers and now >= due.get("watch", 0.0):
            due["watch"] = now + 1.0
            await self.follow_live(self.ops.watched_rooms())
        await self.let_go_unused(now)

    async def run(self, tick_s: float, viewers_interval_s: float, stop: asyncio.Event) -> None:
        """The fan-out clock: flush every tick, announce viewer counts every interval (and,
        with a shared broker, keep its rooms), until `stop` is set (a cancel, which cuts a
        sleep short, can be swallowed by redis-py)."""
        loop = asyncio.get_running_loop()
        next_viewers = loop.time() + viewers_interval_s
        due: dict[str, float] = {}
        quiet_until = 0.0  # a Redis that is away fails every tick: log it every 10 s
        while not stop.is_set():
            await asyncio.sleep(tick_s)
            now = loop.time()
            if now >= next_viewers:
                next_viewers = now + viewers_interval_s
                self.announce_viewers()
            try:
                await self.flush()
                if self.broker.shared and now >= due.get("chores", 0.0):
                    due["chores"] = now + viewers_interval_s
                    await self._housekeeping(now, due)
            except Exception:  # one failed flush (Redis away) must not stop the clock
                if now >= quiet_until:
                    quiet_until = now + 10.0
                    log.exception("room flush failed; retrying every tick")
