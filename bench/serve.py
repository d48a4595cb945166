"""`giftstream serve` for the benchmarks, with the per-connection rate limits raised
(`--gifts-per-s`, `--user-gifts-per-s`, `--messages-per-s`: 20, 20 and 30 by default, an
anti-abuse policy) so that 20 senders can offer a room more than 400 gifts/s and 500 closed-loop
gifters are not capped: the fan-out and the settlement, not the limiter, are what the
benchmarks find. Everything else is `serve` as is; flags given on the command line win.

    .venv/bin/python -m bench.serve --port P --admin-port A --redis-url URL --data-dir DIR
"""

from __future__ import annotations

import os
import sys

from giftstream.server import cli

RATE = os.environ.get("BENCH_CONN_GIFTS_PER_S", "5000")

if __name__ == "__main__":
    os.environ.setdefault("GIFTSTREAM_GIFTS_PER_S", RATE)
    os.environ.setdefault("GIFTSTREAM_USER_GIFTS_PER_S", RATE)
    os.environ.setdefault("GIFTSTREAM_MESSAGES_PER_S", RATE)
    sys.exit(cli.main(["serve", *sys.argv[1:]]))
