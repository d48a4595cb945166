# ruff: noqa: RUF001  (the multiplication signs of the document, on purpose)
"""The document `make bench` writes: the table of results that opens it, built from the
results without running a benchmark, and the layout that keeps what a subset run did not
measure."""

from __future__ import annotations

import pytest

from bench import run
from bench.fanout import LadderResult, Step
from bench.procs import ROOT
from bench.run import (
    SUMMARY_HEAD,
    Row,
    Section,
    fanout_tables,
    render_doc,
    summary_lines,
)


def ladder(name: str, viewers: int, *delivered: float, ok: bool = True) -> LadderResult:
    steps = [
        Step(d, d / viewers, d, 30.0, 80.0 if ok else 150.0, 120.0, 0, 50.0, 60.0, {}, ok)
        for d in delivered
    ]
    return LadderResult(name, viewers, steps)


def test_fanout_rows_give_each_peer_its_figure_ratio_and_target(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(run, "FANOUT_VIEWERS", [1000])
    monkeypatch.setattr(run, "PEERS", ["ws", "sio", "psio"])
    names = ["giftstream", "Node ws", "Node socket.io", "python-socketio"]
    results = {
        ("giftstream", 1000): [ladder("giftstream", 1000, 1_000_000, 2_000_000)],
        ("Node ws", 1000): [ladder("Node ws", 1000, 4_000_000)],
        ("Node socket.io", 1000): [ladder("Node socket.io", 1000, 1_000_000)],
        ("python-socketio", 1000): [ladder("python-socketio", 1000, 10_000, ok=False)],
    }

    body, summary = fanout_tables(results, names, "measured now")

    assert [r.cells() for r in summary] == [
        [
            "1. Fan-out, 1,000 viewers",
            "deliveries/s at send-to-screen p99 ≤ 100 ms",
            "2,000,000",
            peer,
            theirs,
            ratio,
            target,
            met,
        ]
        for peer, theirs, ratio, target, met in [
            ("Node ws", "4,000,000", "0.50×", "≥ 1×", "no"),
            ("Node socket.io", "1,000,000", "2.00×", "≥ 2×", "yes"),
            ("python-socketio", "0", "∞", "≥ 10×", "yes"),
        ]
    ]
    assert "| giftstream / Node ws | 0.50× | ≥ 1× | no | 0.50× |" in body
    assert summary_lines(summary)[1:] == [  # the scenario and giftstream's figure, once
        "|  |  |  | Node socket.io | 1,000,000 | 2.00× | ≥ 2× | yes |",
        "|  |  |  | python-socketio | 0 | ∞ | ≥ 10× | yes |",
    ]


OLD = f"""# Benchmarks

Medians of the runs.

{SUMMARY_HEAD}
| --- | --- | --- | --- | --- | --- | --- | --- |
| 1. Fan-out, 1,000 viewers | deliveries/s | 1 | Node ws | 2 | 0.50× | ≥ 1× | no |
|  |  |  | Node socket.io | 1 | 1.00× | ≥ 2× | no |
| 2. Settlement | gifts settled/s | 3,069 | redis-benchmark | 16,613 | 18.5 % | ≥ 35 % | no |
|  | money check | PASS |  |  |  | PASS | yes |

## How to read this

Kept by hand.

## The machine and the run

| | |
| --- | --- |
| cores | 2 |
| last run | before |

## 1. Fan-out: old

Old fan-out.

## 2. Settlement: kept

Old settlement.
"""


def test_a_subset_run_replaces_its_rows_and_section_and_keeps_the_rest() -> None:
    fanout = Section(
        "1. Fan-out: new",
        ["New fan-out.", ""],
        [Row("1. Fan-out, 5,000 viewers", "deliveries/s", "7", "Node ws", "0", "∞", "≥ 1×", "yes")],
    )

    doc = render_doc(OLD, [fanout], {"cores": "2"}, "now")

    table = doc.index(SUMMARY_HEAD)
    assert doc.startswith("# Benchmarks\n")
    assert "## " not in doc[:table]  # the table of results comes before any section
    positions = [
        doc.index(s)
        for s in (
            "| 1. Fan-out, 5,000 viewers | deliveries/s | 7 |",
            "| 2. Settlement | gifts settled/s | 3,069 |",
            "|  | money check | PASS |",
            "## How to read this\n\nKept by hand.\n",
            "| last run | now |",
            "## 1. Fan-out: new\n\nNew fan-out.",
            "## 2. Settlement: kept\n\nOld settlement.",
        )
    ]
    assert table < positions[0] and positions == sorted(positions)
    assert "1,000 viewers" not in doc and "Node socket.io" not in doc and "Old fan-out" not in doc
    assert render_doc(doc, [], {"cores": "2"}, "now") == doc  # a run of nothing changes nothing


def test_a_section_written_by_hand_is_kept_after_the_numbered_ones() -> None:
    by_hand = "## Cluster clients: by hand\n\nRun on demand.\n"
    fanout = Section("1. Fan-out: new", ["New fan-out.", ""], [])

    doc = render_doc(OLD + "\n" + by_hand, [fanout], {"cores": "2"}, "now")

    assert doc.endswith("## 2. Settlement: kept\n\nOld settlement.\n\n" + by_hand)
    assert "[Cluster clients](#cluster-clients-by-hand)" in doc
    assert render_doc(doc, [], {"cores": "2"}, "now") == doc


def test_the_committed_document_is_in_the_generators_layout() -> None:
    """docs/benchmarks.md rendered again from itself, with no new section, is unchanged: the
    next `make bench` keeps its layout, and only its figures move."""
    doc = (ROOT / "docs" / "benchmarks.md").read_text()
    machine_table = doc.split("## The machine and the run\n\n| | |\n| --- | --- |\n", 1)[1]
    machine: dict[str, str] = {}
    for line in machine_table.split("\n\n", 1)[0].splitlines():
        key, value = line.removeprefix("| ").removesuffix(" |").split(" | ", 1)
        machine[key] = value
    last_run = machine.pop("last run")

    assert doc.index(SUMMARY_HEAD) < doc.index("\n## ")
    assert render_doc(doc, [], machine, last_run) == doc
