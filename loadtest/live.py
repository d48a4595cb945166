"""The live progress display: a rich table redrawn twice a second on a terminal, or a plain
line every few seconds when the output is a file or a pipe (CI logs stay short)."""

from __future__ import annotations

import time
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from giftstream.loadtest.system import ServerSample

REFRESH_S = 0.5
PLAIN_EVERY_S = 5.0


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


class Progress:
    def __init__(self, console: Console, duration: float) -> None:
        self.console = console
        self.duration = duration
        self.live: Live | None = None
        self.last_draw = 0.0
        self.last_plain = 0.0

    def __enter__(self) -> Progress:
        if self.console.is_terminal:
            self.live = Live(
                self._table("starting", 0.0, {}, ServerSample()),
                console=self.console,
                auto_refresh=False,
                transient=False,
            )
            self.live.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.live is not None:
            self.live.__exit__(exc_type, exc, tb)

    def update(
        self, phase: str, elapsed: float, view: dict[str, Any], server: ServerSample
    ) -> None:
        now = time.monotonic()
        if self.live is not None:
            if now - self.last_draw >= REFRESH_S:
                self.last_draw = now
                self.live.update(self._table(phase, elapsed, view, server), refresh=True)
        elif now - self.last_plain >= PLAIN_EVERY_S and view:
            self.last_plain = now
            self.console.print(
                f"{elapsed:6.1f}s {phase:9} conns {view['connections']:>6}  "
                f"gifts/s {view['acked_per_s']:>6}  deliveries/s {view['events_per_s']:>8}  "
                f"ack p99 {_ms(view['ack_p99_ms'])}  screen p99 {_ms(view['screen_p99_ms'])}  "
                f"errors {view['errors']}",
                highlight=False,
            )

    def _table(
        self, phase: str, elapsed: float, view: dict[str, Any], server: ServerSample
    ) -> Table:
        table = Table(title="giftstream loadtest", title_justify="left")
        columns = (
            "elapsed",
            "phase",
            "connections",
            "gifts/s",
            "deliveries/s",
            "frames/s",
            "ack p99",
            "screen p99",
            "errors",
            "in flight",
            "server CPU",
            "server RSS",
        )
        for name in columns:
            table.add_column(name, justify="right")
        if view:
            table.add_row(
                f"{min(elapsed, 9999):.1f}/{self.duration:g} s",
                phase,
                str(view["connections"]),
                str(view["acked_per_s"]),
                str(view["events_per_s"]),
                str(view["frames_per_s"]),
                _ms(view["ack_p99_ms"]),
                _ms(view["screen_p99_ms"]),
                str(view["errors"]),
                str(view["pending"]),
                "-" if server.cpu_percent is None else f"{server.cpu_percent:.0f}%",
                "-" if server.rss_mb is None else f"{server.rss_mb:.0f} MB",
            )
        return table
