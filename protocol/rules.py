"""The wire rules every part checks (ids, idempotency keys, counts, the room wildcard): one
source, imported by the protocol, the server and the load test alike.

Pure: no I/O. The patterns are checked with `fullmatch`, never `match(...$)`: `$` also
matches before a trailing newline, so `match` would take "rose\\n" as an id.
"""

from __future__ import annotations

import re
from typing import Final, TypeGuard

# User, room, gift and package ids (PROTOCOL.md §1).
MAX_ID_CHARS: Final = 64
ID_CHARS: Final = "A-Za-z0-9_.:-"
ID_RULE: Final = f"1-{MAX_ID_CHARS} characters of [{ID_CHARS}]"
ID_PATTERN: Final = re.compile(f"[{ID_CHARS}]{{1,{MAX_ID_CHARS}}}")  # fullmatch, never match(...$)

# Idempotency keys of gifts and payouts: no '.' or ':' (server/money/keys.py relies on it).
KEY_CHARS: Final = "A-Za-z0-9_-"
KEY_RULE: Final = f"8-64 characters of [{KEY_CHARS}]"
KEY_PATTERN: Final = re.compile(f"[{KEY_CHARS}]{{8,64}}")  # fullmatch, never match(...$)

MAX_COUNT: Final = 99  # of one gift in one send
# The leaderboards (PROTOCOL.md §2.2): session and week of a room, creators_day of no room.
BOARDS: Final = ("session", "week", "creators_day")
ROOMLESS_BOARDS: Final = ("creators_day",)
ALL_ROOMS: Final = "*"  # `watch` every room
# Every amount the internal HTTP API takes (coins, diamonds): far below 2**53, so each one
# stays exact in Lua's doubles.
MAX_AMOUNT: Final = 10**12


def is_id(value: object) -> TypeGuard[str]:
    """A user, room, gift or package id: 1-64 characters of [A-Za-z0-9_.:-]."""
    return isinstance(value, str) and ID_PATTERN.fullmatch(value) is not None


def is_key(value: object) -> TypeGuard[str]:
    """An idempotency key: 8-64 characters of [A-Za-z0-9_-]."""
    return isinstance(value, str) and KEY_PATTERN.fullmatch(value) is not None


def is_count(value: object) -> TypeGuard[int]:
    """How many of one gift a send may carry: a true int (never a bool) from 1 to MAX_COUNT."""
    return type(value) is int and 1 <= value <= MAX_COUNT


__all__ = [
    "ALL_ROOMS",
    "BOARDS",
    "ID_CHARS",
    "ID_PATTERN",
    "ID_RULE",
    "KEY_CHARS",
    "KEY_PATTERN",
    "KEY_RULE",
    "MAX_AMOUNT",
    "MAX_COUNT",
    "MAX_ID_CHARS",
    "ROOMLESS_BOARDS",
    "is_count",
    "is_id",
    "is_key",
]
