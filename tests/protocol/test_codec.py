"""Frame-level decoding (binary, size, JSON) and the encoders' exact bytes."""

from __future__ import annotations

import json
from collections import deque
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from giftstream.protocol import (
    MAX_FRAME_BYTES,
    BalanceReply,
    ErrorCode,
    GiftEvent,
    GiftOk,
    Ping,
    Pong,
    ProtocolError,
    RoomEnded,
    SendGift,
    ViewersEvent,
    Welcome,
    decode_frame,
    encode_error,
    encode_event,
    encode_reply,
    encode_room_frame,
    join_room_frame,
)


def refused(frame: str | bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        decode_frame(frame)
    return caught.value


def padded_ping(size: int, pad: str = "x") -> str:
    """A valid ping frame of exactly `size` bytes of UTF-8, padded by an ignored field."""
    empty = '{"type":"ping","pad":""}'
    pad_bytes = len(pad.encode())
    count, rest = divmod(size - len(empty), pad_bytes)
    text = '{"type":"ping","pad":"' + pad * count + "y" * rest + '"}'
    assert len(text.encode()) == size
    return text


# ---- decode_frame ------------------------------------------------------------------------


@pytest.mark.parametrize("frame", [b'{"type":"ping"}', b"", bytes(range(256))])
def test_binary_frames_are_refused(frame: bytes) -> None:
    error = refused(frame)
    assert error.code is ErrorCode.BAD_REQUEST
    assert "binary" in error.message


@pytest.mark.parametrize("pad", ["x", "é", "€", "😀"])
def test_frame_of_exactly_4096_bytes_is_accepted(pad: str) -> None:
    assert decode_frame(padded_ping(MAX_FRAME_BYTES, pad)) == Ping()


@pytest.mark.parametrize("pad", ["x", "é", "€", "😀"])
def test_frame_of_4097_bytes_is_refused_naming_the_limit(pad: str) -> None:
    frame = padded_ping(MAX_FRAME_BYTES + 1, pad)
    error = refused(frame)
    assert error.code is ErrorCode.BAD_REQUEST
    assert "4096" in error.message


def test_multibyte_frame_under_4096_characters_but_over_4096_bytes_is_refused() -> None:
    frame = padded_ping(4100, "😀")  # about 1030 characters
    assert len(frame) < MAX_FRAME_BYTES
    assert refused(frame).code is ErrorCode.BAD_REQUEST


def test_huge_frame_is_refused() -> None:
    assert refused(padded_ping(60_000)).code is ErrorCode.BAD_REQUEST


@pytest.mark.parametrize(
    "frame",
    ["[]", "[1,2]", '"ping"', "1", "-1.5", "true", "null", '[{"type":"ping"}]'],
)
def test_json_that_is_no_object_is_refused(frame: str) -> None:
    error = refused(frame)
    assert error.code is ErrorCode.BAD_REQUEST
    assert "object" in error.message


@pytest.mark.parametrize(
    "frame",
    [
        "",
        " ",
        "not json",
        "{",
        '{"type":"ping"',
        '{"type":"ping"}}',
        "{'type':'ping'}",
        '{"type":"ping",}',
        '{"type":"ping"} {"type":"ping"}',
        "\x00",
        "\ud800",  # a lone surrogate cannot be UTF-8
        '{"type":"ping","x":"\ud800"}',
        '{"type":"ping","x":"\\ud800"}',  # an escaped lone surrogate
        '{"type":"ping","x":NaN}',
        '{"type":"ping","x":Infinity}',
        '{"type":"ping","x":-Infinity}',
        '{"type":"ping","x":1e400}',
        "[" * 2000 + "]" * 2000,  # deeper than orjson's limit
    ],
)
def test_garbage_is_bad_request(frame: str) -> None:
    assert refused(frame).code is ErrorCode.BAD_REQUEST


def test_long_frame_with_a_lone_surrogate_is_bad_request() -> None:
    # long enough to be measured in UTF-8 before parsing: that step must not raise either
    frame = '{"type":"ping","x":"' + "a" * 2000 + "\udc80" + '"}'
    assert refused(frame).code is ErrorCode.BAD_REQUEST


def test_huge_integers_are_not_integers() -> None:
    # orjson turns integers past 64 bits into floats; a count then is no integer
    big = "1" + "0" * 30
    frame = f'{{"type":"gift","room":"r","gift":"g","count":{big},"key":"k-0000001"}}'
    assert refused(frame).code is ErrorCode.BAD_COUNT
    assert refused(f'{{"type":"ping","id":{big}}}').code is ErrorCode.BAD_REQUEST


def test_whitespace_around_the_object_is_fine() -> None:
    assert decode_frame(' \n{"type":"ping"}\t') == Ping()


def test_duplicate_keys_take_the_last_value() -> None:
    # orjson's (and JSON's common) rule; documented so a client is not surprised
    assert decode_frame('{"type":"ping","id":1,"id":2}') == Ping(id=2)


# ---- encode_reply / encode_error ---------------------------------------------------------


def test_encode_reply_puts_the_id_after_type() -> None:
    reply = GiftOk(key="k-0000001", event="ev-1", coins=10, combo=1)
    assert encode_reply(reply, "r7") == (
        b'{"type":"gift_ok","id":"r7","key":"k-0000001","event":"ev-1","coins":10,"combo":1}'
    )
    assert encode_reply(Pong(ts=5), 0) == b'{"type":"pong","id":0,"ts":5}'
    assert encode_reply(Pong(ts=5), "") == b'{"type":"pong","id":"","ts":5}'


def test_encode_reply_without_id_has_no_id_key() -> None:
    assert encode_reply(BalanceReply(coins=1, diamonds=2), None) == (
        b'{"type":"balance","coins":1,"diamonds":2}'
    )


def test_encode_reply_to_hello_is_welcome_with_id() -> None:
    welcome = Welcome(user="u1", name="Ann", coins=1200, diamonds=0, ts=1764000000000)
    assert list(orjson.loads(encode_reply(welcome, 1))) == [
        "type",
        "id",
        "user",
        "name",
        "coins",
        "diamonds",
        "protocol",
        "ts",
    ]


def test_encode_error_echoes_the_request_id() -> None:
    error = ProtocolError(ErrorCode.NOT_JOINED, "join room cara before gifting", "g-1")
    assert encode_error(error) == (
        b'{"type":"error","id":"g-1","code":"not_joined",'
        b'"message":"join room cara before gifting","retryable":false}'
    )


def test_encode_error_without_id() -> None:
    error = ProtocolError(ErrorCode.OVERLOADED, "busy")
    assert encode_error(error) == (
        b'{"type":"error","code":"overloaded","message":"busy","retryable":true}'
    )


def test_a_refused_frame_round_trips_to_its_error_reply() -> None:
    error = refused(
        '{"type":"gift","room":"cara","gift":"rose","count":0,"key":"k-0000001","id":12}'
    )
    assert orjson.loads(encode_error(error)) == {
        "type": "error",
        "id": 12,
        "code": "bad_count",
        "message": error.message,
        "retryable": False,
    }


# ---- encode_room_frame -------------------------------------------------------------------

GIFT = GiftEvent(
    room="cara",
    seq=1,
    event="ev-1",
    sender_id="u1",
    sender_name="Ann",
    gift_id="rose",
    gift_name="Rose",
    gift_coins=5,
    animation="petals",
    count=1,
    combo=1,
    ts=1,
).as_dict()
VIEWERS = ViewersEvent(room="cara", seq=2, count=3).as_dict()
ENDED = RoomEnded(room="cara", seq=3).as_dict()


def test_one_event_is_its_own_frame() -> None:
    assert encode_room_frame([VIEWERS]) == b'{"type":"viewers","room":"cara","seq":2,"count":3}'


def test_several_events_are_one_batch_in_order() -> None:
    frame = orjson.loads(encode_room_frame([GIFT, VIEWERS, ENDED]))
    assert list(frame) == ["type", "events"]
    assert frame["type"] == "batch"
    assert frame["events"] == [GIFT, VIEWERS, ENDED]
    assert [event["seq"] for event in frame["events"]] == [1, 2, 3]


def test_batch_bytes_are_exact() -> None:
    assert encode_room_frame([VIEWERS, ENDED]) == (
        b'{"type":"batch","events":[{"type":"viewers","room":"cara","seq":2,"count":3},'
        b'{"type":"room_ended","room":"cara","seq":3}]}'
    )


@pytest.mark.parametrize("container", [list, tuple, deque])
def test_any_sequence_of_events_encodes(container: Any) -> None:
    assert encode_room_frame(container([VIEWERS, ENDED])) == encode_room_frame([VIEWERS, ENDED])


def test_an_empty_tick_has_no_frame() -> None:
    with pytest.raises(ValueError):
        encode_room_frame([])


def test_room_frame_does_not_change_the_events() -> None:
    events = [GIFT, VIEWERS]
    before = json.dumps(events)
    encode_room_frame(events)
    assert json.dumps(events) == before and events == [GIFT, VIEWERS]


def test_joined_events_are_the_bytes_the_batch_dict_encodes_to() -> None:
    """The hub encodes each event once and joins the bytes; a client must not see a
    difference from encoding the whole batch at once."""
    parts = [encode_event(event) for event in (GIFT, VIEWERS, ENDED)]
    batch = {"type": "batch", "events": [GIFT, VIEWERS, ENDED]}
    assert join_room_frame(parts) == orjson.dumps(batch)
    assert join_room_frame(parts[1:2]) == encode_room_frame([VIEWERS]) == parts[1]


@given(
    st.lists(
        st.dictionaries(
            st.text(max_size=8),
            st.one_of(
                st.text(max_size=12),
                st.integers(-(2**53), 2**53),
                st.booleans(),
                st.none(),
                st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=3),
            ),
            max_size=5,
        ),
        min_size=2,
        max_size=6,
    )
)
def test_any_joined_batch_equals_its_one_shot_encoding(events: list[dict[str, Any]]) -> None:
    parts = [encode_event(event) for event in events]
    assert join_room_frame(parts) == orjson.dumps({"type": "batch", "events": events})
    assert orjson.loads(join_room_frame(parts))["events"] == events


def test_joining_no_events_is_a_bug() -> None:
    with pytest.raises(ValueError):
        join_room_frame([])


def test_decode_of_a_valid_gift_frame() -> None:
    frame = '{"type":"gift","id":"g1","room":"cara","gift":"rose","count":3,"key":"k-0000001"}'
    assert decode_frame(frame) == SendGift(
        room="cara", gift="rose", count=3, key="k-0000001", id="g1"
    )
