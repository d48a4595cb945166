"""Client requests as typed values, parsed and validated from a decoded JSON object.

`parse_message` is the only way a request enters the server: every field is checked here
and a failure is a `ProtocolError` with the code the client must see, so handlers never
see a malformed value.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar, TypeGuard

from giftstream.protocol.errors import ErrorCode, ProtocolError
from giftstream.protocol.rules import (
    ALL_ROOMS,
    BOARDS,
    ID_RULE,
    KEY_RULE,
    MAX_COUNT,
    MAX_ID_CHARS,
    ROOMLESS_BOARDS,
    is_count,
    is_id,
    is_key,
)

RequestId = str | int | None

MAX_TITLE_CHARS = 200
MAX_TOKEN_CHARS = 4096
MAX_WATCHED_ROOMS = 1000
MAX_SINCE = 2**53
# An integer request id's decimal form (with its sign) is at most 64 characters.
_MIN_INT_ID = -(10**63) + 1
_MAX_INT_ID = 10**64 - 1


class MessageType(StrEnum):
    """The `type` of a client request (PROTOCOL.md §2.1-2.2)."""

    HELLO = "hello"
    JOIN = "join"
    LEAVE = "leave"
    GIFT = "gift"
    BALANCE = "balance"
    GO_LIVE = "go_live"
    END_LIVE = "end_live"
    WATCH = "watch"
    PING = "ping"
    CATALOG = "catalog"
    LEADERBOARD = "leaderboard"


@dataclass(frozen=True, slots=True)
class Hello:
    """The first message of a connection; the token alone says who the client is."""

    type: ClassVar[MessageType] = MessageType.HELLO
    token: str
    id: RequestId = None


@dataclass(frozen=True, slots=True)
class Join:
    """Join a room; `since` asks for the room's events after that seq (recovery)."""

    type: ClassVar[MessageType] = MessageType.JOIN
    room: str
    since: int | None = None
    id: RequestId = None


@dataclass(frozen=True, slots=True)
class Leave:
    type: ClassVar[MessageType] = MessageType.LEAVE
    room: str
    id: RequestId = None


@dataclass(frozen=True, slots=True)
class SendGift:
    """`count` of `gift` to the room's creator; `key` makes a retry return the first result."""

    type: ClassVar[MessageType] = MessageType.GIFT
    room: str
    gift: str
    count: int
    key: str
    id: RequestId = None


@dataclass(frozen=True, slots=True)
class GetBalance:
    type: ClassVar[MessageType] = MessageType.BALANCE
    id: RequestId = None


@dataclass(frozen=True, slots=True)
class GoLive:
    """A creator opens their room (its id is their user id); `title` is already stripped."""

    type: ClassVar[MessageType] = MessageType.GO_LIVE
    title: str = ""
    id: RequestId = None


@dataclass(frozen=True, slots=True)
class EndLive:
    type: ClassVar[MessageType] = MessageType.END_LIVE
    id: RequestId = None


@dataclass(frozen=True, slots=True)
class Watch:
    """Ops: follow these rooms, or every room with `("*",)`; deduplicated, in order."""

    type: ClassVar[MessageType] = MessageType.WATCH
    rooms: tuple[str, ...]
    id: RequestId = None


@dataclass(frozen=True, slots=True)
class Ping:
    type: ClassVar[MessageType] = MessageType.PING
    id: RequestId = None


@dataclass(frozen=True, slots=True)
class GetCatalog:
    """The gifts a client can send, so it can show them as buttons (r2)."""

    type: ClassVar[MessageType] = MessageType.CATALOG
    id: RequestId = None


@dataclass(frozen=True, slots=True)
class GetLeaderboard:
    """A board's top 10: `session` or `week` of `room`, or `creators_day` (room None)."""

    type: ClassVar[MessageType] = MessageType.LEADERBOARD
    board: str
    room: str | None = None
    id: RequestId = None


ClientMessage = (
    Hello
    | Join
    | Leave
    | SendGift
    | GetBalance
    | GoLive
    | EndLive
    | Watch
    | Ping
    | GetCatalog
    | GetLeaderboard
)


def is_integer(value: object) -> TypeGuard[int]:
    """A JSON integer: not a bool, not a float (1.0 is refused), not a numeric string."""
    return type(value) is int


def parse_message(obj: dict[str, Any]) -> ClientMessage:
    """The typed request `obj` carries, or the ProtocolError that refuses it.

    The error echoes the request's `id` when the id itself is valid, so a client can tell
    which request failed. Unknown fields are ignored, so newer clients stay compatible.
    """
    request_id = _request_id(obj.get("id"))
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise _bad("every message needs a string field `type`", request_id)
    parse = _PARSERS.get(kind)
    if parse is None:
        raise _bad(f"unknown message type {kind[:MAX_ID_CHARS]!r}", request_id)
    return parse(obj, request_id)


def _request_id(value: object) -> RequestId:
    # Compare integers by value: str() of a huge int is slow, and refused past 4300 digits.
    if value is None:
        return None
    if isinstance(value, str):
        if len(value) <= MAX_ID_CHARS:
            return value
    elif is_integer(value) and _MIN_INT_ID <= value <= _MAX_INT_ID:
        return value
    raise _bad("`id` must be a string or an integer of at most 64 characters", None)


def _bad(message: str, request_id: RequestId) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_REQUEST, message, request_id)


def _room(obj: dict[str, Any], request_id: RequestId) -> str:
    room = obj.get("room")
    if not is_id(room):
        raise _bad(f"`room` must be a room id: {ID_RULE}", request_id)
    return room


def _hello(obj: dict[str, Any], request_id: RequestId) -> Hello:
    token = obj.get("token")
    if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_CHARS:
        # a missing or unusable token closes the connection 4401 (PROTOCOL.md §2.1): the
        # session does that on this code
        raise ProtocolError(
            ErrorCode.UNAUTHORIZED,
            f"`hello` needs `token`: a JWT string of 1 to {MAX_TOKEN_CHARS} characters",
            request_id,
        )
    return Hello(token=token, id=request_id)


def _join(obj: dict[str, Any], request_id: RequestId) -> Join:
    room = _room(obj, request_id)
    since = obj.get("since")
    if since is not None and (not is_integer(since) or not 0 <= since <= MAX_SINCE):
        raise _bad(f"`since` must be an integer seq from 0 to {MAX_SINCE}", request_id)
    return Join(room=room, since=since, id=request_id)


def _leave(obj: dict[str, Any], request_id: RequestId) -> Leave:
    return Leave(room=_room(obj, request_id), id=request_id)


def _gift(obj: dict[str, Any], request_id: RequestId) -> SendGift:
    room = _room(obj, request_id)
    gift = obj.get("gift")
    if not isinstance(gift, str):
        raise _bad("`gift` must be a gift id string", request_id)
    if not is_id(gift):
        # A string that cannot be an id cannot be in the catalog either: same answer.
        raise ProtocolError(ErrorCode.UNKNOWN_GIFT, f"no gift {gift[:MAX_ID_CHARS]!r}", request_id)
    count = obj.get("count")
    if not is_count(count):
        raise ProtocolError(
            ErrorCode.BAD_COUNT, f"`count` must be an integer from 1 to {MAX_COUNT}", request_id
        )
    key = obj.get("key")
    if not is_key(key):
        raise _bad(f"`key` must be {KEY_RULE}", request_id)
    return SendGift(room=room, gift=gift, count=count, key=key, id=request_id)


def _balance(obj: dict[str, Any], request_id: RequestId) -> GetBalance:
    return GetBalance(id=request_id)


def _go_live(obj: dict[str, Any], request_id: RequestId) -> GoLive:
    title = obj.get("title")
    if title is None:  # absent or null: no title
        return GoLive(id=request_id)
    if not isinstance(title, str):
        raise _bad("`title` must be a string", request_id)
    title = title.strip()
    if len(title) > MAX_TITLE_CHARS:
        raise _bad(f"`title` must be at most {MAX_TITLE_CHARS} characters", request_id)
    return GoLive(title=title, id=request_id)


def _end_live(obj: dict[str, Any], request_id: RequestId) -> EndLive:
    return EndLive(id=request_id)


def _watch(obj: dict[str, Any], request_id: RequestId) -> Watch:
    rooms = obj.get("rooms")
    if not isinstance(rooms, list) or not rooms:
        raise _bad('`rooms` must be a non-empty list of room ids, or ["*"]', request_id)
    if len(rooms) > MAX_WATCHED_ROOMS:
        raise _bad(f"`rooms` may list at most {MAX_WATCHED_ROOMS} rooms", request_id)
    for room in rooms:
        if room != ALL_ROOMS and not is_id(room):
            raise _bad('each of `rooms` must be a room id or "*"', request_id)
    return Watch(rooms=tuple(dict.fromkeys(rooms)), id=request_id)


def _ping(obj: dict[str, Any], request_id: RequestId) -> Ping:
    return Ping(id=request_id)


def _catalog(obj: dict[str, Any], request_id: RequestId) -> GetCatalog:
    return GetCatalog(id=request_id)


def _leaderboard(obj: dict[str, Any], request_id: RequestId) -> GetLeaderboard:
    board = obj.get("board")
    if not isinstance(board, str) or board not in BOARDS:
        raise _bad(f"`board` must be one of {', '.join(BOARDS)}", request_id)
    if board in ROOMLESS_BOARDS:
        if obj.get("room") is not None:
            raise _bad(f"the {board} board takes no `room`", request_id)
        return GetLeaderboard(board=board, id=request_id)
    return GetLeaderboard(board=board, room=_room(obj, request_id), id=request_id)


_PARSERS: dict[str, Callable[[dict[str, Any], RequestId], ClientMessage]] = {
    MessageType.HELLO: _hello,
    MessageType.JOIN: _join,
    MessageType.LEAVE: _leave,
    MessageType.GIFT: _gift,
    MessageType.BALANCE: _balance,
    MessageType.GO_LIVE: _go_live,
    MessageType.END_LIVE: _end_live,
    MessageType.WATCH: _watch,
    MessageType.PING: _ping,
    MessageType.CATALOG: _catalog,
    MessageType.LEADERBOARD: _leaderboard,
}

__all__ = [
    "MAX_SINCE",
    "MAX_TITLE_CHARS",
    "MAX_TOKEN_CHARS",
    "MAX_WATCHED_ROOMS",
    "ClientMessage",
    "EndLive",
    "GetBalance",
    "GetCatalog",
    "GetLeaderboard",
    "GoLive",
    "Hello",
    "Join",
    "Leave",
    "MessageType",
    "Ping",
    "RequestId",
    "SendGift",
    "Watch",
    "is_integer",
    "parse_message",
]
