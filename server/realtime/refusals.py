"""The money layer's refusals as the WebSocket answers them: the one place they are mapped,
beside the session, as `money.admin.http_status` maps them for HTTP."""

from __future__ import annotations

from giftstream.protocol.errors import ErrorCode, ProtocolError
from giftstream.server.money.refusal import Reason, Refusal

# The gift path's and the leaderboard request's refusals: no other WebSocket request reaches
# the money layer.
_ERROR_CODES: dict[Reason, ErrorCode] = {
    Reason.BAD_REQUEST: ErrorCode.BAD_REQUEST,
    Reason.BAD_COUNT: ErrorCode.BAD_COUNT,
    Reason.KEY_REUSED: ErrorCode.KEY_REUSED,
    Reason.DEBT: ErrorCode.INSUFFICIENT_COINS,  # the message says it is debt
    Reason.UNDERAGE: ErrorCode.UNDERAGE,
    Reason.SPENDING_LIMIT: ErrorCode.SPENDING_LIMIT,
    Reason.INSUFFICIENT_COINS: ErrorCode.INSUFFICIENT_COINS,
    Reason.ROOM_NOT_LIVE: ErrorCode.ROOM_NOT_LIVE,
    Reason.UNKNOWN_ROOM: ErrorCode.UNKNOWN_ROOM,
}


def protocol_error(refusal: Refusal, request_id: str | int | None = None) -> ProtocolError | None:
    """The WebSocket error for a refusal of the gift path; None for any other refusal, which
    no WebSocket request can cause (a bug, which the session logs and answers `internal`)."""
    code = _ERROR_CODES.get(refusal.reason)
    return None if code is None else ProtocolError(code, refusal.message, request_id)


__all__ = ["protocol_error"]
