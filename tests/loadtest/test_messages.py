"""The worker-coordinator messages: each crosses the process boundary whole, and the
coordinator takes each by its type."""

from __future__ import annotations

import multiprocessing
import pickle
import time

import pytest

from giftstream.loadtest import hist
from giftstream.loadtest.collect import Tally
from giftstream.loadtest.messages import (
    CLIENT_FIELDS,
    Drained,
    Failed,
    Final,
    Ready,
    Tick,
    WorkerMessage,
    client_record,
)
from giftstream.loadtest.runner import RunError, _Following
from giftstream.loadtest.worker import Control

START_NS = 1_764_000_000_000_000_000
ROW = ("v1", "r", False, False, False, "intact", 0, 2, 1, 0, 0, 0, None)


def _final(worker: int) -> Final:
    return Final(
        worker=worker,
        counts={"gifts_sent": 2, "gifts_acked": 1},
        gifts_resolved_late=1,
        storm_dropped=0,
        unrecovered=0,
        connect_failed=1,
        cpu_s=0.5,
        acks=[("e1", "g", "key-0001", "r", "rose", 1, 1)],
        unresolved=[("g", "key-0002", 1)],
        clients=[ROW],
        room_seqs={"r": {1: "e1"}},
        conflicts=[],
        errors={"rate_limited": 1},
        closes={"1006": 1},
        ack_hist=hist.encode(hist.new()),
        lag_hist=hist.encode(hist.new()),
    )


MESSAGES: list[WorkerMessage] = [
    Ready(0, connected=9, failed=1),
    Tick(
        worker=1,
        t_ns=START_NS,
        counts={"frames": 3},
        ack_hist=hist.encode(hist.new()),
        acks=[("e1", START_NS)],
        receipts=[(("e1", "e2"), b"\x00" * 8)],
        connections=9,
        errors=0,
        pending=1,
    ),
    Drained(0),
    _final(1),
    Failed(0, "Traceback ..."),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_crosses_a_process_boundary_whole(message: WorkerMessage) -> None:
    assert pickle.loads(pickle.dumps(message)) == message


def test_a_client_row_names_its_fields() -> None:
    record = client_record(ROW)
    assert list(record) == list(CLIENT_FIELDS)
    assert (record["user"], record["status"], record["last_seq"]) == ("v1", "intact", 2)


def _following(workers: int) -> _Following:
    control = Control.create(multiprocessing.get_context("spawn"))
    return _Following(control, workers, Tally(START_NS), end_ns=time.time_ns() + 10**12)


def test_the_coordinator_takes_each_message_by_its_type() -> None:
    run = _following(workers=2)
    run.take(Ready(0, connected=1, failed=0))  # late: changes nothing
    run.take(MESSAGES[1])
    assert run.tally.connections == {1: 9} and run.tally.pending == {1: 1}
    run.take(Drained(0))
    assert run.phase == "draining" and run.finish_at is None  # one of two drained
    run.take(Drained(1))
    assert run.finish_at is not None  # every worker drained: finish after the quiet
    run.take(_final(0))
    run.take(_final(1))
    assert run.done == {0, 1}
    finals = run.finals
    assert finals.counts == {"gifts_sent": 4, "gifts_acked": 2}
    assert finals.extra == {
        "gifts_resolved_late": 2,
        "storm_dropped": 0,
        "unrecovered": 0,
        "connect_failed": 2,
    }
    assert finals.errors == {"rate_limited": 2} and finals.closes == {"1006": 2}
    assert len(finals.outcome.acks) == 2 and finals.outcome.unresolved == [("g", "key-0002", 1)] * 2
    assert finals.outcome.clients == [client_record(ROW)] * 2
    assert finals.outcome.room_seqs == {"r": {1: "e1"}} and not finals.outcome.conflicts


def test_a_failed_worker_stops_them_all_with_its_traceback() -> None:
    run = _following(workers=2)
    with pytest.raises(RunError, match="worker 1 failed:\nboom"):
        run.take(Failed(1, "boom"))
    assert run.control.abort.is_set()
