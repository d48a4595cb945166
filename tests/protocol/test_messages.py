"""Every request type, and every bad value of every field, through a real text frame.

Requests go through `decode_frame` (not `parse_message` alone) so the tests cover what a
client can actually send: JSON text, parsed by orjson, then validated.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from giftstream.protocol import (
    ClientMessage,
    EndLive,
    ErrorCode,
    GetBalance,
    GetCatalog,
    GetLeaderboard,
    GoLive,
    Hello,
    Join,
    Leave,
    MessageType,
    Ping,
    ProtocolError,
    SendGift,
    Watch,
    decode_frame,
    parse_message,
)

GIFT: dict[str, Any] = {
    "type": "gift",
    "room": "cara",
    "gift": "rose",
    "count": 3,
    "key": "k-0000001",
}


def frame(obj: dict[str, Any]) -> str:
    return json.dumps(obj)


def refused(obj: dict[str, Any] | str) -> ProtocolError:
    """The error a frame is refused with; fails the test if it is accepted."""
    with pytest.raises(ProtocolError) as caught:
        decode_frame(obj if isinstance(obj, str) else frame(obj))
    return caught.value


# ---- every request type parses -----------------------------------------------------------


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        ('{"type":"hello","token":"a.b.c"}', Hello(token="a.b.c")),
        ('{"type":"join","room":"cara"}', Join(room="cara")),
        ('{"type":"join","room":"cara","since":41}', Join(room="cara", since=41)),
        ('{"type":"join","room":"cara","since":0}', Join(room="cara", since=0)),
        ('{"type":"join","room":"cara","since":null}', Join(room="cara")),
        ('{"type":"leave","room":"cara"}', Leave(room="cara")),
        (
            '{"type":"gift","room":"cara","gift":"rose","count":3,"key":"k-0000001"}',
            SendGift(room="cara", gift="rose", count=3, key="k-0000001"),
        ),
        ('{"type":"balance"}', GetBalance()),
        ('{"type":"go_live","title":"Hello"}', GoLive(title="Hello")),
        ('{"type":"go_live"}', GoLive(title="")),
        ('{"type":"go_live","title":null}', GoLive(title="")),
        ('{"type":"go_live","title":"  padded \\n"}', GoLive(title="padded")),
        ('{"type":"end_live"}', EndLive()),
        ('{"type":"watch","rooms":["*"]}', Watch(rooms=("*",))),
        ('{"type":"watch","rooms":["a","b","a","b","c"]}', Watch(rooms=("a", "b", "c"))),
        ('{"type":"watch","rooms":["b","*","b"]}', Watch(rooms=("b", "*"))),
        ('{"type":"ping"}', Ping()),
        ('{"type":"catalog"}', GetCatalog()),
        ('{"type":"catalog","room":"ignored"}', GetCatalog()),
    ],
)
def test_every_request_type_parses(wire: str, expected: ClientMessage) -> None:
    assert decode_frame(wire) == expected


@pytest.mark.parametrize("request_id", ["r1", "", "x" * 64, 0, 7, -3, 2**63, 2**64 - 1])
def test_request_id_is_kept(request_id: str | int) -> None:
    message = decode_frame(frame({"type": "ping", "id": request_id}))
    assert message == Ping(id=request_id)
    assert type(message.id) is type(request_id)


def test_request_id_on_every_type() -> None:
    requests: list[dict[str, Any]] = [
        {"type": "hello", "token": "t"},
        {"type": "join", "room": "r"},
        {"type": "leave", "room": "r"},
        GIFT,
        {"type": "balance"},
        {"type": "go_live"},
        {"type": "end_live"},
        {"type": "watch", "rooms": ["*"]},
        {"type": "ping"},
        {"type": "catalog"},
        {"type": "leaderboard", "board": "week", "room": "r"},
    ]
    for obj in requests:
        message = decode_frame(frame({**obj, "id": "req-9"}))
        assert message.id == "req-9"
        assert message.type == obj["type"]


def test_message_type_values() -> None:
    assert [t.value for t in MessageType] == [
        "hello",
        "join",
        "leave",
        "gift",
        "balance",
        "go_live",
        "end_live",
        "watch",
        "ping",
        "catalog",
        "leaderboard",
    ]
    assert Watch.type is MessageType.WATCH and SendGift.type is MessageType.GIFT


def test_unknown_fields_are_ignored() -> None:
    message = decode_frame(frame({**GIFT, "sender": "mallory", "extra": [1, {"x": None}]}))
    assert message == SendGift(room="cara", gift="rose", count=3, key="k-0000001")


def test_messages_are_frozen() -> None:
    message = decode_frame(frame(GIFT))
    assert isinstance(message, SendGift)
    with pytest.raises(AttributeError):
        message.count = 99  # type: ignore[misc]


# ---- type and id -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "obj",
    [
        {},
        {"room": "cara"},
        {"type": None},
        {"type": 1},
        {"type": True},
        {"type": ["gift"]},
        {"type": {"gift": 1}},
        {"type": "GIFT"},
        {"type": "gift "},
        {"type": "batch"},
        {"type": ""},
        {"type": "x" * 1000},
    ],
)
def test_bad_type_is_bad_request(obj: dict[str, Any]) -> None:
    error = refused(obj)
    assert error.code is ErrorCode.BAD_REQUEST
    assert error.request_id is None


def test_unknown_type_echoes_a_valid_id() -> None:
    error = refused({"type": "teleport", "id": 5})
    assert (error.code, error.request_id) == (ErrorCode.BAD_REQUEST, 5)
    assert "teleport" in error.message


@pytest.mark.parametrize(
    "request_id",
    [
        "x" * 65,
        True,
        False,
        1.0,
        1.5,
        [1],
        {"id": 1},
        10**64,  # 65 digits: orjson reads it as a float, refused either way
    ],
)
def test_bad_request_id_is_refused_without_echo(request_id: Any) -> None:
    error = refused({"type": "ping", "id": request_id})
    assert (error.code, error.request_id) == (ErrorCode.BAD_REQUEST, None)
    assert "`id`" in error.message


@pytest.mark.parametrize(
    ("request_id", "ok"),
    [
        (10**64 - 1, True),  # 64 digits
        (10**64, False),  # 65 digits
        (-(10**63) + 1, True),  # "-" and 63 digits
        (-(10**63), False),  # "-" and 64 digits
        # past Python's int-to-str limit: must be refused, not blow up
        pytest.param(10**5000, False, id="5001-digits"),
    ],
)
def test_integer_id_length_counts_its_decimal_form(request_id: int, ok: bool) -> None:
    # orjson cannot produce these; parse_message is public, so its bound must hold alone.
    obj = {"type": "ping", "id": request_id}
    if ok:
        assert parse_message(obj) == Ping(id=request_id)
    else:
        with pytest.raises(ProtocolError) as caught:
            parse_message(obj)
        assert caught.value.code is ErrorCode.BAD_REQUEST


def test_a_bad_id_wins_over_a_bad_field() -> None:
    error = refused({**GIFT, "count": 0, "id": True})
    assert (error.code, error.request_id) == (ErrorCode.BAD_REQUEST, None)


# ---- ids (rooms, gifts) ------------------------------------------------------------------

BAD_IDS: list[Any] = [
    "",
    "x" * 65,
    "a b",
    "a/b",
    "ä",
    "room\n",
    "\nroom",
    "ro\x00om",
    "*",
    "room\t",
    " room",
]


@pytest.mark.parametrize("good", ["a", "x" * 64, "A-z_0.9:x", "user:42", "...", "-"])
def test_valid_room_ids(good: str) -> None:
    assert decode_frame(frame({"type": "join", "room": good})) == Join(room=good)
    assert decode_frame(frame({"type": "leave", "room": good})) == Leave(room=good)


@pytest.mark.parametrize("kind", ["join", "leave", "gift"])
@pytest.mark.parametrize("room", [*BAD_IDS, None, 7, True, ["cara"], {"id": "cara"}])
def test_bad_room_is_bad_request(kind: str, room: Any) -> None:
    obj = {**GIFT, "type": kind, "room": room, "id": "r1"}
    error = refused(obj)
    assert (error.code, error.request_id) == (ErrorCode.BAD_REQUEST, "r1")
    assert "`room`" in error.message


@pytest.mark.parametrize("kind", ["join", "leave", "gift"])
def test_missing_room_is_bad_request(kind: str) -> None:
    obj = {key: value for key, value in GIFT.items() if key != "room"}
    error = refused({**obj, "type": kind, "id": 3})
    assert (error.code, error.request_id) == (ErrorCode.BAD_REQUEST, 3)


def test_trailing_newline_room_is_refused() -> None:
    # the classic `re.match("...$")` bug: `$` matches before a final newline
    error = refused('{"type":"join","room":"cara\\n"}')
    assert error.code is ErrorCode.BAD_REQUEST


# ---- gift --------------------------------------------------------------------------------


@pytest.mark.parametrize("gift", [None, 1, 1.5, True, ["rose"], {"id": "rose"}])
def test_gift_that_is_not_a_string_is_bad_request(gift: Any) -> None:
    error = refused({**GIFT, "gift": gift, "id": "g"})
    assert (error.code, error.request_id) == (ErrorCode.BAD_REQUEST, "g")


def test_missing_gift_is_bad_request() -> None:
    obj = {key: value for key, value in GIFT.items() if key != "gift"}
    assert refused(obj).code is ErrorCode.BAD_REQUEST


@pytest.mark.parametrize("gift", BAD_IDS)
def test_gift_string_that_is_no_id_is_unknown_gift(gift: str) -> None:
    error = refused({**GIFT, "gift": gift, "id": "g"})
    assert (error.code, error.request_id) == (ErrorCode.UNKNOWN_GIFT, "g")


@pytest.mark.parametrize("count", [1, 2, 50, 99])
def test_counts_in_range(count: int) -> None:
    message = decode_frame(frame({**GIFT, "count": count}))
    assert isinstance(message, SendGift) and message.count == count


@pytest.mark.parametrize(
    "count",
    [0, 100, -1, 2**63, 2**64 - 1, 1.0, 3.0, 2.5, "3", "1", True, False, None, [3], {"n": 3}],
)
def test_bad_count(count: Any) -> None:
    error = refused({**GIFT, "count": count, "id": 11})
    assert (error.code, error.request_id) == (ErrorCode.BAD_COUNT, 11)


@pytest.mark.parametrize(
    "literal", ["1e2", "1E0", "-0.0", "99999999999999999999999999", "1.0", "0x10"]
)
def test_count_literals_that_are_no_json_integer(literal: str) -> None:
    wire = f'{{"type":"gift","room":"cara","gift":"rose","count":{literal},"key":"k-0000001"}}'
    with pytest.raises(ProtocolError) as caught:
        decode_frame(wire)
    # "0x10" is not JSON at all; the rest are floats
    expected = ErrorCode.BAD_REQUEST if literal == "0x10" else ErrorCode.BAD_COUNT
    assert caught.value.code is expected


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "nan", "1e400"])
def test_count_nan_and_infinity_literals_are_bad_request(literal: str) -> None:
    # not JSON (1e400 overflows a double), so the frame fails before the count is read
    wire = f'{{"type":"gift","room":"cara","gift":"rose","count":{literal},"key":"k-0000001"}}'
    assert refused(wire).code is ErrorCode.BAD_REQUEST


def test_nan_count_given_directly_is_bad_count() -> None:
    error = _parse_error({**GIFT, "count": float("nan")})
    assert error.code is ErrorCode.BAD_COUNT


def test_missing_count_is_bad_count() -> None:
    obj = {key: value for key, value in GIFT.items() if key != "count"}
    assert refused(obj).code is ErrorCode.BAD_COUNT


@pytest.mark.parametrize("key", ["k" * 8, "k" * 64, "AZaz09_-", "-_-_-_-_", "0123456789"])
def test_valid_keys(key: str) -> None:
    message = decode_frame(frame({**GIFT, "key": key}))
    assert isinstance(message, SendGift) and message.key == key


@pytest.mark.parametrize(
    "key",
    [
        "k" * 7,
        "k" * 65,
        "",
        "with.dot1",
        "with:col1",
        "with space",
        "k" * 8 + "\n",
        "ключ-ключ",
        12345678,
        True,
        None,
        ["k" * 8],
    ],
)
def test_bad_key_is_bad_request(key: Any) -> None:
    error = refused({**GIFT, "key": key, "id": "k"})
    assert (error.code, error.request_id) == (ErrorCode.BAD_REQUEST, "k")
    assert "`key`" in error.message


def test_missing_key_is_bad_request() -> None:
    obj = {key: value for key, value in GIFT.items() if key != "key"}
    assert refused(obj).code is ErrorCode.BAD_REQUEST


# ---- join since --------------------------------------------------------------------------


@pytest.mark.parametrize("since", [0, 1, 2**53])
def test_valid_since(since: int) -> None:
    assert decode_frame(frame({"type": "join", "room": "r", "since": since})) == Join(
        room="r", since=since
    )


@pytest.mark.parametrize("since", [-1, 2**53 + 1, 2**63, 1.0, 5.5, "5", True, False, [5]])
def test_bad_since_is_bad_request(since: Any) -> None:
    error = refused({"type": "join", "room": "r", "since": since, "id": "s"})
    assert (error.code, error.request_id) == (ErrorCode.BAD_REQUEST, "s")
    assert "`since`" in error.message


# ---- hello -------------------------------------------------------------------------------


@pytest.mark.parametrize("token", [None, 1, True, ["a.b.c"], {"jwt": "a.b.c"}])
def test_malformed_token_is_unauthorized(token: Any) -> None:
    # "bad, expired or missing token" closes 4401: the session closes on this code
    error = refused({"type": "hello", "token": token, "id": "h"})
    assert (error.code, error.request_id) == (ErrorCode.UNAUTHORIZED, "h")


def test_hello_without_token_is_unauthorized() -> None:
    assert refused({"type": "hello"}).code is ErrorCode.UNAUTHORIZED


def test_empty_token_is_unauthorized() -> None:
    # a well-formed hello with an unusable token: the session closes it with 4401
    error = refused({"type": "hello", "token": "", "id": "h"})
    assert (error.code, error.request_id) == (ErrorCode.UNAUTHORIZED, "h")


def test_token_length_bound() -> None:
    assert parse_message({"type": "hello", "token": "t" * 4096}) == Hello(token="t" * 4096)
    assert _parse_error({"type": "hello", "token": "t" * 4097}).code is ErrorCode.UNAUTHORIZED


# ---- go_live title -----------------------------------------------------------------------


def test_title_bound_counts_after_strip() -> None:
    padded = "   " + "t" * 200 + "   "
    assert decode_frame(frame({"type": "go_live", "title": padded})) == GoLive(title="t" * 200)
    error = refused({"type": "go_live", "title": "t" * 201, "id": "t"})
    assert (error.code, error.request_id) == (ErrorCode.BAD_REQUEST, "t")


@pytest.mark.parametrize("title", [1, True, ["t"], {"t": 1}])
def test_title_that_is_not_a_string_is_bad_request(title: Any) -> None:
    assert refused({"type": "go_live", "title": title}).code is ErrorCode.BAD_REQUEST


# ---- watch rooms -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rooms",
    [None, [], "*", "cara", {"cara": 1}, ["cara", ""], ["cara", 1], ["**"], [None], ["a\n"]],
)
def test_bad_watch_rooms_is_bad_request(rooms: Any) -> None:
    error = refused({"type": "watch", "rooms": rooms, "id": "w"})
    assert (error.code, error.request_id) == (ErrorCode.BAD_REQUEST, "w")


def test_watch_room_count_bound() -> None:
    rooms = [f"r{i}" for i in range(1000)]
    assert parse_message({"type": "watch", "rooms": rooms}) == Watch(rooms=tuple(rooms))
    assert _parse_error({"type": "watch", "rooms": [*rooms, "r1000"]}).code is (
        ErrorCode.BAD_REQUEST
    )
    # the bound is on entries sent, before duplicates are dropped
    assert _parse_error({"type": "watch", "rooms": ["a"] * 1001}).code is ErrorCode.BAD_REQUEST


def test_missing_watch_rooms_is_bad_request() -> None:
    assert refused({"type": "watch"}).code is ErrorCode.BAD_REQUEST


def _parse_error(obj: dict[str, Any]) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        parse_message(obj)
    return caught.value


def test_leaderboard_request() -> None:
    """session and week name a room; creators_day names none (a room there is refused)."""
    for board in ("session", "week"):
        message = decode_frame(frame({"type": "leaderboard", "board": board, "room": "cara"}))
        assert isinstance(message, GetLeaderboard)
        assert (message.board, message.room) == (board, "cara")
    message = decode_frame(frame({"type": "leaderboard", "board": "creators_day"}))
    assert isinstance(message, GetLeaderboard)
    assert (message.board, message.room) == ("creators_day", None)
    bad: list[dict[str, Any]] = [
        {"type": "leaderboard"},
        {"type": "leaderboard", "board": "month", "room": "cara"},
        {"type": "leaderboard", "board": 1, "room": "cara"},
        {"type": "leaderboard", "board": "session"},
        {"type": "leaderboard", "board": "week", "room": "not a room"},
        {"type": "leaderboard", "board": "creators_day", "room": "cara"},
    ]
    for obj in bad:
        with pytest.raises(ProtocolError) as info:
            decode_frame(frame({**obj, "id": 7}))
        assert (info.value.code, info.value.request_id) == (ErrorCode.BAD_REQUEST, 7), obj
