"""The broker: each room's seq, its history for `since`, its events back to the gateway once
per tick, and its viewer count (presence).

A seam like centrifuge's Broker and PresenceManager: the hub publishes through `Broker` and
receives each room's events through its subscription, so a broker shared by gateways (Redis)
slots in without touching rooms or sessions. Publishing is synchronous and only queues (a
gift's hot path awaits nothing); the I/O a shared broker needs happens once per tick in
`flush`, where seqs may be given. History is answered from what this node was delivered, so a
`since` catch-up and the live events that follow it meet with no gap and no repeat.

`MemoryBroker` is the one-node broker: seqs and history live in this process; a reserved
seq bound lives in Redis so a room's seq never goes backwards, even across a crash.
`RedisBroker` (redis_broker.py) is the shared one: gateways on one Redis are one service.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, NamedTuple, Protocol, Self

from giftstream.protocol.codec import encode_event
from giftstream.protocol.events import Leader, LeadersEvent, RoomEnded, ViewersEvent
from giftstream.server.money import keys
from giftstream.server.money.boards import Boards
from giftstream.server.redis_cluster import RedisClient

SEQ_BLOCK = 1024  # seqs reserved per Redis write
GIFTS_REMEMBERED = 4096  # gift event ids a room remembers having published, newest kept
LEADERS_GAP_S = 1.0  # a room's `leaders` events are at least this far apart
LEADERS_WATCH_S = 3.0  # after a gift, its room's top 3 is checked this long (its count may
# land on a cluster's board up to a second after the gift is published)

Event = dict[str, Any]
MakeEvent = Callable[[int], Event]  # builds a room event given its seq
Deliver = Callable[[str, Sequence[bytes]], None]  # (room id, one tick's encoded events)


LIVE_ROOMS_KEY = keys.LIVE_ROOMS  # one Redis's live-room set (a cluster: one per partition)

# A room's keys are named by the broker's `keys.KeySpace`: `room(id)` the room's hash (its
# record: creator, title, live, started, opened (Redis's clock), creator_seen, creator_name
# (JSON text, for the boards), leaders and leaders_at (the last `leaders` top, JSON, and
# when); the memory broker's seq bound `seq_reserved`, the Redis broker's last seq `seq`,
# the viewer count last announced `viewers_announced`), `room_log(id)` the Redis broker's
# log (a stream of its events, entry ID 0-<seq>, fields `t` event type and `d` the encoded
# event), `room_presence(id)` its viewers per gateway (field gateway id, value
# `<users>:<expires ms>`).


class History(NamedTuple):
    """What a `since` join gets: the encoded events after `since` still kept, whether they
    reach back to it, and the seq of the last event delivered."""

    events: list[bytes]
    recovered: bool
    top_seq: int


class PresenceManager(Protocol):
    """Viewer counts per room. This node reports its own connections; a shared manager sums
    every gateway's."""

    def report_presence(self, room_id: str, connections: int) -> None:
        """This node now has `connections` viewers in `room_id` (users: a user's several
        sockets in the room count once)."""
        ...

    def presence(self, room_id: str) -> int:
        """The room's viewer count as last known (0 until one is reported)."""
        ...


class Broker(PresenceManager, Protocol):
    """Where rooms publish and from where a gateway receives them (`async with` starts and
    stops it). A room is used on this node between `subscribe` and `unsubscribe`."""

    keyspace: keys.KeySpace  # names every room key (and the live set)

    @property
    def shared(self) -> bool:
        """Whether rooms live in Redis for every gateway (a gateway then follows only the
        rooms it serves and loads the others on demand), or in this process."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    async def subscribe(self, room_id: str, deliver: Deliver) -> None:
        """Follow `room_id` here: load its seq, then call `deliver` once per tick with the
        tick's encoded events in seq order (one batch, so the hub frames them once)."""
        ...

    async def unsubscribe(self, room_id: str) -> None:
        """Stop following `room_id` here; events queued and not flushed are dropped."""
        ...

    def publish(self, room_id: str, make_event: MakeEvent) -> None:
        """Queue one event for the next flush; `make_event(seq)` builds it once its seq is
        known (at once, or at the flush that commits it). Synchronous and cheap: it runs on
        every gift."""
        ...

    async def flush(self, room_ids: Collection[str] | None = None) -> None:
        """Commit the queued events of `room_ids` (every room when None) and deliver each
        room's events as one batch. On failure they stay queued for the next flush."""
        ...

    def top_seq(self, room_id: str) -> int:
        """The seq of the room's last delivered event (what `joined` says)."""
        ...

    def history(self, room_id: str, since: int) -> History:
        """The delivered events after `since` still kept, for a `since` join."""
        ...

    def first_publication(self, room_id: str, event: str, ts_ms: int, *, replayed: bool) -> bool:
        """Whether the gift `event` (settled at `ts_ms`) is to be published in the room now,
        recording it as published if so. A fresh settlement always is; a replay of its key
        (a lost reply) only when the room has not published it: never twice, by event id.
        Never, when the money script wrote it (`gift_log`)."""
        ...

    def gift_log(self, room_id: str) -> str:
        """The stream a gift's money script appends the gift's event to, in the same atomic
        step as its settlement; '' when the hub publishes gifts itself."""
        ...

    def announce_viewers(self, room_id: str) -> None:
        """Queue a `viewers` event for the next flush if the room's count (every gateway's)
        has changed since it was last announced."""
        ...

    def announce_leaders(self, room_id: str) -> None:
        """When the room has had gifts: at the next flush, a `leaders` event if the session
        board's top 3 changed since last published and a second has passed since (else it is
        asked again at the next announce). Once per change, whichever gateway asks."""
        ...

    async def end_room(self, room_id: str, *, idle_ms: int | None = None) -> bool:
        """End the room: its queued events, then `room_ended`, its last, delivered like any
        event; Redis then no longer has it live. With `idle_ms`, only if its creator has not
        been seen for that long. False when it was not live (or not idle)."""
        ...


@dataclass(eq=False, slots=True)
class _RoomLog:
    """One followed room in a MemoryBroker."""

    room_id: str
    deliver: Deliver
    seq: int  # last seq given to an event
    seq_reserved: int  # persisted bound: no seq above it has been sent
    top_seq: int  # last seq delivered
    history: deque[tuple[int, bytes]]  # (seq, encoded event), delivered ones only
    # gift event id -> settled ts, of the gifts published here, oldest first; and the
    # settlement time from which that memory is complete (see first_publication)
    gifts: dict[str, int]
    vouched_since_ms: int
    outbox: list[Event] = field(default_factory=list)
    connections: int = 0
    viewers_announced: int = 0
    # `leaders`: the top 3 last published and when (loop time); until when a gift's board
    # count may still land (a cluster credits within a second); checks due at the flush
    leaders: tuple[Leader, ...] = ()
    leaders_at: float = -math.inf
    watch_until: float = math.inf  # a followed room is checked once at its first announce
    leaders_check: bool = False


class MemoryBroker:
    """The one-node broker: numbers a room's events as they are published, keeps the last
    `history_size` delivered ones as encoded bytes (the garbage collector never scans bytes;
    a busy room's history kept as dicts stalled every room), and persists a seq bound in
    Redis, in blocks, before any seq past it is sent."""

    def __init__(
        self,
        redis: RedisClient,
        *,
        history_size: int,
        keyspace: keys.KeySpace = keys.SINGLE,
    ) -> None:
        self.redis = redis
        self.history_size = history_size
        self.keyspace = keyspace
        self._rooms: dict[str, _RoomLog] = {}
        self._dirty: dict[str, _RoomLog] = {}
        self._boards = Boards(redis, keyspace)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    # ---- rooms followed -----------------------------------------------------------------

    @property
    def shared(self) -> bool:
        return False

    async def subscribe(self, room_id: str, deliver: Deliver) -> None:
        """Resume the room's numbering from its persisted bound, and reserve the next block
        in the same step (so its first ticks write nothing); above the Redis broker's last
        seq too, when the room was numbered by it before."""
        if room_id not in self._rooms:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hincrby(self.keyspace.room(room_id), "seq_reserved", SEQ_BLOCK)
                pipe.hget(self.keyspace.room(room_id), "seq")
                reserved, shared_seq = await pipe.execute()
            bound = int(reserved)
            if shared_seq is not None and int(shared_seq) > bound - SEQ_BLOCK:
                bound = int(shared_seq) + SEQ_BLOCK
                await self.redis.hset(self.keyspace.room(room_id), "seq_reserved", bound)
            if room_id not in self._rooms:  # else a racing subscribe won: keep its numbering
                start = bound - SEQ_BLOCK
                self._rooms[room_id] = _RoomLog(
                    room_id=room_id,
                    deliver=deliver,
                    seq=start,
                    seq_reserved=bound,
                    top_seq=start,
                    history=deque(maxlen=self.history_size),
                    gifts={},
                    vouched_since_ms=time.time_ns() // 1_000_000,
                )
                return
        self._rooms[room_id].deliver = deliver

    async def unsubscribe(self, room_id: str) -> None:
        """Forget the room: its history was memory; its seq bound stays in Redis."""
        self._rooms.pop(room_id, None)
        self._dirty.pop(room_id, None)

    # ---- events -------------------------------------------------------------------------

    def publish(self, room_id: str, make_event: MakeEvent) -> None:
        log = self._rooms[room_id]
        log.seq += 1
        event = make_event(log.seq)
        log.outbox.append(event)
        self._dirty[room_id] = log
        if event["type"] == "gift":
            log.watch_until = time.monotonic() + LEADERS_WATCH_S

    async def flush(self, room_ids: Collection[str] | None = None) -> None:
        if room_ids is None:
            await self._check_leaders()
            logs = list(self._dirty.values())
            self._dirty.clear()
        else:
            logs = [self._dirty.pop(room_id) for room_id in room_ids if room_id in self._dirty]
        if not logs:
            return
        try:
            await self._reserve_seqs(logs)
            for log in logs:
                self._deliver(log)
        except BaseException:
            for log in logs:  # keep them queued for the next tick
                if log.outbox and self._rooms.get(log.room_id) is log:
                    self._dirty[log.room_id] = log
            raise

    def _deliver(self, log: _RoomLog) -> None:
        """Encode the room's queued events once: the same bytes go to history and out."""
        if not log.outbox:
            return
        events, log.outbox = log.outbox, []
        encoded = [encode_event(event) for event in events]
        for event, data in zip(events, encoded, strict=True):
            log.history.append((event["seq"], data))
        log.top_seq = events[-1]["seq"]
        log.deliver(log.room_id, encoded)

    async def _reserve_seqs(self, logs: list[_RoomLog]) -> None:
        """Persist a new seq bound for each room about to send a seq past its old one."""
        while True:
            bounds = {log: log.seq + SEQ_BLOCK for log in logs if log.seq > log.seq_reserved}
            if not bounds:
                return
            async with self.redis.pipeline(transaction=False) as pipe:
                for log, bound in bounds.items():
                    pipe.hset(self.keyspace.room(log.room_id), "seq_reserved", bound)
                await pipe.execute()
            for log, bound in bounds.items():
                log.seq_reserved = max(log.seq_reserved, bound)

    # ---- history and presence -----------------------------------------------------------

    def top_seq(self, room_id: str) -> int:
        return self._rooms[room_id].top_seq

    def history(self, room_id: str, since: int) -> History:
        log = self._rooms[room_id]
        return history_after(log.history, log.top_seq, since)

    def first_publication(self, room_id: str, event: str, ts_ms: int, *, replayed: bool) -> bool:
        """The room remembers the last `GIFTS_REMEMBERED` gift ids it published, in memory:
        a replay is published when its id is not among them and it was settled since the
        memory is complete (since this node followed the room, or since the newest id it
        forgot): a gateway that settled it and died before publishing, or a Redis reply that
        was lost. Older replays are not published (most were, before their reply was lost);
        nor is one whose first publication this node lost in a crash of its own, which took
        the room's history with it. Replays are rare, so the id memory serves the ordinary
        retry within seconds of a busy room; a Redis broker would keep it beside the room's
        stream and survive a gateway's death."""
        log = self._rooms[room_id]
        gifts = log.gifts
        if event in gifts or (replayed and ts_ms < log.vouched_since_ms):
            return False
        gifts[event] = ts_ms
        if len(gifts) > GIFTS_REMEMBERED:
            forgotten = next(iter(gifts))
            log.vouched_since_ms = max(log.vouched_since_ms, gifts.pop(forgotten) + 1)
        return True

    def gift_log(self, room_id: str) -> str:
        return ""

    def announce_leaders(self, room_id: str) -> None:
        """Checked at the flush while a gift's count may still be landing on the board, or
        while the last change waits for its second: this process is the room's only one."""
        log = self._rooms[room_id]
        if time.monotonic() <= log.watch_until:
            log.leaders_check = True
            if log.watch_until == math.inf:
                log.watch_until = -math.inf  # the first announce's check, done

    async def _check_leaders(self) -> None:
        """The rooms' session top 3 read from Redis (where the money counts them); a changed
        one is published, at most once a second a room."""
        due = [log for log in self._rooms.values() if log.leaders_check]
        if not due:
            return
        for log in due:
            log.leaders_check = False
        tops = await asyncio.gather(*(self._boards.leaders(log.room_id) for log in due))
        now = time.monotonic()
        for log, top in zip(due, tops, strict=True):
            leaders = tuple(Leader(e.user, e.name, e.coins) for e in top)
            if self._rooms.get(log.room_id) is not log or leaders == log.leaders:
                continue
            if now - log.leaders_at < LEADERS_GAP_S:
                wait_until = log.leaders_at + LEADERS_GAP_S + LEADERS_WATCH_S
                log.watch_until = max(log.watch_until, wait_until)
                continue
            log.leaders, log.leaders_at = leaders, now
            self.publish(log.room_id, functools.partial(_leaders_event, log.room_id, leaders))

    def announce_viewers(self, room_id: str) -> None:
        log = self._rooms[room_id]
        if log.connections != log.viewers_announced:
            log.viewers_announced = log.connections
            self.publish(room_id, functools.partial(_viewers_event, room_id, log.connections))

    async def end_room(self, room_id: str, *, idle_ms: int | None = None) -> bool:
        """Every live room is followed here; idleness is the Redis broker's (a one-process
        room ends when its creator ends it)."""
        if room_id not in self._rooms or idle_ms is not None:
            return False
        self.publish(room_id, lambda seq: RoomEnded(room=room_id, seq=seq).as_dict())
        await self.flush((room_id,))  # its seq bound is persisted by now
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.keyspace.room(room_id), "live", "0")
            pipe.srem(self.keyspace.live_rooms_of(room_id), room_id)
            await pipe.execute()
        return True

    def report_presence(self, room_id: str, connections: int) -> None:
        self._rooms[room_id].connections = connections

    def presence(self, room_id: str) -> int:
        return self._rooms[room_id].connections


def _leaders_event(room_id: str, top: tuple[Leader, ...], seq: int) -> Event:
    return LeadersEvent(room=room_id, seq=seq, top=top).as_dict()


def _viewers_event(room_id: str, count: int, seq: int) -> Event:
    return ViewersEvent(room=room_id, seq=seq, count=count).as_dict()


def history_after(kept: deque[tuple[int, bytes]], top_seq: int, since: int) -> History:
    """The events of `kept` (contiguous, oldest first, the last one `top_seq`) after
    `since`, and whether they reach back to it."""
    events = [data for seq, data in kept if seq > since]
    oldest = kept[0][0] if kept else top_seq + 1
    recovered = oldest <= since + 1 and since <= top_seq
    return History(events, recovered, top_seq)
