"""What `giftstream relay` and `giftstream consume` share as processes: a stop event set by
SIGTERM or SIGINT, the Prometheus metrics port, their lag gauges' refresh, and URLs fit for
a log line."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit

from prometheus_client import CollectorRegistry, start_http_server
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

LAG_REFRESH_S = 1.0  # a worker's lag gauges are set at least this often: idle, busy or retrying
SECRET_QUERY = frozenset({"password", "pass", "token", "auth_token", "nkey", "jwt"})
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


def redact_url(url: str) -> str:
    """The URL with its secrets replaced by ***: a password (redis://:***@host:6379/0), a NATS
    token in the user part (nats://***@host:4222) and password-like query parameters. A
    comma-separated list of URLs (NATS servers) is redacted URL by URL."""
    parts_of_list = url.split(",")
    if len(parts_of_list) > 1 and all("://" in part for part in parts_of_list):
        return ",".join(redact_url(part) for part in parts_of_list)
    try:
        parts = urlsplit(url)
    except ValueError:
        return "***"  # unparseable: it may hold anything
    netloc = parts.netloc
    user, at, host = netloc.rpartition("@")
    if at:
        name, colon, _ = user.partition(":")
        if colon:
            user = f"{name}:***"
        elif parts.scheme.startswith("nats") or parts.scheme in ("tls", "ws", "wss"):
            user = "***"  # nats://TOKEN@host: the user part alone is the token
        netloc = f"{user}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k.lower() in SECRET_QUERY for k, _ in pairs):
            query = urlencode(
                [(k, "***" if k.lower() in SECRET_QUERY else v) for k, v in pairs], safe="*"
            )
    return parts._replace(netloc=netloc, query=query).geturl()


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
