"""What `giftstream relay` and `giftstream consume` share as processes: a stop event set by
SIGTERM or SIGINT, the Prometheus metrics port and their lag gauges' refresh."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, start_http_server
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

LAG_REFRESH_S = 1.0  # a worker's lag gauges are set at least this often: idle, busy or retrying
T = TypeVar("T")


class LagRefresh(Generic[T]):
    """Sets a worker's lag gauges from one Redis read, at most once every `every_s` (a worker
    passes 0 when idle, LAG_REFRESH_S while busy, so a falling-behind shows before the work
    runs out). Redis being away leaves the gauges as they were: a gauge is not worth failing
    the worker's pass for."""

    def __init__(self, read: Callable[[], Awaitable[T]], show: Callable[[T], None]) -> None:
        self._read = read
        self._show = show
        self._set_at = float("-inf")

    async def __call__(self, every_s: float) -> None:
        now = time.monotonic()
        if now - self._set_at < every_s:
            return
        try:
            lag = await self._read()
        except (RedisError, OSError):
            return
        self._set_at = now
        self._show(lag)


def start_worker(registry: CollectorRegistry, metrics_port: int | None) -> asyncio.Event | None:
    """Serve `registry` on 127.0.0.1:metrics_port (if given) and return the stop event that
    SIGTERM or SIGINT sets (the worker finishes its step, then exits 0). None, logged, when
    the port cannot be had: the caller exits 2."""
    if metrics_port is not None:
        try:
            start_http_server(metrics_port, addr="127.0.0.1", registry=registry)
        except OSError as exc:
            log.error("cannot serve metrics on 127.0.0.1:%d: %s", metrics_port, exc)
            return None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop
