"""The machine around a run: the file-descriptor limit of each process, and what can be seen of
the server (its process through psutil, its counters through /metrics)."""

from __future__ import annotations

import contextlib
import resource
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # loaded on use: the worker processes import this module for the fd limit
    import aiohttp

# Server metrics the run follows, as exposed on the admin port's /metrics.
METRICS = {
    "giftstream_connections": "connections",
    "giftstream_rooms_live": "rooms_live",
    "giftstream_gifts_settled_total": "gifts_settled",
    "giftstream_broadcast_deliveries_total": "broadcast_deliveries",
    "giftstream_broadcast_frames_total": "broadcast_frames",
    "giftstream_slow_consumer_closes_total": "slow_consumer_closes",
}


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one (each viewer holds a socket); the limit
    now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def find_listener_pid(port: int) -> int | None:
    """The process listening on a local TCP port (the server under test), when visible."""
    import psutil  # type: ignore[import-untyped]

    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                return int(conn.pid) if conn.pid is not None else None
    except (psutil.AccessDenied, OSError):
        return None
    return None


@dataclass(slots=True)
class ServerSample:
    cpu_percent: float | None = None
    rss_mb: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)


class ServerWatch:
    """Samples the server once a second: CPU and RSS of its process (and its children, such as
    an embedded redis-server, reported apart), and its Prometheus counters."""

    def __init__(self, pid: int | None, admin_url: str | None) -> None:
        self.pid = pid
        self.admin_url = admin_url
        self.process: Any = None
        self.session: aiohttp.ClientSession | None = None
        self.metrics_ok = admin_url is not None
        self.first_metrics: dict[str, float] | None = None
        self.last_metrics: dict[str, float] = {}
        self.cpu_samples: list[float] = []
        self.rss_max_mb = 0.0
        if pid is not None:
            import psutil

            try:
                self.process = psutil.Process(pid)
                self.process.cpu_percent(None)  # the first call only starts the clock
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                self.process = None

    async def __aenter__(self) -> ServerWatch:
        import aiohttp

        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.session is not None:
            await self.session.close()

    async def sample(self) -> ServerSample:
        import aiohttp

        out = ServerSample()
        if self.process is not None:
            import psutil

            try:
                out.cpu_percent = round(self.process.cpu_percent(None), 1)
                out.rss_mb = round(self.process.memory_info().rss / 2**20, 1)
                self.cpu_samples.append(out.cpu_percent)
                self.rss_max_mb = max(self.rss_max_mb, out.rss_mb)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                self.process = None
        if self.metrics_ok and self.session is not None:
            try:
                async with self.session.get(f"{self.admin_url}/metrics") as response:
                    text = await response.text() if response.status == 200 else ""
                out.metrics = parse_metrics(text)
            except (aiohttp.ClientError, TimeoutError, OSError):
                out.metrics = {}
            if out.metrics:
                if self.first_metrics is None:
                    self.first_metrics = out.metrics
                self.last_metrics = out.metrics
        return out

    def summary(self) -> dict[str, Any]:
        """What the report says about the server: its process and its counters' growth."""
        out: dict[str, Any] = {"pid": self.pid}
        if self.cpu_samples:
            out["cpu_percent_mean"] = round(sum(self.cpu_samples) / len(self.cpu_samples), 1)
            out["cpu_percent_max"] = max(self.cpu_samples)
            out["rss_mb_max"] = self.rss_max_mb
        if self.first_metrics is not None:
            first, last = self.first_metrics, self.last_metrics
            out["metrics_at_end"] = last
            out["metrics_delta"] = {
                k: round(last.get(k, 0.0) - first.get(k, 0.0), 3)
                for k in last
                if k.endswith(("_settled", "_deliveries", "_frames", "_closes"))
            }
        return out


def parse_metrics(text: str) -> dict[str, float]:
    """The followed metrics from a Prometheus text exposition (unknown ones ignored)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = METRICS.get(sample.name)
            if name is not None:
                out[name] = float(sample.value)
    return out
