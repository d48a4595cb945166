"""The messages a worker process sends the coordinator, one frozen dataclass each.

They cross a multiprocessing queue (pickled), so they hold only plain values: histograms as
`hist.encode` bytes, receipt times as `array('q')` bytes, client summaries as tuples.

    Ready    once every client has tried to connect
    Tick     every TICK_S from the start, and once at the end
    Drained  gifting over, every gift answered or given up on
    Final    after `finish`, with everything the checks need
    Failed   the worker crashed; the traceback says where
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

TICK_S = 0.5
TICK_NS = int(TICK_S * 1e9)
# The counters of `Tick.counts` (deltas since the last tick) and `Final.counts` (the run's).
COUNTERS = (
    "gifts_sent",
    "gifts_acked",
    "gifts_refused",
    "gifts_skipped_offline",
    "out_of_coins",
    "frames",
    "events",
    "gift_events",
    "reconnects",
    "duplicate_answers",
)

# (event, user, key, room, gift, count, cost) of one acknowledged gift
Ack = tuple[str, str, str, str, str, int, int]
# (user, key, cost) of a gift whose fate stayed unknown
Unresolved = tuple[str, str, int]
# One client's summary as a tuple (compact to pickle): CLIENT_FIELDS name its places.
ClientRow = tuple[Any, ...]

CLIENT_FIELDS = (
    "user",
    "room",
    "gifter",
    "slow",
    "storm",
    "status",
    "start_seq",
    "last_seq",
    "gift_events",
    "gaps",
    "missing",
    "disorder",
    "slow_outcome",
)


def client_record(row: ClientRow) -> dict[str, Any]:
    """A client summary tuple as a dict with named fields."""
    return dict(zip(CLIENT_FIELDS, row, strict=True))


@dataclass(frozen=True, slots=True)
class Ready:
    worker: int
    connected: int
    failed: int


@dataclass(frozen=True, slots=True)
class Tick:
    """What happened since the worker's last tick: counters as deltas, the gift acks and
    their latencies, and every receipt of a gift event."""

    worker: int
    t_ns: int
    counts: dict[str, int]
    ack_hist: bytes
    acks: list[tuple[str, int]]  # (event, when its gift was due)
    receipts: list[tuple[tuple[str, ...], bytes]]  # (gift event ids of a frame, its times)
    connections: int  # open now
    errors: int  # errors and closes so far
    pending: int  # gifts unanswered now


@dataclass(frozen=True, slots=True)
class Drained:
    worker: int


@dataclass(frozen=True, slots=True)
class Final:
    """The whole run of one worker: counters summed, and what the checks need."""

    worker: int
    counts: dict[str, int]
    gifts_resolved_late: int
    storm_dropped: int
    unrecovered: int
    connect_failed: int
    cpu_s: float  # this process, from go to its final
    acks: list[Ack]
    unresolved: list[Unresolved]
    clients: list[ClientRow]
    room_seqs: dict[str, dict[int, str]]
    conflicts: list[str]
    errors: dict[str, int]
    closes: dict[str, int]
    ack_hist: bytes
    lag_hist: bytes


@dataclass(frozen=True, slots=True)
class Failed:
    worker: int
    traceback: str


WorkerMessage = Ready | Tick | Drained | Final | Failed
