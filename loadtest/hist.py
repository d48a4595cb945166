"""HDR histograms of latencies in microseconds: made alike everywhere so that workers can
encode theirs, send them to the coordinator, and have them merged exactly.

Values above the highest trackable one are clamped to it (and counted as such), never
silently dropped: a latency past a minute still shows in p99 and max.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]

LOWEST_US = 1
HIGHEST_US = 120_000_000  # two minutes
SIGNIFICANT_FIGURES = 3
PERCENTILES = (50.0, 95.0, 99.0, 99.9)


def new() -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_FIGURES)


def record(hist: HdrHistogram, value_us: int, count: int = 1) -> None:
    hist.record_value(min(max(value_us, 0), HIGHEST_US), count)


def record_many(hist: HdrHistogram, values_us: Counter[int]) -> None:
    """Record a batch of values given as value -> how many (one call per distinct value)."""
    for value, count in values_us.items():
        record(hist, value, count)


def encode(hist: HdrHistogram) -> bytes:
    """A compact, portable form (HdrHistogram's V2 base64) to send between processes."""
    return bytes(hist.encode())


def merge(encoded: Iterable[bytes], into: HdrHistogram | None = None) -> HdrHistogram:
    """One histogram holding every value of the encoded ones."""
    total = into if into is not None else new()
    for blob in encoded:
        other = HdrHistogram.decode(blob)
        if other.get_total_count():
            total.add(other)
    return total


def summary_ms(hist: HdrHistogram) -> dict[str, Any]:
    """count, mean, p50/p95/p99/p99.9 and max in milliseconds (None when nothing was
    recorded)."""
    count = hist.get_total_count()
    out: dict[str, Any] = {"count": count}
    if not count:
        out.update({"mean": None, "max": None, **{_label(p): None for p in PERCENTILES}})
        return out
    out["mean"] = round(hist.get_mean_value() / 1000, 3)
    for p in PERCENTILES:
        out[_label(p)] = round(hist.get_value_at_percentile(p) / 1000, 3)
    out["max"] = round(hist.get_max_value() / 1000, 3)
    return out


def _label(p: float) -> str:
    return "p" + (f"{p:g}".replace(".", ""))
