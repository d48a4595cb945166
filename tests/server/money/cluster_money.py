"""Helpers of the cluster money tests: users of a chosen partition, funding, and the check that
every creator holds exactly the diamonds of the ledger gifts the credit cursors cover."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from giftstream.server.money import keys
from giftstream.server.money.keys import KeySpace


def user_in(space: KeySpace, partition: int, prefix: str) -> str:
    """The first id `prefix<N>` of that partition."""
    for n in range(10_000):
        if space.partition(f"{prefix}{n}") == partition:
            return f"{prefix}{n}"
    raise AssertionError(f"no {prefix}N in partition {partition}")


def stream_id(value: Any) -> tuple[int, int]:
    ms, seq = keys.text(value).split("-")
    return int(ms), int(seq)


async def cursors(redis: Any, space: KeySpace) -> dict[tuple[int, int], tuple[int, int]]:
    """(source, target) -> the last outbox id credited."""
    found = {}
    for c in range(space.partitions):
        for field, value in (await redis.hgetall(space.credit_cursors(c))).items():
            found[(int(keys.text(field).removeprefix("p")), c)] = stream_id(value)
    return found


async def ledger_gifts(
    redis: Any, space: KeySpace
) -> list[tuple[int, tuple[int, int], dict[str, Any]]]:
    """Every gift of every ledger: (source partition, id, entry data)."""
    out = []
    for s in range(space.partitions):
        for entry_id, fields in await redis.xrange(space.ledger(s)):
            data = json.loads(fields[b"data"])
            if data["kind"] == "gift":
                out.append((s, stream_id(entry_id), data))
    return out


async def check_credited_once(
    redis: Any, space: KeySpace, creators: list[str], *, complete: bool = True
) -> Counter[str]:
    """Each creator's diamonds = the sum of their ledger gifts its cursors cover, and no cursor
    is past its ledger: nothing credited that the ledger lacks, nothing twice; `complete`:
    every gift is covered, nothing left behind. Returns the covered diamonds by creator."""
    covered = await cursors(redis, space)
    gifts = await ledger_gifts(redis, space)
    expected: Counter[str] = Counter()
    last: dict[tuple[int, int], tuple[int, int]] = {}
    for s, entry_id, data in gifts:
        c = space.partition(data["creator"])
        if (s, c) in covered and entry_id <= covered[(s, c)]:
            expected[data["creator"]] += data["diamonds"]
        else:
            assert not complete, f"gift {entry_id} uncredited"
        last[(s, c)] = max(last.get((s, c), entry_id), entry_id)
    for pair, cursor in covered.items():
        assert pair in last and cursor <= last[pair], f"cursor {pair} past its ledger's gifts"
    for creator in creators:
        diamonds = await redis.hget(space.wallet(creator), "diamonds")
        assert int(diamonds or 0) == expected[creator], creator
    return expected
