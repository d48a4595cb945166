"""Error and close codes of the wire contract, and the one exception that carries them.

Every failure a client can see is a `ProtocolError` with an `ErrorCode`; the mapping from a
failure to its code lives where the failure is detected, never in `if` chains elsewhere.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum


class ErrorCode(StrEnum):
    """The `code` of an `error` reply (PROTOCOL.md §2.2)."""

    BAD_REQUEST = "bad_request"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    UNKNOWN_ROOM = "unknown_room"
    ROOM_NOT_LIVE = "room_not_live"
    NOT_JOINED = "not_joined"
    UNKNOWN_GIFT = "unknown_gift"
    BAD_COUNT = "bad_count"
    INSUFFICIENT_COINS = "insufficient_coins"
    SPENDING_LIMIT = "spending_limit"
    UNDERAGE = "underage"
    KEY_REUSED = "key_reused"
    RATE_LIMITED = "rate_limited"
    OVERLOADED = "overloaded"
    INTERNAL = "internal"

    @property
    def retryable(self) -> bool:
        """Whether sending the same request again later can succeed unchanged."""
        return self in _RETRYABLE


_RETRYABLE = frozenset({ErrorCode.RATE_LIMITED, ErrorCode.OVERLOADED, ErrorCode.INTERNAL})


class CloseCode(IntEnum):
    """WebSocket close codes the server uses (PROTOCOL.md §2.1)."""

    GOING_AWAY = 1001  # server shutting down
    SLOW_CONSUMER = 4008  # unsent backlog passed the bound; rejoin with `since`
    BAD_TOKEN = 4401  # bad, expired or missing token
    HELLO_TIMEOUT = 4408  # no `hello` in time
    FLOOD = 4429  # too many messages or bad frames


class ProtocolError(Exception):
    """A request the server refuses, with the code and message the client will see."""

    def __init__(self, code: ErrorCode, message: str, request_id: str | int | None = None):
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id

    def with_request_id(self, request_id: str | int | None) -> ProtocolError:
        """The same error, answering the request that carried `request_id`."""
        return ProtocolError(self.code, self.message, request_id)
