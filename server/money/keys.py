"""The Redis key layout of the money path, in one place, with how long each key is kept.

    giftstream:wallet:U              hash: coins, diamonds, debt; daily_limit, weekly_limit
                                     (absent: no limit); spent_day, spent_day_coins and
                                     spent_week, spent_week_coins (U's spend on gifts in the
                                     UTC day / ISO week stamped, as days since the epoch);
                                     payout_day, payout_day_diamonds (paid out that UTC day)
    giftstream:held:C                hash: C's diamonds still on hold, by the epoch day they
                                     become payable (due ones are dropped as they are met)
    giftstream:gift_key:U:IK         hash: a settled gift's params and first result (24 h)
    giftstream:combo:U/R             hash: U's current streak in room R (gift, combo, at)
    giftstream:receipt:RC            hash: a purchase, later its refund (kept for good)
    giftstream:payout:IK             hash: a payout and its result (kept for good)
    giftstream:ledger                stream: one entry per movement, field `data` (configurable)

User, room and gift ids are 1-64 characters of [A-Za-z0-9_.:-] and idempotency keys have
no ':' (protocol/rules.py), so `giftstream:wallet:*` matches wallets only and the last part
of each key reads back unambiguously; the combo key joins two ids that may both hold ':'
with '/'.
`giftstream:room:*` and `giftstream:rooms:*` belong to the realtime path: hub.py keeps
each room's record and the live set, broker.py (`room_key`) the seq bound in the record.

What is read back comes as bytes (no client here decodes replies, so binary stays binary);
`text` reads a key, id or field as str.
"""

from __future__ import annotations

import functools
import time
from typing import Any

PREFIX = "giftstream:"
LEDGER = PREFIX + "ledger"
WALLET_PREFIX = PREFIX + "wallet:"
WALLET_MATCH = WALLET_PREFIX + "*"

GIFT_KEY_TTL_MS = 24 * 3600 * 1000  # the contract answers a gift key for at least 24 h
COMBO_GAP_MS = 5000  # a streak grows while gaps stay under this
COMBO_TTL_MS = 60_000  # only garbage collection: the gap is judged by the gift's time


def text(value: Any) -> str:
    """A Redis reply's key, id or field as str."""
    return value.decode() if isinstance(value, bytes) else str(value)


def wallet(user: str) -> str:
    return WALLET_PREFIX + user


def user_of_wallet(key: str) -> str:
    return key.removeprefix(WALLET_PREFIX)


def gift_key(sender: str, key: str) -> str:
    """Scoped to the sender: two users' equal keys never collide."""
    return f"{PREFIX}gift_key:{sender}:{key}"


def held(creator: str) -> str:
    return f"{PREFIX}held:{creator}"


def combo(sender: str, room: str) -> str:
    return f"{PREFIX}combo:{sender}/{room}"


def receipt(receipt_id: str) -> str:
    return f"{PREFIX}receipt:{receipt_id}"


def payout(key: str) -> str:
    """Payout keys are global, not per creator: one key never pays out twice."""
    return f"{PREFIX}payout:{key}"


def utc_day(now_ms: int) -> str:
    """YYYY-MM-DD in UTC. Asked once per gift, so the last few days' names are kept."""
    return _day_name(now_ms // DAY_MS)


DAY_MS = 86_400_000


def epoch_day(now_ms: int) -> int:
    """The UTC day of now_ms as days since 1970-01-01, as the scripts count days."""
    return now_ms // DAY_MS


def iso_week(day: int) -> int:
    """The ISO week (Monday to Sunday, UTC) of an epoch day, as its Monday's epoch day, as the
    scripts count weeks (1970-01-01 was a Thursday)."""
    return day - (day + 3) % 7


@functools.lru_cache(maxsize=4)
def _day_name(day: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(day * 86_400))
