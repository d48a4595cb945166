"""The shared broker: any number of gateways on one Redis serve the same rooms.

Each room's events live once, in its log stream (`KeySpace.room_log`, entry ID 0-<seq>): a gift
is appended by its money script with its settlement (server/lua/send_gift.lua), any other
event by `room_publish.lua`; both number it with the room's one counter, so log order is seq
order whichever gateway wrote. A gateway follows the rooms it serves; each tick its flush
sends, in one pipelined round trip, this gateway's presence changes, the queued events of its
rooms (one `room_publish` per room) and one non-blocking XREAD over every followed log (on a
Redis Cluster, one XREAD per partition: a partition's logs share its slot, and one command
may not read several slots; the pipeline still goes out once, to each shard), then
hands each room's new entries to the hub as one batch: the `d` bytes are already the encoded
events, framed once by the hub for all its viewers there. Polling each tick keeps the
tick's batching, costs one round trip a tick however many rooms, and, unlike pub/sub's
at-most-once, can miss nothing: the next read starts after the last entry read.

History for `since` is the tail of the log this gateway has read, kept as bytes, so a `since`
join and the live stream after it meet with no gap and no repeat, as with the memory broker.
`leaders`: a gateway that reads a gift in a room's log asks `room_publish` (op 'l') at its
next announce to compare the session board's top 3 with the last published, kept in the
room's record; whichever gateway asks first after a change writes the one event.
Presence: this gateway's users per room, in the room's presence hash with an expiry (Redis
TIME), summed by `room_publish` ('v'), which announces `viewers` only on change: a dead
gateway's viewers leave the count when its fields expire.
Every `room_publish` carries the highest seq this gateway has delivered in the room, and the
script lifts the room's numbering to at least it: a failover that lost the room's last events
(asynchronous replication on a cluster) cannot make the next events re-use seqs viewers have
seen, once any gateway that delivered them has called (within about a second). The XREAD goes
on after the last entry read, which is at most that seq, so it meets the newly numbered events.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import orjson
from redis.exceptions import NoScriptError, RedisError

from giftstream.protocol.codec import encode_event, split_at_seq
from giftstream.server import scripts
from giftstream.server.money import keys
from giftstream.server.realtime.broker import (
    Deliver,
    History,
    MakeEvent,
    history_after,
)
from giftstream.server.redis_cluster import RedisClient

log = logging.getLogger(__name__)

ROOM_ENDED = b"room_ended"
GIFT = b"gift"
LEADERS_GAP_MS = 1000  # a room's `leaders` events are at least this far apart
LEADERS_TOO_SOON = 2  # room_publish's answer to 'l': changed, within the gap
MAX_READS = 8  # XREADs a flush makes for a room that has more than one read's worth waiting


@dataclass(eq=False, slots=True)
class _Followed:
    """One room this gateway follows."""

    room_id: str
    partition: int  # its creator's: its keys' slot on a cluster, so its log's XREAD group
    deliver: Deliver
    record: str
    log: str
    presence: str
    room_json: bytes
    last_id: bytes  # the newest log entry read
    top_seq: int  # the seq of the last event delivered
    history: deque[tuple[int, bytes]]  # (seq, encoded event), contiguous, oldest first
    ops: list[bytes | str | int] = field(default_factory=list)  # room_publish's, queued
    users: int = 0  # this gateway's viewers now
    written: int = 0  # this gateway's viewers as its presence field in Redis says
    remote: int = 0  # the other gateways' viewers, as last summed
    leaders_due: bool = True  # a gift was read (or a check came too soon): check `leaders`


class RedisBroker:
    """Rooms in Redis, shared by every gateway on it; see the module docstring."""

    def __init__(
        self,
        redis: RedisClient,
        *,
        history_size: int,
        gateway_id: str,
        presence_refresh_s: float = 5.0,
        presence_ttl_s: float = 15.0,
        keyspace: keys.KeySpace = keys.SINGLE,
    ) -> None:
        self.redis = redis
        self.keyspace = keyspace
        self.history_size = history_size
        self.gateway_id = gateway_id
        self.presence_refresh_s = presence_refresh_s
        self.presence_ttl_ms = max(1, round(presence_ttl_s * 1000))
        self.read_count = max(history_size, 64)
        self._rooms: dict[str, _Followed] = {}
        self._by_log: dict[bytes, _Followed] = {}
        self._writing = asyncio.Lock()  # a tick's writes and an end's are never interleaved
        self._next_refresh = -math.inf
        self._publish = scripts.register(redis, "room_publish")
        self._presence = scripts.register(redis, "room_presence")

    async def __aenter__(self) -> Self:
        await self._load_scripts()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """A gateway that stops cleanly takes its viewers out of the counts at once."""
        rooms = [f for f in self._rooms.values() if f.written]
        if not rooms:
            return
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for followed in rooms:
                    self._write_presence(pipe, followed, 0)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("could not clear this gateway's presence (it expires): %s", exc)

    async def _load_scripts(self) -> None:
        for script in (self._publish, self._presence):
            await self.redis.script_load(script.script)

    @property
    def shared(self) -> bool:
        return True

    # ---- rooms followed -----------------------------------------------------------------

    async def subscribe(self, room_id: str, deliver: Deliver) -> None:
        """Load the tail of the room's log as its history (the current live session's: the
        tail stops at a `room_ended`) and read on from its newest entry."""
        followed = self._rooms.get(room_id)
        if followed is not None:
            followed.deliver = deliver
            return
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xrevrange(self.keyspace.room_log(room_id), "+", "-", count=self.history_size)
            pipe.hmget(self.keyspace.room(room_id), ["seq", "seq_reserved"])
            tail, (seq, reserved) = await pipe.execute()
        if room_id in self._rooms:  # a racing subscribe won: keep its position
            self._rooms[room_id].deliver = deliver
            return
        kept: deque[tuple[int, bytes]] = deque(maxlen=self.history_size)
        for entry_id, fields in tail:  # newest first
            if fields.get(b"t") == ROOM_ENDED:
                break
            kept.appendleft((_seq_of(entry_id), fields[b"d"]))
        newest = _seq_of(tail[0][0]) if tail else 0
        followed = _Followed(
            room_id=room_id,
            partition=self.keyspace.partition(room_id),
            deliver=deliver,
            record=self.keyspace.room(room_id),
            log=self.keyspace.room_log(room_id),
            presence=self.keyspace.room_presence(room_id),
            room_json=orjson.dumps(room_id),
            last_id=tail[0][0] if tail else b"0-0",
            top_seq=max(newest, int(seq or 0), int(reserved or 0)),
            history=kept,
        )
        self._rooms[room_id] = followed
        self._by_log[followed.log.encode()] = followed

    async def unsubscribe(self, room_id: str) -> None:
        """Stop reading the room; this gateway's viewers leave its count."""
        followed = self._rooms.pop(room_id, None)
        if followed is None:
            return
        self._by_log.pop(followed.log.encode(), None)
        if followed.written:
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    self._write_presence(pipe, followed, 0)
                    await pipe.execute()
            except (RedisError, OSError) as exc:
                log.warning("could not clear presence in %s (it expires): %s", room_id, exc)

    # ---- events -------------------------------------------------------------------------

    def publish(self, room_id: str, make_event: MakeEvent) -> None:
        """Encode the event now, with its seq cut out: `room_publish` splices the seq in."""
        event = make_event(0)
        head, tail = split_at_seq(encode_event(event))
        self._rooms[room_id].ops.extend((b"e", event["type"], head, tail))

    def announce_viewers(self, room_id: str) -> None:
        followed = self._rooms[room_id]
        if b"v" not in followed.ops:
            followed.ops.append(b"v")

    def announce_leaders(self, room_id: str) -> None:
        """After a gift this gateway read in the room: `room_publish` compares the session's
        top 3 with the one last published by any gateway, so one event goes out per change."""
        followed = self._rooms[room_id]
        if followed.leaders_due:
            followed.leaders_due = False
            followed.ops.extend((b"l", LEADERS_GAP_MS))

    async def end_room(self, room_id: str, *, idle_ms: int | None = None) -> bool:
        """One `room_publish` with the room's queued events and the end; then, if the room is
        followed here, its `room_ended` is read and delivered before this returns."""
        followed = self._rooms.get(room_id)
        end_op: list[bytes | str | int] = [b"end"] if idle_ms is None else [b"idle", idle_ms]
        async with self._writing:
            ops = followed.ops if followed is not None else []
            if followed is not None:
                followed.ops = []
            try:
                delivered = followed.top_seq if followed is not None else 0
                reply = await self._run_publish(room_id, delivered, [*ops, *end_op])
            except BaseException:
                if followed is not None:
                    followed.ops[:0] = ops
                raise
        if followed is not None and self._rooms.get(room_id) is followed:
            self._note_reply(followed, reply, delivered)
            await self.flush((room_id,))
        return int(reply[1]) == 1

    async def _run_publish(
        self, room_id: str, delivered: int, ops: Sequence[bytes | str | int]
    ) -> Any:
        keys_, args = self._publish_call(room_id, orjson.dumps(room_id), delivered, ops)
        try:
            return await self.redis.evalsha(self._publish.sha, len(keys_), *keys_, *args)
        except NoScriptError:
            await self._load_scripts()
            return await self.redis.evalsha(self._publish.sha, len(keys_), *keys_, *args)

    def _publish_call(
        self, room_id: str, room_json: bytes, delivered: int, ops: Sequence[bytes | str | int]
    ) -> tuple[list[str], list[Any]]:
        """`delivered`: the highest seq this gateway has delivered in the room, the floor the
        script lifts the room's numbering to."""
        ks = self.keyspace
        keys_ = [
            ks.room(room_id),
            ks.room_log(room_id),
            ks.room_presence(room_id),
            ks.live_rooms_of(room_id),
            ks.board_session(room_id),
            ks.board_names(room_id),
        ]
        return keys_, [self.history_size, room_id, room_json, delivered, *ops]

    async def flush(self, room_ids: Collection[str] | None = None) -> None:
        """One round trip: presence changes (and the periodic refresh), each room's queued
        events, one XREAD of every followed room (of `room_ids` when given); then each room's
        new entries are delivered as one batch. Events whose write failed stay queued."""
        if room_ids is None:
            targets = list(self._rooms.values())
        else:
            targets = [self._rooms[r] for r in room_ids if r in self._rooms]
        async with self._writing:
            loop = asyncio.get_running_loop()
            refresh = room_ids is None and loop.time() >= self._next_refresh
            if refresh:
                self._next_refresh = loop.time() + self.presence_refresh_s
            presence_sent: dict[_Followed, int] = {}
            published: list[tuple[_Followed, int, list[bytes | str | int]]] = []
            async with self.redis.pipeline(transaction=False) as pipe:
                if room_ids is None:
                    for followed in targets:
                        users = followed.users
                        if users != followed.written or (refresh and users):
                            self._write_presence(pipe, followed, users)
                            presence_sent[followed] = users
                for followed in targets:
                    if followed.ops:
                        ops, followed.ops = followed.ops, []
                        delivered = followed.top_seq
                        published.append((followed, delivered, ops))
                        keys_, args = self._publish_call(
                            followed.room_id, followed.room_json, delivered, ops
                        )
                        pipe.evalsha(self._publish.sha, len(keys_), *keys_, *args)
                reads = _reads_by_partition(targets)
                for streams in reads:
                    pipe.xread(streams, count=self.read_count)
                try:
                    results = await pipe.execute(raise_on_error=False) if len(pipe) else []
                except BaseException:
                    for followed, _, ops in published:
                        followed.ops[:0] = ops
                    raise
            replies = iter(results)
            failed: list[BaseException] = []
            for followed, users in presence_sent.items():
                reply = next(replies)
                if isinstance(reply, BaseException):
                    failed.append(reply)
                else:
                    followed.written = users
            for followed, delivered, ops in published:
                reply = next(replies)
                if isinstance(reply, BaseException):
                    failed.append(reply)
                    followed.ops[:0] = ops  # written next tick
                else:
                    self._note_reply(followed, reply, delivered)
            read: list[Any] = []
            for reply in replies:  # the XREADs, one per partition
                if isinstance(reply, BaseException):
                    failed.append(reply)
                else:
                    read.extend(reply or ())
            more = self._deliver_read(read)
            for _ in range(MAX_READS):
                if not more:
                    break
                more = self._deliver_read(await self._read(more))
        if failed:
            if any(isinstance(error, NoScriptError) for error in failed):
                await self._load_scripts()  # Redis restarted or flushed its scripts
            raise failed[0]

    async def _read(self, rooms: list[_Followed]) -> list[Any]:
        """One more read of these rooms' logs (one XREAD per partition, one round trip)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for streams in _reads_by_partition(rooms):
                pipe.xread(streams, count=self.read_count)
            replies = await pipe.execute()
        return [stream for reply in replies for stream in reply or ()]

    def _deliver_read(self, read: Any) -> list[_Followed]:
        """Hand each room's entries of one XREAD to its subscriber; the rooms that may have
        more waiting (a full read)."""
        more: list[_Followed] = []
        for stream, entries in read:
            followed = self._by_log.get(stream)
            if followed is None or not entries:
                continue
            batch: list[bytes] = []
            for entry_id, fields in entries:
                seq = _seq_of(entry_id)
                if seq <= followed.top_seq:
                    continue
                if fields.get(b"t") == GIFT:
                    followed.leaders_due = True
                if seq != followed.top_seq + 1:
                    # trimmed away before this gateway read them: viewers see the gap in
                    # seq, and history restarts here so a `since` never skips it silently
                    followed.history.clear()
                data = fields[b"d"]
                followed.history.append((seq, data))
                followed.top_seq = seq
                batch.append(data)
            followed.last_id = entries[-1][0]
            if len(entries) >= self.read_count:
                more.append(followed)
            if batch:
                followed.deliver(followed.room_id, batch)
        return more

    def _note_reply(self, followed: _Followed, reply: Any, delivered: int) -> None:
        """A `room_publish` reply: its viewer sum (when it counted) less this gateway's part,
        whether `leaders` must be asked again, and whether the room had stepped back below
        what this gateway delivered (a failover lost its last events: lifted by this call)."""
        viewers = int(reply[0])
        if viewers >= 0:
            followed.remote = max(0, viewers - followed.written)
        if int(reply[4]) == LEADERS_TOO_SOON:
            followed.leaders_due = True
        found = int(reply[5])
        if found < delivered:
            # The log now ends below this gateway's read position. That position stays: the
            # last entry read is at most `delivered` (entries at or below the seq delivered
            # move it no further), so the events numbered from now on, above `delivered`, are
            # all after it; those numbered before this lift re-used seqs and are lost here.
            log.warning(
                "room %s had stepped back to seq %d below the %d delivered here (a failover "
                "lost its last events?): its numbering is lifted above it",
                followed.room_id,
                found,
                delivered,
            )

    def _write_presence(self, pipe: Any, followed: _Followed, users: int) -> None:
        pipe.evalsha(
            self._presence.sha,
            1,
            followed.presence,
            self.gateway_id,
            users,
            self.presence_ttl_ms,
        )

    # ---- history and presence -----------------------------------------------------------

    def top_seq(self, room_id: str) -> int:
        return self._rooms[room_id].top_seq

    def history(self, room_id: str, since: int) -> History:
        followed = self._rooms[room_id]
        return history_after(followed.history, followed.top_seq, since)

    def first_publication(self, room_id: str, event: str, ts_ms: int, *, replayed: bool) -> bool:
        """Never: the gift's money script wrote its event, once, with the settlement."""
        return False

    def gift_log(self, room_id: str) -> str:
        return self.keyspace.room_log(room_id)

    def report_presence(self, room_id: str, connections: int) -> None:
        """Written to Redis at the next flush."""
        self._rooms[room_id].users = connections

    def presence(self, room_id: str) -> int:
        """This gateway's viewers now, plus the others' as last summed (within a second)."""
        followed = self._rooms[room_id]
        return followed.remote + followed.users


def _reads_by_partition(rooms: list[_Followed]) -> list[dict[Any, Any]]:
    """The XREAD streams (log -> last id read) of these rooms, one dict per partition: one
    XREAD may only read keys of one slot on a cluster (one Redis: partition 0, one read)."""
    reads: dict[int, dict[Any, Any]] = {}
    for followed in rooms:
        reads.setdefault(followed.partition, {})[followed.log] = followed.last_id
    return list(reads.values())


def _seq_of(entry_id: bytes) -> int:
    """The seq of a log entry, from its ID 0-<seq>."""
    return int(entry_id.partition(b"-")[2])
