"""Server events as typed values; `as_dict` gives the exact wire object, keys in the
documented order (PROTOCOL.md §2).

A room event becomes a dict once, when published; the broker encodes it once at the tick
that sends it and keeps only those bytes as the room's history (`codec.join_room_frame`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from giftstream.protocol.errors import ErrorCode

PROTOCOL_VERSION = 1  # the `protocol` field of `welcome`
Wire = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Welcome:
    """The reply to `hello`: who the token says the client is, and its balances."""

    user: str
    name: str
    coins: int
    diamonds: int
    ts: int

    def as_dict(self) -> Wire:
        return {
            "type": "welcome",
            "user": self.user,
            "name": self.name,
            "coins": self.coins,
            "diamonds": self.diamonds,
            "protocol": PROTOCOL_VERSION,
            "ts": self.ts,
        }


@dataclass(frozen=True, slots=True)
class Joined:
    """The reply to `join`; `recovered` only answers a join with `since` (else omitted)."""

    room: str
    creator: str
    title: str
    viewers: int
    seq: int
    recovered: bool | None = None  # only for a join with `since`

    def as_dict(self) -> Wire:
        wire: Wire = {
            "type": "joined",
            "room": self.room,
            "creator": self.creator,
            "title": self.title,
            "viewers": self.viewers,
            "seq": self.seq,
        }
        if self.recovered is not None:
            wire["recovered"] = self.recovered
        return wire


@dataclass(frozen=True, slots=True)
class Left:
    room: str

    def as_dict(self) -> Wire:
        return {"type": "left", "room": self.room}


@dataclass(frozen=True, slots=True)
class GiftOk:
    """The sender's reply to `gift`; a replayed key returns the first one unchanged."""

    key: str
    event: str
    coins: int
    combo: int

    def as_dict(self) -> Wire:
        return {
            "type": "gift_ok",
            "key": self.key,
            "event": self.event,
            "coins": self.coins,
            "combo": self.combo,
        }


@dataclass(frozen=True, slots=True)
class BalanceReply:
    """The reply to `balance` (its wire type is also `balance`)."""

    coins: int
    diamonds: int

    def as_dict(self) -> Wire:
        return {"type": "balance", "coins": self.coins, "diamonds": self.diamonds}


@dataclass(frozen=True, slots=True)
class CatalogGift:
    """One gift of the catalog as clients see it: `animation` names what to play."""

    id: str
    name: str
    coins: int
    animation: str

    def as_dict(self) -> Wire:
        return {"id": self.id, "name": self.name, "coins": self.coins, "animation": self.animation}


@dataclass(frozen=True, slots=True)
class CatalogReply:
    """The reply to `catalog` (its wire type is also `catalog`): the gifts, in catalog order."""

    gifts: tuple[CatalogGift, ...]

    def as_dict(self) -> Wire:
        return {"type": "catalog", "gifts": [gift.as_dict() for gift in self.gifts]}


@dataclass(frozen=True, slots=True)
class Live:
    room: str

    def as_dict(self) -> Wire:
        return {"type": "live", "room": self.room}


@dataclass(frozen=True, slots=True)
class Ended:
    room: str

    def as_dict(self) -> Wire:
        return {"type": "ended", "room": self.room}


@dataclass(frozen=True, slots=True)
class LiveRoom:
    """A watched room live when `watch` was answered, so a dashboard opened late lists it.
    `coins`: gifted in the room this live session, counting exactly the gifts up to `seq`
    (the room's seq when it was read), so a dashboard adds only the gift events after it."""

    room: str
    creator: str
    title: str
    viewers: int
    coins: int = 0
    seq: int = 0

    def as_dict(self) -> Wire:
        return {
            "room": self.room,
            "creator": self.creator,
            "title": self.title,
            "viewers": self.viewers,
            "coins": self.coins,
            "seq": self.seq,
        }


@dataclass(frozen=True, slots=True)
class Watching:
    """The reply to `watch`: the rooms now followed, as parsed (deduplicated), and (an
    additive field) the watched rooms live now; omitted when None."""

    rooms: tuple[str, ...]
    live: tuple[LiveRoom, ...] | None = None

    def as_dict(self) -> Wire:
        wire: Wire = {"type": "watching", "rooms": list(self.rooms)}
        if self.live is not None:
            wire["live"] = [room.as_dict() for room in self.live]
        return wire


@dataclass(frozen=True, slots=True)
class Pong:
    ts: int

    def as_dict(self) -> Wire:
        return {"type": "pong", "ts": self.ts}


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """`retryable` is an additive field: whether the same request may succeed later."""

    code: ErrorCode
    message: str

    def as_dict(self) -> Wire:
        return {
            "type": "error",
            "code": self.code.value,
            "message": self.message,
            "retryable": self.code.retryable,
        }


@dataclass(frozen=True, slots=True)
class Leader:
    """One place on a board: `rank` is left out where the order says it (`leaders`)."""

    user: str
    name: str
    coins: int
    rank: int = 0

    def as_dict(self) -> Wire:
        return {"user": self.user, "name": self.name, "coins": self.coins}

    def as_ranked(self) -> Wire:
        return {"rank": self.rank, "user": self.user, "name": self.name, "coins": self.coins}


@dataclass(frozen=True, slots=True)
class LeaderboardReply:
    """The reply to `leaderboard`: at most 10 entries, highest first; `room` is null for
    `creators_day`."""

    board: str
    room: str | None
    entries: tuple[Leader, ...]

    def as_dict(self) -> Wire:
        return {
            "type": "leaderboard",
            "board": self.board,
            "room": self.room,
            "entries": [entry.as_ranked() for entry in self.entries],
        }


# ---- room events (every viewer of the room) -----------------------------------------------


@dataclass(frozen=True, slots=True)
class GiftEvent:
    """A gift as every viewer of the room sees it; the sender and gift are nested objects."""

    room: str
    seq: int
    event: str
    sender_id: str
    sender_name: str
    gift_id: str
    gift_name: str
    gift_coins: int
    animation: str
    count: int
    combo: int
    ts: int

    def as_dict(self) -> Wire:
        return {
            "type": "gift",
            "room": self.room,
            "seq": self.seq,
            "event": self.event,
            "sender": {"id": self.sender_id, "name": self.sender_name},
            "gift": {
                "id": self.gift_id,
                "name": self.gift_name,
                "coins": self.gift_coins,
                "animation": self.animation,
            },
            "count": self.count,
            "combo": self.combo,
            "ts": self.ts,
        }


@dataclass(frozen=True, slots=True)
class ViewersEvent:
    """The room's viewer count, sent on change and at most once a second."""

    room: str
    seq: int
    count: int

    def as_dict(self) -> Wire:
        return {"type": "viewers", "room": self.room, "seq": self.seq, "count": self.count}


@dataclass(frozen=True, slots=True)
class RoomEnded:
    """The creator ended the live: the last event of the room."""

    room: str
    seq: int

    def as_dict(self) -> Wire:
        return {"type": "room_ended", "room": self.room, "seq": self.seq}


@dataclass(frozen=True, slots=True)
class LeadersEvent:
    """The session's top 3 senders, on change, at most once a second a room. The Redis broker
    writes the same bytes from Lua (server/lua/room_publish.lua): keep the key order."""

    room: str
    seq: int
    top: tuple[Leader, ...]

    def as_dict(self) -> Wire:
        return {
            "type": "leaders",
            "room": self.room,
            "seq": self.seq,
            "top": [leader.as_dict() for leader in self.top],
        }


# ---- ops feed -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RoomOpened:
    """Ops feed: a creator went live."""

    room: str
    creator: str
    title: str

    def as_dict(self) -> Wire:
        return {
            "type": "room_opened",
            "room": self.room,
            "creator": self.creator,
            "title": self.title,
        }


@dataclass(frozen=True, slots=True)
class Stats:
    """Ops feed, once a second; the rates are the only floats on the wire (never money)."""

    ts: int
    rooms: int
    connections: int
    gifts_per_s: float
    coins_per_s: float
    # additive: error replies by code, counted since each live gateway started, codes sorted
    refusals: tuple[tuple[str, int], ...] | None = None

    def as_dict(self) -> Wire:
        wire: Wire = {
            "type": "stats",
            "ts": self.ts,
            "rooms": self.rooms,
            "connections": self.connections,
            "gifts_per_s": self.gifts_per_s,
            "coins_per_s": self.coins_per_s,
        }
        if self.refusals is not None:
            wire["refusals"] = dict(self.refusals)
        return wire


ServerEvent = (
    Welcome
    | Joined
    | Left
    | GiftOk
    | BalanceReply
    | CatalogReply
    | Live
    | Ended
    | Watching
    | Pong
    | ErrorReply
    | GiftEvent
    | ViewersEvent
    | RoomEnded
    | RoomOpened
    | Stats
    | LeaderboardReply
    | LeadersEvent
)

RoomEvent = GiftEvent | ViewersEvent | RoomEnded | LeadersEvent

__all__ = [
    "PROTOCOL_VERSION",
    "BalanceReply",
    "CatalogGift",
    "CatalogReply",
    "Ended",
    "ErrorReply",
    "GiftEvent",
    "GiftOk",
    "Joined",
    "Leader",
    "LeaderboardReply",
    "LeadersEvent",
    "Left",
    "Live",
    "LiveRoom",
    "Pong",
    "RoomEnded",
    "RoomEvent",
    "RoomOpened",
    "ServerEvent",
    "Stats",
    "ViewersEvent",
    "Watching",
    "Welcome",
    "Wire",
]
