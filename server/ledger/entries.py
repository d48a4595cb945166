"""The ledger's entries: the fields of each kind, parsing one, stream ids, reading them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson

from giftstream.server.money import keys
from giftstream.server.redis_cluster import RedisClient

# The fields each kind of entry must carry, besides event, kind and ts; what a consumer may
# rely on. Every int is a non-negative integer.
FIELDS: dict[str, dict[str, type]] = {
    "gift": {
        "sender": str,
        "creator": str,
        "room": str,
        "gift": str,
        "key": str,
        "count": int,
        "coins": int,
        "diamonds": int,
        "platform": int,
        "combo": int,
    },
    "purchase": {
        "user": str,
        "receipt": str,
        "package": str,
        "coins": int,
        "credited": int,
        "debt_repaid": int,
        "price_cents": int,
    },
    "refund": {"user": str, "receipt": str, "coins": int, "debt": int},
    "payout": {"creator": str, "key": str, "payout": str, "diamonds": int, "cents": int},
}


# Fields a kind of entry carries since a later revision; an older entry lacks them. Checked
# like FIELDS when present. A gift's `payable_at`: when its diamonds stop being on hold (ms).
OPTIONAL_FIELDS: dict[str, dict[str, type]] = {"gift": {"payable_at": int}}


class LedgerError(ValueError):
    """An entry that does not parse or lacks a field; the message names its stream id."""


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    id: str  # the stream entry id, e.g. "1764000000000-0"
    data: dict[str, Any]  # the parsed `data` field, checked against FIELDS

    @property
    def event(self) -> str:
        return str(self.data["event"])

    @property
    def kind(self) -> str:
        return str(self.data["kind"])

    @property
    def ts(self) -> int:
        return int(self.data["ts"])


def parse_entry(stream_id: str, fields: dict[Any, Any]) -> LedgerEntry:
    """Check one raw stream entry; a bad one raises LedgerError rather than being guessed at."""
    raw = fields.get(b"data", fields.get("data"))
    if raw is None:
        raise LedgerError(f"entry {stream_id}: no `data` field")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise LedgerError(f"entry {stream_id}: `data` is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise LedgerError(f"entry {stream_id}: `data` is not a JSON object")
    kind = data.get("kind")
    if kind not in FIELDS:
        raise LedgerError(f"entry {stream_id}: unknown kind {kind!r}")
    wanted = {"event": str, "ts": int, **FIELDS[kind]}
    for name, kind_of in OPTIONAL_FIELDS.get(kind, {}).items():
        if name in data:
            wanted[name] = kind_of
    for name, kind_of in wanted.items():
        value = data.get(name)
        if kind_of is int:
            ok = type(value) is int and value >= 0
        else:
            ok = isinstance(value, str) and value != ""
        if not ok:
            raise LedgerError(f"entry {stream_id} ({kind}): bad or missing {name}: {value!r}")
    return LedgerEntry(stream_id, data)


def stream_id_key(stream_id: str) -> tuple[int, int]:
    """A stream id as a sortable pair: "1764000000000-3" -> (1764000000000, 3)."""
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


def next_stream_id(stream_id: str) -> str:
    """The smallest stream id after `stream_id` (XTRIM MINID keeps it and all after)."""
    ms, seq = stream_id_key(stream_id)
    return f"{ms}-{seq + 1}" if seq < 2**64 - 1 else f"{ms + 1}-0"


async def read_raw(
    redis: RedisClient,
    ledger_key: str = keys.LEDGER,
    start: str = "-",
    count: int = 1000,
    end: str = "+",
) -> AsyncIterator[tuple[str, dict[Any, Any]]]:
    """Every (stream id, fields) from `start` to `end` (both inclusive; "(" excludes), read in
    pages of `count`."""
    while True:
        page = await redis.xrange(ledger_key, min=start, max=end, count=count) or []
        for stream_id, fields in page:
            yield keys.text(stream_id), fields or {}
        if len(page) < count:
            return
        start = "(" + keys.text(page[-1][0])


async def read_entries(
    redis: RedisClient, ledger_key: str = keys.LEDGER, start: str = "-", count: int = 1000
) -> AsyncIterator[LedgerEntry]:
    """Every parsed entry from `start` (inclusive) on; a bad entry raises LedgerError."""
    async for stream_id, fields in read_raw(redis, ledger_key, start, count):
        yield parse_entry(stream_id, fields)
