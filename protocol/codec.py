"""Frames to requests and events to frames: the only place JSON meets the wire.

These run once per message, so they stay lean: one size check, one `orjson` call, no
copies beyond the reply's `id`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from giftstream.protocol.errors import ErrorCode, ProtocolError
from giftstream.protocol.events import ErrorReply, ServerEvent
from giftstream.protocol.messages import ClientMessage, RequestId, parse_message

MAX_FRAME_BYTES = 4096
BATCH = "batch"
# How every room frame begins: a batch, or one room event keyed as its `as_dict` orders
# them. A client tells a room frame from a reply by these bytes, without parsing it.
ROOM_FRAME_PREFIXES: tuple[bytes, ...] = (
    b'{"type":"' + BATCH.encode() + b'"',
    b'{"type":"gift","room"',
    b'{"type":"viewers"',
    b'{"type":"room_ended"',
    b'{"type":"leaders"',
)

# A str's UTF-8 size is at least its length and at most 4x: below this many characters
# no frame can be over the limit, so the common small frame is never encoded to measure.
_ALWAYS_FITS_CHARS = MAX_FRAME_BYTES // 4


def decode_frame(frame: str | bytes) -> ClientMessage:
    """The request a text frame carries; `ProtocolError(bad_request)` for anything else.

    Nothing but a `ProtocolError` escapes, whatever the client sends.
    """
    if not isinstance(frame, str):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "binary frames are not accepted; send text")
    if len(frame) > _ALWAYS_FITS_CHARS:
        if len(frame) > MAX_FRAME_BYTES:
            raise _too_large()
        try:
            size = len(frame.encode())
        except UnicodeEncodeError:  # lone surrogates: no UTF-8 client could have sent it
            raise ProtocolError(ErrorCode.BAD_REQUEST, "frame is not valid UTF-8") from None
        if size > MAX_FRAME_BYTES:
            raise _too_large()
    try:
        obj = orjson.loads(frame)
    except (ValueError, TypeError):  # orjson.JSONDecodeError is a ValueError
        raise ProtocolError(ErrorCode.BAD_REQUEST, "frame is not valid JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "frame must be a JSON object")
    return parse_message(obj)


def _too_large() -> ProtocolError:
    return ProtocolError(
        ErrorCode.BAD_REQUEST, f"frame is larger than {MAX_FRAME_BYTES} bytes of UTF-8"
    )


def encode(event: ServerEvent) -> bytes:
    """An event as one frame's JSON, for events that answer no request."""
    return orjson.dumps(event.as_dict())


def encode_reply(event: ServerEvent, request_id: RequestId) -> bytes:
    """The reply to a request: the event with the request's `id` echoed after `type`."""
    wire = event.as_dict()
    if request_id is None:
        return orjson.dumps(wire)
    # a duplicate key in a dict display keeps its first position: type, id, then the rest
    return orjson.dumps({"type": wire["type"], "id": request_id, **wire})


def encode_error(error: ProtocolError) -> bytes:
    """The `error` reply for `error`, echoing the id of the request it refuses."""
    return encode_reply(ErrorReply(code=error.code, message=error.message), error.request_id)


def encode_event(event: dict[str, Any]) -> bytes:
    """One room event's JSON: encoded once when its tick is flushed, kept as bytes in the
    room's history (bytes cost the garbage collector nothing to keep; dicts do)."""
    return orjson.dumps(event)


_BATCH_HEAD = b'{"type":"' + BATCH.encode() + b'","events":['


def join_room_frame(encoded: Sequence[bytes]) -> bytes:
    """One frame for a tick's events, each already encoded by `encode_event`: the event
    alone, or a `batch` in order; byte for byte what `encode_room_frame` gives.

    An empty tick has no frame; asking for one is a bug in the caller, so it fails loudly.
    """
    if len(encoded) == 1:
        return encoded[0]
    if not encoded:
        raise ValueError("a room frame needs at least one event")
    return _BATCH_HEAD + b",".join(encoded) + b"]}"


def encode_room_frame(events: Sequence[dict[str, Any]]) -> bytes:
    """One frame for a tick's room events: the event alone, or a `batch` in order."""
    return join_room_frame([encode_event(event) for event in events])


# ---- a gift event assembled elsewhere (the money script writes it under the Redis broker) --


def sender_json(user_id: str, name: str) -> bytes:
    """The `sender` object of a gift event, as `GiftEvent.as_dict` has it."""
    return orjson.dumps({"id": user_id, "name": name})


def text_json(text: str) -> bytes:
    """A string as JSON text: a display name as the boards keep it and splice it into events."""
    return orjson.dumps(text)


def gift_json(gift_id: str, name: str, coins: int, animation: str) -> bytes:
    """The `gift` object of a gift event, as `GiftEvent.as_dict` has it."""
    return orjson.dumps({"id": gift_id, "name": name, "coins": coins, "animation": animation})


_SEQ_PLACEHOLDER = b'"seq":0'
_ROOM_ENDED_PREFIX = b'{"type":"room_ended"'


def split_at_seq(encoded: bytes) -> tuple[bytes, bytes]:
    """An event encoded with seq 0, cut around the seq's digits, for a writer that numbers it
    later (head + digits + tail). Inside a JSON string every quote is escaped, so the first
    `"seq":0` is the key itself."""
    head, found, tail = encoded.partition(_SEQ_PLACEHOLDER)
    if not found or tail[:1] not in (b",", b"}"):
        raise ValueError("the event has no seq of 0 to number")
    return head + b'"seq":', tail


def is_room_ended(encoded: bytes) -> bool:
    """Whether an encoded room event is `room_ended`, the last of its room."""
    return encoded.startswith(_ROOM_ENDED_PREFIX)
