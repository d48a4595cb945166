"""The service-wide ops notices (`room_opened`) as one capped Redis stream.

Each gateway appends what happened on it and reads what happened on all of them, from where
it last read, so every ops watcher on every gateway gets each notice once, wherever the room
opened. Appends are queued by synchronous callers and written by the ops loop's next turn.
"""

from __future__ import annotations

from dataclasses import dataclass

from giftstream.server.money import keys
from giftstream.server.redis_cluster import RedisClient

OPS_LOG_KEY = keys.OPS_LOG
OPS_LOG_MAXLEN = 1000  # approximate (MAXLEN ~): notices for watchers now, not an archive
READ_COUNT = 256  # entries read per turn; more wait for the next turn


@dataclass(frozen=True, slots=True)
class Notice:
    """One ops notice: the room it is about and its event, already encoded for the wire."""

    room: str
    kind: str
    frame: bytes


class OpsLog:
    """Appends and reads `giftstream:ops:log`. Entry fields: `r` the room (so a reader routes
    without decoding), `t` the event type, `d` the encoded event (written to watchers as is)."""

    def __init__(self, redis: RedisClient, key: str = OPS_LOG_KEY) -> None:
        self.redis = redis
        self.key = key
        self._pending: list[Notice] = []
        self._last_id = "0-0"  # a stream id; Redis's "before everything"
        self._newest: str | None = None

    def append(self, notice: Notice) -> None:
        """Queue `notice` for the next `exchange`; never waits (the hub calls it mid-step)."""
        self._pending.append(notice)

    @property
    def has_pending(self) -> bool:
        return bool(self._pending)

    async def start(self) -> None:
        """Read from now on: what the stream held before this gateway started is not news."""
        newest = await self.redis.xrevrange(self.key, count=1)
        if newest:
            self._last_id = keys.text(newest[0][0])

    async def exchange(self, read: bool = True) -> list[Notice]:
        """Write the queued notices, then (when `read`) return the entries after the last one
        read, this gateway's own included. When not `read`, note the newest entry instead,
        for `skip` (no one here watches: a watcher who comes later gets what happens after).

        One round trip. Notices whose write fails are dropped, never written twice."""
        pending, self._pending = self._pending, []
        async with self.redis.pipeline(transaction=False) as pipe:
            for notice in pending:
                pipe.xadd(
                    self.key,
                    {"r": notice.room, "t": notice.kind, "d": notice.frame},
                    maxlen=OPS_LOG_MAXLEN,
                    approximate=True,
                )
            if read:
                pipe.xread({self.key: self._last_id}, count=READ_COUNT)
            else:
                pipe.xrevrange(self.key, count=1)
            replies = await pipe.execute()
        if not read:
            self._newest = keys.text(replies[-1][0][0]) if replies[-1] else None
            return []
        notices: list[Notice] = []
        for _stream, entries in replies[-1] or ():
            for entry_id, fields in entries:
                self._last_id = keys.text(entry_id)
                room, kind, frame = fields.get(b"r"), fields.get(b"t"), fields.get(b"d")
                if room is not None and kind is not None and frame is not None:
                    notices.append(Notice(room=keys.text(room), kind=keys.text(kind), frame=frame))
        return notices

    def skip(self) -> None:
        """Read on from the newest entry the last unread `exchange` saw. The caller decides
        after that exchange: a watcher who came meanwhile must not lose what it skipped."""
        if self._newest is not None:
            self._last_id = self._newest
