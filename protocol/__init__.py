"""The giftstream wire contract, version 1, as pure Python: no I/O, no asyncio, no Redis."""

from protocol.codec import (
    MAX_FRAME_BYTES,
    decode_frame,
    encode,
    encode_error,
    encode_reply,
    encode_room_frame,
)
from protocol.errors import CloseCode, ErrorCode, ProtocolError
from protocol.events import PROTOCOL_VERSION
from protocol.messages import ClientMessage, MessageType, RequestId, parse_message

__all__ = [
    "MAX_FRAME_BYTES",
    "PROTOCOL_VERSION",
    "ClientMessage",
    "CloseCode",
    "ErrorCode",
    "MessageType",
    "ProtocolError",
    "RequestId",
    "decode_frame",
    "encode",
    "encode_error",
    "encode_reply",
    "encode_room_frame",
    "parse_message",
]
