"""The wire rules alone: pure, no server."""

from __future__ import annotations

import pytest

from giftstream.protocol.rules import (
    ALL_ROOMS,
    ID_PATTERN,
    KEY_PATTERN,
    MAX_COUNT,
    is_count,
    is_id,
    is_key,
)


@pytest.mark.parametrize("good", ["a", "rose", "u1.x:y-z_0", "x" * 64])
def test_ids_on_the_rule(good: str) -> None:
    assert is_id(good)


@pytest.mark.parametrize(
    "bad", ["", "x" * 65, "rose\n", "\nrose", "has space", "rosé", "a/b", "*", None, 1, b"rose"]
)
def test_ids_off_the_rule(bad: object) -> None:
    assert not is_id(bad)


@pytest.mark.parametrize("good", ["k-0000001", "A_b-c_D-", "k" * 64])
def test_keys_on_the_rule(good: str) -> None:
    assert is_key(good)


@pytest.mark.parametrize(
    "bad",
    ["short", "k" * 65, "k-0000001\n", "colon:key:1", "dot.key.1", "has space", None, 12345678],
)
def test_keys_off_the_rule(bad: object) -> None:
    assert not is_key(bad)


def test_a_trailing_newline_is_not_matched_by_fullmatch() -> None:
    """Why every pattern is fullmatched: `$` matches before a final newline."""
    assert ID_PATTERN.fullmatch("rose\n") is None
    assert KEY_PATTERN.fullmatch("k-0000001\n") is None


@pytest.mark.parametrize("good", [1, 2, MAX_COUNT])
def test_counts_on_the_rule(good: int) -> None:
    assert is_count(good)


@pytest.mark.parametrize("bad", [0, -1, MAX_COUNT + 1, True, 1.0, "1", None])
def test_counts_off_the_rule(bad: object) -> None:
    assert not is_count(bad)


def test_the_room_wildcard_is_never_a_room_id() -> None:
    assert not is_id(ALL_ROOMS)
