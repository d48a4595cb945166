"""Reading the leaderboards (PROTOCOL.md §2.2): `session`, `week` and `creators_day`.

The boards are written where the money is, exactly once per settled gift: on one Redis by
send_gift.lua on a first settlement, on a Redis Cluster by credit.lua when it credits the
creator (server/lua/_prelude.lua, `count_on_boards`). Every board sits in its creator's
partition (`keys.KeySpace.board_*`); this module only reads them, by board_top.lua (one
atomic read of a board and the names beside it).

The week and the day are Redis's own (money time): the UTC day and ISO week of Redis's TIME
on the shard that holds the board, or of the Wallet's test clock. A creators_day board is
one per partition: the global top is the merge of every partition's top (a creator is in
one partition only, so the global top 10 is among their top 10s).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson
from redis.asyncio.cluster import RedisCluster

from giftstream.protocol.rules import ID_RULE, is_id
from giftstream.server import scripts
from giftstream.server.money import keys
from giftstream.server.money.refusal import Reason, Refusal
from giftstream.server.redis_cluster import RedisClient

TOP = 10  # entries a board answers
LEADERS = 3  # entries of the `leaders` event


class Board(StrEnum):
    SESSION = "session"  # senders by coins gifted in the room's current live session
    WEEK = "week"  # senders by coins gifted to the room's creator this ISO week (UTC)
    CREATORS_DAY = "creators_day"  # creators by coins received today (UTC); no room


BOARDS = tuple(board.value for board in Board)


@dataclass(frozen=True, slots=True)
class Entry:
    """One place on a board; `rank` from 1, highest coins first, ties by user id."""

    rank: int
    user: str
    name: str
    coins: int

    def as_wire(self) -> dict[str, Any]:
        return {"rank": self.rank, "user": self.user, "name": self.name, "coins": self.coins}


def board_of(board: object, room: object) -> tuple[Board, str | None]:
    """A request's board and room, validated once for both transports: session and week
    need a room id, creators_day takes none (`bad_request` otherwise)."""
    if not isinstance(board, str) or board not in BOARDS:
        raise Refusal(Reason.BAD_REQUEST, f"`board` must be one of {', '.join(BOARDS)}")
    kind = Board(board)
    if kind is Board.CREATORS_DAY:
        if room is not None:
            raise Refusal(Reason.BAD_REQUEST, "the creators_day board takes no `room`")
        return kind, None
    if not is_id(room):
        raise Refusal(Reason.BAD_REQUEST, f"the {board} board needs `room`: {ID_RULE}")
    return kind, room


class Boards:
    """Reads the boards. `clock` is the Wallet's test clock (ms), if any: the same money
    time the scripts counted by."""

    def __init__(
        self,
        redis: RedisClient,
        keyspace: keys.KeySpace = keys.SINGLE,
        *,
        clock: Callable[[], int] | None = None,
    ) -> None:
        self._redis = redis
        self._keys = keyspace
        self._clock = clock
        self._top = scripts.register(redis, "board_top")

    async def top(self, board: Board, room: str | None, n: int = TOP) -> list[Entry]:
        """The board's first `n`; a room that has never been opened is `unknown_room`."""
        ks = self._keys
        if board is Board.CREATORS_DAY:
            return await self._creators_day(n)
        assert room is not None
        if not await self._redis.exists(ks.room(room)):
            raise Refusal(Reason.UNKNOWN_ROOM, f"no room {room}")
        if board is Board.SESSION:
            name = ks.board_session(room)
        else:
            day = keys.epoch_day(await self._now_ms(ks.room(room)))
            name = ks.board_week(room, keys.iso_week(day))
        return _ranked(await self._read(name, ks.board_names(room), n), n)

    async def leaders(self, room: str) -> list[Entry]:
        """The session's top 3, as the `leaders` event carries them."""
        ks = self._keys
        return _ranked(await self._read(ks.board_session(room), ks.board_names(room), LEADERS))

    async def _creators_day(self, n: int) -> list[Entry]:
        ks = self._keys
        day = keys.epoch_day(await self._now_ms(ks.board_creator_names(0)))
        tops = await asyncio.gather(
            *(
                self._read(ks.board_creators_day(p, day), ks.board_creator_names(p), n)
                for p in range(ks.partitions)
            )
        )
        return _ranked([row for top in tops for row in top], n)

    async def _read(self, board: str, names: str, n: int) -> list[tuple[str, str, int]]:
        """(user, name, coins) of the board's top n, as board_top.lua reads them."""
        flat = await self._top(keys=[board, names], args=[n])
        rows = []
        for i in range(0, len(flat), 3):
            user = keys.text(flat[i])
            stored = flat[i + 2]
            name = user if stored is None else orjson.loads(stored)
            rows.append((user, name if isinstance(name, str) else user, int(flat[i + 1])))
        return rows

    async def _now_ms(self, key: str) -> int:
        """Money time: the test clock, else Redis's TIME (on a cluster, the node of `key`)."""
        if self._clock is not None:
            return self._clock()
        if isinstance(self._redis, RedisCluster):
            node = self._redis.get_node_from_key(key)
            seconds, micros = await self._redis.time(target_nodes=node)
        else:
            seconds, micros = await self._redis.time()
        return int(seconds) * 1000 + int(micros) // 1000


def _ranked(rows: list[tuple[str, str, int]], n: int = TOP) -> list[Entry]:
    """Highest coins first, ties by user id (byte order, as the scripts rank), ranks 1..n."""
    rows = sorted(rows, key=lambda row: (-row[2], row[0].encode()))[:n]
    return [Entry(rank, user, name, coins) for rank, (user, name, coins) in enumerate(rows, 1)]


__all__ = ["BOARDS", "LEADERS", "TOP", "Board", "Boards", "Entry", "board_of"]
