"""Every server event's exact wire object, compared with literals from PROTOCOL.md.

Key order is part of what we promise (documented order), so the tests compare the list of
items, not only dict equality, which ignores order.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from giftstream.protocol import (
    PROTOCOL_VERSION,
    BalanceReply,
    CatalogGift,
    CatalogReply,
    Ended,
    ErrorCode,
    ErrorReply,
    GiftEvent,
    GiftOk,
    Joined,
    Left,
    Live,
    Pong,
    RoomEnded,
    RoomOpened,
    ServerEvent,
    Stats,
    ViewersEvent,
    Watching,
    Welcome,
    encode,
)

GIFT_EVENT = GiftEvent(
    room="cara",
    seq=42,
    event="ev-1",
    sender_id="u1",
    sender_name="Ann",
    gift_id="rose",
    gift_name="Rose",
    gift_coins=5,
    animation="petals",
    count=3,
    combo=2,
    ts=1764000000123,
)

CASES: list[tuple[ServerEvent, dict[str, Any]]] = [
    (
        Welcome(user="u1", name="Ann", coins=1200, diamonds=0, ts=1764000000000),
        {
            "type": "welcome",
            "user": "u1",
            "name": "Ann",
            "coins": 1200,
            "diamonds": 0,
            "protocol": 1,
            "ts": 1764000000000,
        },
    ),
    (
        Joined(room="cara", creator="cara", title="Hi", viewers=7, seq=41),
        {
            "type": "joined",
            "room": "cara",
            "creator": "cara",
            "title": "Hi",
            "viewers": 7,
            "seq": 41,
        },
    ),
    (
        Joined(room="cara", creator="cara", title="Hi", viewers=7, seq=41, recovered=False),
        {
            "type": "joined",
            "room": "cara",
            "creator": "cara",
            "title": "Hi",
            "viewers": 7,
            "seq": 41,
            "recovered": False,
        },
    ),
    (
        Joined(room="cara", creator="cara", title="", viewers=0, seq=0, recovered=True),
        {
            "type": "joined",
            "room": "cara",
            "creator": "cara",
            "title": "",
            "viewers": 0,
            "seq": 0,
            "recovered": True,
        },
    ),
    (Left(room="cara"), {"type": "left", "room": "cara"}),
    (
        GiftOk(key="k-0000001", event="ev-1", coins=1185, combo=2),
        {"type": "gift_ok", "key": "k-0000001", "event": "ev-1", "coins": 1185, "combo": 2},
    ),
    (
        BalanceReply(coins=1185, diamonds=30),
        {"type": "balance", "coins": 1185, "diamonds": 30},
    ),
    (
        CatalogReply(
            gifts=(
                CatalogGift(id="rose", name="Rose", coins=1, animation="anim.rose.v1"),
                CatalogGift(id="lion", name="Lion", coins=29999, animation="anim.lion.v1"),
            )
        ),
        {
            "type": "catalog",
            "gifts": [
                {"id": "rose", "name": "Rose", "coins": 1, "animation": "anim.rose.v1"},
                {"id": "lion", "name": "Lion", "coins": 29999, "animation": "anim.lion.v1"},
            ],
        },
    ),
    (CatalogReply(gifts=()), {"type": "catalog", "gifts": []}),
    (Live(room="cara"), {"type": "live", "room": "cara"}),
    (Ended(room="cara"), {"type": "ended", "room": "cara"}),
    (Watching(rooms=("*",)), {"type": "watching", "rooms": ["*"]}),
    (Watching(rooms=("a", "b")), {"type": "watching", "rooms": ["a", "b"]}),
    (Pong(ts=1764000000000), {"type": "pong", "ts": 1764000000000}),
    (
        ErrorReply(code=ErrorCode.BAD_COUNT, message="`count` must be 1 to 99"),
        {
            "type": "error",
            "code": "bad_count",
            "message": "`count` must be 1 to 99",
            "retryable": False,
        },
    ),
    (
        ErrorReply(code=ErrorCode.RATE_LIMITED, message="slow down"),
        {"type": "error", "code": "rate_limited", "message": "slow down", "retryable": True},
    ),
    (
        GIFT_EVENT,
        {
            "type": "gift",
            "room": "cara",
            "seq": 42,
            "event": "ev-1",
            "sender": {"id": "u1", "name": "Ann"},
            "gift": {"id": "rose", "name": "Rose", "coins": 5, "animation": "petals"},
            "count": 3,
            "combo": 2,
            "ts": 1764000000123,
        },
    ),
    (
        ViewersEvent(room="cara", seq=43, count=8),
        {"type": "viewers", "room": "cara", "seq": 43, "count": 8},
    ),
    (RoomEnded(room="cara", seq=44), {"type": "room_ended", "room": "cara", "seq": 44}),
    (
        RoomOpened(room="cara", creator="cara", title="Hi"),
        {"type": "room_opened", "room": "cara", "creator": "cara", "title": "Hi"},
    ),
    (
        Stats(ts=1764000000000, rooms=3, connections=120, gifts_per_s=4.5, coins_per_s=22.5),
        {
            "type": "stats",
            "ts": 1764000000000,
            "rooms": 3,
            "connections": 120,
            "gifts_per_s": 4.5,
            "coins_per_s": 22.5,
        },
    ),
]


@pytest.mark.parametrize(("event", "wire"), CASES, ids=lambda c: type(c).__name__)
def test_exact_wire_object_in_documented_order(event: ServerEvent, wire: dict[str, Any]) -> None:
    produced = event.as_dict()
    assert list(produced.items()) == list(wire.items())
    for key in ("sender", "gift"):
        if isinstance(wire.get(key), dict):
            assert list(produced[key].items()) == list(wire[key].items())


@pytest.mark.parametrize(("event", "wire"), CASES, ids=lambda c: type(c).__name__)
def test_encode_is_the_wire_object_as_json(event: ServerEvent, wire: dict[str, Any]) -> None:
    encoded = encode(event)
    assert encoded == orjson.dumps(wire)
    assert list(orjson.loads(encoded)) == list(wire)


def test_protocol_version_is_1() -> None:
    assert PROTOCOL_VERSION == 1


def test_watching_sends_a_json_list() -> None:
    assert encode(Watching(rooms=("a", "b"))) == b'{"type":"watching","rooms":["a","b"]}'


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_error_code_says_whether_a_retry_can_help(code: ErrorCode) -> None:
    wire = ErrorReply(code=code, message="m").as_dict()
    assert wire["code"] == code.value
    expected = code in {ErrorCode.RATE_LIMITED, ErrorCode.OVERLOADED, ErrorCode.INTERNAL}
    assert wire["retryable"] is expected


def test_as_dict_returns_a_fresh_dict() -> None:
    # rooms keep as_dict() results in their history; one caller's change must not leak
    first = GIFT_EVENT.as_dict()
    first["sender"]["name"] = "changed"
    assert GIFT_EVENT.as_dict()["sender"]["name"] == "Ann"


def test_events_are_frozen() -> None:
    with pytest.raises(AttributeError):
        GIFT_EVENT.count = 9  # type: ignore[misc]
