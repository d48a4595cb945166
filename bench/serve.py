"""`giftstream serve` for the fan-out benchmark, with one change: the per-connection gift and
message rate limits (server.config.Limits: 20 gifts/s, 30 messages/s per connection, an
anti-abuse policy) are raised, so that 20 senders can offer a room more than 400 gifts/s and
the fan-out, not the limiter, is what the ladder finds. Everything else is `serve` as is.

    .venv/bin/python -m bench.serve --port P --admin-port A --redis-url URL --data-dir DIR
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any

from server import cli
from server.config import Limits, Settings, build_settings

RATE = float(os.environ.get("BENCH_CONN_GIFTS_PER_S", "5000"))


def _build(values: Any, limits: Limits | None = None) -> Settings:
    raised = dataclasses.replace(
        limits or Limits(),
        gifts_per_s=RATE, gifts_burst=int(RATE * 2),
        messages_per_s=RATE, messages_burst=int(RATE * 2),
    )  # fmt: skip
    return build_settings(values, raised)


if __name__ == "__main__":
    cli.build_settings = _build  # type: ignore[assignment]  # _serve calls it by this name
    sys.exit(cli.main(["serve", *sys.argv[1:]]))
