"""The one refusal the money layer raises (wallet and internal API): why, what the caller
reads, and whether the same request can succeed later.

Each transport maps a refusal once: `realtime.refusals.protocol_error` for the WebSocket (the
gift path), `admin.http_status` for the internal HTTP API.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """Why a money request is refused: the scripts' refusals by the names they reply, and
    the checks Python makes before a script runs."""

    BAD_REQUEST = "bad_request"  # the request's form: JSON, a field's type or pattern
    BAD_VALUE = "bad_value"  # a well-formed value outside the money rules (reads bad_request)
    BAD_SIGNATURE = "bad_signature"
    BAD_COUNT = "bad_count"
    UNKNOWN_PACKAGE = "unknown_package"
    UNKNOWN_RECEIPT = "unknown_receipt"
    BELOW_MINIMUM = "below_minimum"
    RECEIPT_REUSED = "receipt_reused"
    KEY_REUSED = "key_reused"
    UNDERAGE = "underage"
    BALANCE_LIMIT = "balance_limit"
    INSUFFICIENT_COINS = "insufficient_coins"
    INSUFFICIENT_DIAMONDS = "insufficient_diamonds"
    DEBT = "debt"
    SPENDING_LIMIT = "spending_limit"
    ROOM_NOT_LIVE = "room_not_live"  # a gift to a room that has ended (on any gateway)
    UNKNOWN_ROOM = "unknown_room"  # a leaderboard of a room that was never opened
    PAYOUT_HELD = "payout_held"  # the diamonds asked for are still on hold (chargebacks)
    PAYOUT_CAP = "payout_cap"  # past the creator's daily payout cap
    UNAVAILABLE = "unavailable"  # storage unreachable

    @property
    def retryable(self) -> bool:
        """Whether sending the same request again later can succeed unchanged."""
        return self is Reason.UNAVAILABLE


class Refusal(Exception):
    """A money request refused, with the machine code and message its caller reads."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(f"{reason.value}: {message}")
        self.reason = reason
        self.message = message

    @property
    def code(self) -> str:
        """The machine code on the wire: a bad value reads `bad_request`, as any bad input."""
        return Reason.BAD_REQUEST.value if self.reason is Reason.BAD_VALUE else self.reason.value

    @property
    def retryable(self) -> bool:
        return self.reason.retryable


__all__ = ["Reason", "Refusal"]
