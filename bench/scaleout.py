"""Scenarios 7-9 of `make bench` (issue 13): what several gateways cost. Each runs gateways as
separate `giftstream serve` processes (`python -m bench.serve`) on one Redis with the same
secrets, and drives them with the Node fleet of scenario 1 (bench/fanout.py), its viewer
processes spread over the gateways.

- broker (7): one room of 1,000 viewers on 1 gateway vs spread over 3, server CPU per
  delivery (all gateway processes, psutil), ratio target <= 1.25.
- workers (8): `--workers 1` vs `--workers 2`, fan-out and settlement side by side, with the
  CPU of each worker process and of Redis (where the second core went).
- crossgw (9): send-to-screen p50 with the viewers on the senders' gateway vs on another.
- onebroker (10): one process, `--broker memory` vs `--broker redis`: CPU (gateway and
  Redis) per delivery of a fan-out step and per settled gift of a settlement step, target
  redis / memory <= 1.15.

Each is skipped, saying so in its section, when `giftstream serve` has no `--broker` (7, 9, 10)
or `--workers` (8).
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import psutil  # type: ignore[import-untyped]

from bench.fanout import LadderResult, Step, Target, cpu_each, ladder
from bench.procs import VENV_BIN, Proc, wait_port
from giftstream.server.embedded_redis import EmbeddedRedis, free_port

Log = Callable[[str], None]


@cache
def serve_help() -> str:
    return subprocess.run(
        [str(VENV_BIN / "giftstream"), "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout


def has_option(option: str) -> bool:
    """Whether this build's `giftstream serve` takes `option`."""
    return option in serve_help()


@dataclass
class Gateway:
    proc: Proc
    port: int
    admin_port: int

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def pid(self) -> int:
        return self.proc.pid


@dataclass
class Service:
    """One Redis and N gateways sharing it and one data dir (so one pair of secrets). Shaped
    like bench.procs.Giftstream where the load test needs it (url, admin_url, data_dir,
    redis, server: the first gateway)."""

    tmp: Path
    name: str
    gateways: list[Gateway] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.data_dir = self.tmp / f"{self.name}-data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.redis = EmbeddedRedis(self.tmp / f"{self.name}-redis").start()
        from giftstream.server.config import load_or_create_secret

        self.jwt_secret = load_or_create_secret(self.data_dir, "jwt_secret")
        self.webhook_secret = load_or_create_secret(self.data_dir, "webhook_secret")

    def add(self, *extra: str) -> Gateway:
        port, admin_port = free_port(), free_port()
        cmd = [
            str(VENV_BIN / "python"),
            "-m",
            "bench.serve",
            "--port",
            str(port),
            "--admin-port",
            str(admin_port),
            "--redis-url",
            self.redis.url,
            "--data-dir",
            str(self.data_dir),
            "--log-level",
            "WARNING",
            "--max-connections-per-ip",
            "0",
            *(["--broker", "redis"] if has_option("--broker") else []),
            *extra,
        ]
        proc = Proc(f"{self.name}-gw{len(self.gateways)}", cmd, self.tmp, port=port)
        wait_port(admin_port, proc.popen)
        gw = Gateway(proc, port, admin_port)
        workers = int(extra[extra.index("--workers") + 1]) if "--workers" in extra else 1
        if workers > 1:  # `--workers 1` is one process, serving itself
            wait_workers(gw, workers)
        self.gateways.append(gw)
        return gw

    @property
    def url(self) -> str:
        return self.gateways[0].url

    @property
    def admin_url(self) -> str:
        return self.gateways[0].admin_url

    @property
    def server(self) -> Proc:
        return self.gateways[0].proc

    @property
    def redis_pid(self) -> int:
        assert self.redis.process is not None
        return self.redis.process.pid

    def gateway_pids(self) -> list[int]:
        """Every gateway process, workers (children) included."""
        pids = []
        for gw in self.gateways:
            pids.append(gw.pid)
            try:
                pids += [c.pid for c in psutil.Process(gw.pid).children(recursive=True)]
            except psutil.Error:
                pass
        return pids

    def target(self, name: str, sender: Gateway, viewers: Sequence[Gateway]) -> Target:
        return Target(
            name,
            "gs",
            sender.url,
            self.gateway_pids(),
            self.jwt_secret,
            sender.admin_url,
            self.webhook_secret,
            viewer_urls=[gw.url for gw in viewers],
        )

    def stop(self) -> None:
        for gw in self.gateways:
            gw.proc.stop()
        self.redis.stop()


def wait_workers(gw: Gateway, count: int, timeout: float = 60.0) -> None:
    """Until `count` of the gateway's children listen on its port: the kernel spreads
    connections only over the sockets listening when they arrive, and a worker's CPU is
    counted only if it is there when the measurement starts."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listening = 0
        try:
            for child in psutil.Process(gw.pid).children(recursive=True):
                socks = child.net_connections(kind="tcp")
                listening += any(
                    c.status == psutil.CONN_LISTEN and c.laddr.port == gw.port for c in socks
                )
        except psutil.Error:
            pass
        if listening >= count:
            return
        time.sleep(0.1)
    raise RuntimeError(f"fewer than {count} workers listen on {gw.port} after {timeout:g} s")


async def fixed_step(
    target: Target,
    *,
    viewers: int,
    senders: int,
    gifts_per_s: float,
    step_s: float,
    tmp: Path,
    run_id: str,
    log: Log,
) -> Step:
    """One measured step at a fixed gift rate (no ladder): what a given load costs."""
    result: LadderResult = await ladder(
        target,
        viewers=viewers,
        senders=senders,
        run_id=run_id,
        tmp=tmp,
        start_dps=gifts_per_s * viewers,
        factor=1.0,
        step_s=step_s,
        warm_s=1.0,
        max_steps=1,
        viewer_procs=len(target.viewer_urls or [target.url]),
        log=log,
    )
    if not result.steps:
        raise RuntimeError(f"{target.name}: no step measured")
    return result.steps[0]


def cpu_per_delivery_us(step: Step) -> float:
    """Server CPU (all gateway processes) per room event delivered, in µs."""
    if not step.delivered_dps:
        return float("nan")
    return step.server_cpu / 100 / step.delivered_dps * 1e6


def skipped(option: str, why: str) -> list[str]:
    return [
        f"Skipped: `giftstream serve` has no `{option}` in this build ({why}). The scenario "
        "runs once the option exists; nothing was measured.",
        "",
    ]


def shares(before: dict[int, float], after: dict[int, float], wall: float) -> dict[int, float]:
    """% of a core each process used between two samples."""
    return {pid: 100 * (after[pid] - before.get(pid, 0.0)) / wall for pid in after}


def describe(service: Service, used: dict[int, float]) -> str:
    """'worker 35%, worker 33%, Redis 20%': where the CPU went (processes under 0.5% of a
    core, such as a supervisor or multiprocessing's resource tracker, left out)."""
    parts = []
    masters = {gw.pid for gw in service.gateways}
    for pid, pct in sorted(used.items(), key=lambda kv: -kv[1]):
        if pct < 0.5:
            continue
        role = (
            "Redis"
            if pid == service.redis_pid
            else ("gateway (master)" if pid in masters else "worker")
        )
        parts.append(f"{role} {pct:.0f}%")
    return ", ".join(parts)


CONNECTED = re.compile(r"\d+ viewers connected")
START_DELAY_S = 0.5  # `giftstream loadtest`: from "connected" to the start of its run


class CpuWindow:
    """The CPU each of `pids` uses during a load test's timed run, not its connecting or
    draining: from its line "N viewers connected" (`on_line`, fed the load test's output)
    to the end of its duration."""

    def __init__(self, pids: Sequence[int], duration_s: float) -> None:
        self.pids = list(pids)
        self.wall_s = START_DELAY_S + duration_s
        self.before: dict[int, float] | None = None
        self.after: dict[int, float] | None = None
        self.timer: threading.Timer | None = None

    def on_line(self, line: str, _t: float) -> None:
        if self.before is None and CONNECTED.search(line):
            self.before = cpu_each(self.pids)
            self.timer = threading.Timer(self.wall_s, self._end)
            self.timer.daemon = True
            self.timer.start()

    def _end(self) -> None:
        self.after = cpu_each(self.pids)

    def used_s(self) -> dict[int, float]:
        """CPU seconds of each process over the window (once the load test has ended)."""
        if self.timer is not None:
            self.timer.join(self.wall_s + 5)
        if self.before is None or self.after is None:
            raise RuntimeError("the load test's run was not seen from start to end")
        return {p: c - self.before.get(p, c) for p, c in self.after.items()}

    def shares(self) -> dict[int, float]:
        """% of a core each process used over the window."""
        return {p: 100 * c / self.wall_s for p, c in self.used_s().items()}
