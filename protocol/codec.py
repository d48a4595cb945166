"""Frames to requests and events to frames: the only place JSON meets the wire."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from protocol.errors import ErrorCode, ProtocolError
from protocol.events import ErrorReply, ServerEvent
from protocol.messages import ClientMessage, RequestId, parse_message

MAX_FRAME_BYTES = 4096


def decode_frame(frame: str | bytes) -> ClientMessage:
    """The request a text frame carries; `ProtocolError(bad_request)` for anything else."""
    if not isinstance(frame, str):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "binary frames are not accepted; send text")
    # a str's UTF-8 size is at least its length and at most 4x: check cheaply first
    if len(frame) > MAX_FRAME_BYTES or (
        len(frame) * 4 > MAX_FRAME_BYTES and len(frame.encode()) > MAX_FRAME_BYTES
    ):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"frame is over {MAX_FRAME_BYTES} bytes")
    try:
        obj = orjson.loads(frame)
    except (orjson.JSONDecodeError, UnicodeError, ValueError, TypeError):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "frame is not valid JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "frame must be a JSON object")
    return parse_message(obj)


def encode(event: ServerEvent) -> bytes:
    return orjson.dumps(event.as_dict())


def encode_reply(event: ServerEvent, request_id: RequestId) -> bytes:
    """The reply to a request: the event with the request's `id` echoed after `type`."""
    if request_id is None:
        return orjson.dumps(event.as_dict())
    wire = event.as_dict()
    return orjson.dumps({"type": wire.pop("type"), "id": request_id, **wire})


def encode_error(error: ProtocolError) -> bytes:
    return encode_reply(ErrorReply(code=error.code, message=error.message), error.request_id)


def encode_room_frame(events: Sequence[dict[str, Any]]) -> bytes:
    """One frame for a tick's room events: the event alone, or a `batch` in order."""
    if len(events) == 1:
        return orjson.dumps(events[0])
    return orjson.dumps({"type": "batch", "events": events})
