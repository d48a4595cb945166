# ruff: noqa: RUF001, RUF002  (the en dash of a range on purpose)
"""How a figure of several runs is written in docs/benchmarks.md: the median, then the spread
(min–max) when there was more than one run. Shared by bench/run.py and bench/cluster.py."""

from __future__ import annotations

import statistics


def med(values: list[float]) -> tuple[float, float, float]:
    vals = [v for v in values if v == v]  # drop NaN
    if not vals:
        return float("nan"), float("nan"), float("nan")
    return statistics.median(vals), min(vals), max(vals)


def fmt(v: float, digits: int = 0) -> str:
    if v != v:
        return "n/a"
    if v == float("inf"):
        return "∞"
    return f"{v:,.{digits}f}"


def mmm(values: list[float], digits: int = 0) -> str:
    m, lo, hi = med(values)
    if len([v for v in values if v == v]) <= 1:
        return fmt(m, digits)
    return f"**{fmt(m, digits)}** ({fmt(lo, digits)}–{fmt(hi, digits)})"
