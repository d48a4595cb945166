"""Properties over generated input: whatever a client sends, decoding either yields a
request or a `ProtocolError`; and every valid gift survives the trip through a frame."""

from __future__ import annotations

import json
import string
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from giftstream.protocol import (
    MAX_FRAME_BYTES,
    ErrorCode,
    ProtocolError,
    SendGift,
    decode_frame,
    encode_error,
    parse_message,
)

ID_CHARS = string.ascii_letters + string.digits + "_.:-"
KEY_CHARS = string.ascii_letters + string.digits + "_-"

ids = st.text(alphabet=ID_CHARS, min_size=1, max_size=64)
keys = st.text(alphabet=KEY_CHARS, min_size=8, max_size=64)
SEND_GIFT_FIELDS = {"type", "id", "room", "gift", "count", "key"}
request_ids = st.none() | st.text(max_size=64) | st.integers(-(2**63), 2**64 - 1)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
fields = st.sampled_from(
    ["type", "id", "room", "gift", "count", "key", "since", "token", "title", "rooms"]
)
message_types = st.sampled_from(
    ["hello", "join", "leave", "gift", "balance", "go_live", "end_live", "watch", "ping", "catalog"]
)
# objects shaped like requests, with fields of any JSON type: reach deep into every parser
request_like = st.fixed_dictionaries({"type": message_types}, optional={"id": json_values}).flatmap(
    lambda base: st.dictionaries(fields, json_values, max_size=6).map(
        lambda extra: {**extra, **base}
    )
)


def assert_decodes_or_refuses(frame: str | bytes) -> None:
    try:
        decode_frame(frame)
    except ProtocolError as error:
        assert isinstance(error.code, ErrorCode)
        assert error.request_id is None or type(error.request_id) in (str, int)
        encode_error(error)  # every refusal must be encodable as a reply


@settings(max_examples=500)
@given(st.text(max_size=5000))
@example("\ud800")
@example("[" * 3000)
@example('{"type":"ping","id":' + "9" * 400 + "}")
def test_arbitrary_text_only_raises_protocol_error(frame: str) -> None:
    assert_decodes_or_refuses(frame)


@settings(max_examples=300)
@given(st.binary(max_size=5000))
def test_arbitrary_bytes_are_refused_as_binary(frame: bytes) -> None:
    try:
        decode_frame(frame)
    except ProtocolError as error:
        assert error.code is ErrorCode.BAD_REQUEST
    else:
        raise AssertionError("a binary frame was accepted")


@settings(max_examples=300)
@given(st.binary(max_size=3000))
def test_arbitrary_bytes_as_text_only_raise_protocol_error(frame: bytes) -> None:
    assert_decodes_or_refuses(frame.decode("utf-8", errors="surrogateescape"))


@settings(max_examples=1000)
@given(request_like)
def test_request_like_objects_only_raise_protocol_error(obj: dict[str, Any]) -> None:
    assert_decodes_or_refuses(json.dumps(obj))
    try:
        parse_message(obj)
    except ProtocolError:
        pass


@settings(max_examples=500)
@given(
    room=ids,
    gift=ids,
    count=st.integers(1, 99),
    key=keys,
    request_id=request_ids,
    extra=st.dictionaries(
        st.text(max_size=8).filter(lambda k: k not in SEND_GIFT_FIELDS), json_values, max_size=3
    ),
)
def test_valid_send_gift_round_trips(
    room: str,
    gift: str,
    count: int,
    key: str,
    request_id: str | int | None,
    extra: dict[str, Any],
) -> None:
    wire: dict[str, Any] = {
        **extra,
        "type": "gift",
        "room": room,
        "gift": gift,
        "count": count,
        "key": key,
    }
    if request_id is not None:
        wire["id"] = request_id
    frame = json.dumps(wire, ensure_ascii=False)
    if len(frame.encode()) > MAX_FRAME_BYTES:
        return
    assert decode_frame(frame) == SendGift(
        room=room, gift=gift, count=count, key=key, id=request_id
    )
