"""The coordinator's running tally: worker ticks summed into per-second series, histograms
merged, and send-to-screen latency joined.

Send-to-screen latency joins two records made in different processes: the sender's worker
reports (event id, time the gift was due to be sent) when its `gift_ok` arrives, and every
viewer's worker reports (event id, receipt times) for the gift events it read. Both are
`time.time_ns()` readings (CLOCK_REALTIME, one clock for every process on the machine), so
receipt - send is a latency even across processes. Whichever half arrives first waits here
for the other; receipts of events never acknowledged in the timed run (re-sent after it, or
whose sender lost its line for good) stay unmatched and are counted, not guessed.
"""

from __future__ import annotations

from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]

from giftstream.loadtest import hist
from giftstream.loadtest.messages import COUNTERS, TICK_NS, Tick

NS_PER_S = 1_000_000_000


@dataclass(slots=True)
class Second:
    """Everything that happened in one second of the run, over all workers."""

    counts: Counter[str] = field(default_factory=Counter)
    ack: HdrHistogram = field(default_factory=hist.new)
    screen: HdrHistogram = field(default_factory=hist.new)
    connections: dict[int, int] = field(default_factory=dict)  # worker -> open at its tick
    server: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Tally:
    start_ns: int
    seconds: dict[int, Second] = field(default_factory=dict)
    totals: Counter[str] = field(default_factory=Counter)
    screen: HdrHistogram = field(default_factory=hist.new)
    send_ns: dict[str, int] = field(default_factory=dict)
    waiting: dict[str, list[bytes]] = field(default_factory=dict)  # receipts before their ack
    connections: dict[int, int] = field(default_factory=dict)
    errors: dict[int, int] = field(default_factory=dict)
    pending: dict[int, int] = field(default_factory=dict)
    negative_latencies: int = 0
    last_tick_ns: int = 0

    def second(self, t_ns: int) -> Second:
        index = max(0, (t_ns - self.start_ns - TICK_NS // 2) // NS_PER_S)
        found = self.seconds.get(index)
        if found is None:
            found = self.seconds[index] = Second()
        return found

    def add_tick(self, tick: Tick) -> None:
        worker = tick.worker
        sec = self.second(tick.t_ns)
        sec.counts.update(tick.counts)
        self.totals.update(tick.counts)
        sec.ack = hist.merge([tick.ack_hist], into=sec.ack)
        sec.connections[worker] = tick.connections
        self.connections[worker] = tick.connections
        self.errors[worker] = tick.errors
        self.pending[worker] = tick.pending
        self.last_tick_ns = max(self.last_tick_ns, tick.t_ns)
        for event, sent in tick.acks:
            self.send_ns[event] = sent
            waiting = self.waiting.pop(event, None)
            if waiting is not None:
                for blob in waiting:
                    self._screen(sent, blob)
        for events, blob in tick.receipts:  # the gift events of one frame, and its times
            for event in events:
                sent_ns = self.send_ns.get(event)
                if sent_ns is None:
                    self.waiting.setdefault(event, []).append(blob)
                else:
                    self._screen(sent_ns, blob)

    def add_server(self, t_ns: int, figures: dict[str, Any]) -> None:
        """A server sample (CPU, RSS, its own counters) into the second it was taken in."""
        index = max(0, (t_ns - self.start_ns) // NS_PER_S)
        sec = self.seconds.get(index)
        if sec is None:
            sec = self.seconds[index] = Second()
        sec.server.update(figures)

    def _screen(self, sent_ns: int, blob: bytes) -> None:
        """Record receipt - send for each receipt of one event, by the second it arrived."""
        times = array("q")
        times.frombytes(blob)
        by_second: dict[int, Counter[int]] = {}
        for received in times:
            latency_us = (received - sent_ns) // 1000
            if latency_us < 0:
                self.negative_latencies += 1
                latency_us = 0
            index = max(0, (received - self.start_ns) // NS_PER_S)
            bucket = by_second.get(index)
            if bucket is None:
                bucket = by_second[index] = Counter()
            bucket[latency_us] += 1
        for index, values in by_second.items():
            sec = self.seconds.get(index)
            if sec is None:
                sec = self.seconds[index] = Second()
            hist.record_many(sec.screen, values)
            hist.record_many(self.screen, values)

    @property
    def unmatched_receipts(self) -> int:
        return sum(len(blob) // 8 for blobs in self.waiting.values() for blob in blobs)

    def now_view(self) -> dict[str, Any]:
        """The live display's figures: the last complete second's rates and latencies."""
        complete = [
            i
            for i in self.seconds
            if (i + 1) * NS_PER_S + TICK_NS // 2 <= (self.last_tick_ns - self.start_ns)
        ]
        sec = self.seconds[max(complete)] if complete else Second()
        return {
            "connections": sum(self.connections.values()),
            "gifts_sent": self.totals["gifts_sent"],
            "gifts_acked": self.totals["gifts_acked"],
            "acked_per_s": sec.counts["gifts_acked"],
            "events_per_s": sec.counts["events"],
            "frames_per_s": sec.counts["frames"],
            "ack_p99_ms": _p(sec.ack, 99),
            "screen_p99_ms": _p(sec.screen, 99),
            "errors": sum(self.errors.values()),
            "pending": sum(self.pending.values()),
        }

    def series(self) -> list[dict[str, Any]]:
        """One row per second of the run: rates, latency percentiles, connections, server."""
        rows = []
        for index in sorted(self.seconds):
            sec = self.seconds[index]
            row: dict[str, Any] = {"t": index + 1}
            row.update({name: sec.counts[name] for name in COUNTERS})
            row.update(
                {
                    "ack_p50_ms": _p(sec.ack, 50),
                    "ack_p99_ms": _p(sec.ack, 99),
                    "ack_max_ms": _p(sec.ack, 100),
                    "screen_p50_ms": _p(sec.screen, 50),
                    "screen_p99_ms": _p(sec.screen, 99),
                    "screen_max_ms": _p(sec.screen, 100),
                    "connections": sum(sec.connections.values()) if sec.connections else None,
                }
            )
            row.update(sec.server)
            rows.append(row)
        return rows


def _p(h: HdrHistogram, percentile: float) -> float | None:
    if not h.get_total_count():
        return None
    value = h.get_max_value() if percentile >= 100 else h.get_value_at_percentile(percentile)
    return round(int(value) / 1000, 3)
