"""The CPU window of the settlement steps (bench/scaleout.py): it measures the load test's
timed run only, from its line saying the viewers are connected, and says so when it never
saw that run, rather than report a figure for nothing."""

from __future__ import annotations

import os

import pytest

from bench.scaleout import CpuWindow


def busy(n: int) -> int:
    return sum(i * i for i in range(n))


def test_the_window_opens_at_the_connected_line_and_counts_only_after_it() -> None:
    window = CpuWindow([os.getpid()], duration_s=0.0)
    busy(2_000_000)  # before the line: not counted
    window.on_line("connecting 200 viewers ...\n", 0.0)
    assert window.before is None
    window.on_line("200 viewers connected\n", 0.0)
    first = window.before
    window.on_line("200 viewers connected\n", 0.0)  # a second such line moves nothing
    assert window.before is first
    used = window.used_s()
    assert set(used) == {os.getpid()}
    assert 0.0 <= used[os.getpid()] < sum(os.times()[:2])


def test_a_load_test_whose_run_was_never_seen_gives_no_figure() -> None:
    window = CpuWindow([os.getpid()], duration_s=0.0)
    window.on_line("the load test failed before connecting\n", 0.0)
    with pytest.raises(RuntimeError, match="not seen"):
        window.used_s()
