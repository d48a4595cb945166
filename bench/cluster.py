# ruff: noqa: E501, RUF001  (markdown tables: long rows, typographic signs on purpose)
"""Scenario 11 of `make bench` (issue 14): gifts settled on one Redis against a 3-shard Redis
Cluster (3 masters + 3 replicas, tests/cluster.py's RedisClusterProcesses) on this machine,
side by side, with the CPU per gift of each part. Runs when named: BENCH_SCENARIOS=cluster.

Every setup runs N closed-loop senders through the real Wallet in a process of its own
(bench/cluster_settle.py `gifts`: the gateway's money path without sockets), and on the cluster
one crediting runner in another (`credit`, rounds back to back as a gateway's are when every
gift pokes it). CPU is each process's user + system time (psutil) over the senders' timed
window; per gift = that / gifts settled in the window.

- one Redis, the Wallet's ScriptBatcher (as `giftstream serve`)
- one Redis, the same scripts as plain redis-py EVALSHA calls over a connection pool: what the
  batcher wins
- one Redis, `appendfsync always`: durable acks on a Redis before 7.2 (no WAITAOF)
- cluster, with the crediting runner: gifts/s, each shard's master and replica, the credit
  lag (gift ts -> credit written)
- cluster, `--durable-ack` (a WAIT for the shard's replica before each gift's answer)
- cluster, gifts alone, then the crediting runner draining what they left: the gift script's
  Redis CPU without crediting, and crediting's per gift at full batches (the paper model's
  figures, docs/scaling.md)
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psutil  # type: ignore[import-untyped]
import redis

from bench.figures import fmt, med, mmm
from giftstream.server.embedded_redis import EmbeddedRedis
from giftstream.server.money.keys import DEFAULT_PARTITIONS
from tests.cluster import RedisClusterProcesses

Log = Callable[[str], None]
SummaryRow = tuple[str, str, str, str, str, str, str, str]  # bench.run.Row's cells
WORKER = [sys.executable, "-m", "bench.cluster_settle"]
NODE_TIMEOUT_MS = 30_000  # a node starved of CPU by the bench is not failed over mid-run
CATCH_UP_S = 120.0  # the crediting runner must credit every gift within this after the senders


@dataclass(frozen=True)
class Setup:
    key: str
    title: str
    cluster: bool = False
    plain: bool = False
    durable: bool = False
    appendfsync: str = "everysec"
    crediting: bool = True  # cluster: a crediting runner alongside (else drained afterwards)
    alone: bool = False  # one sender: the latency of a gift with no queue in front of it


SETUPS = (
    Setup("one", "one Redis, ScriptBatcher (as served)"),
    Setup("plain", "one Redis, plain redis-py EVALSHA over a pool", plain=True),
    Setup(
        "always",
        "one Redis, `appendfsync always` (durable ack on Redis 7.0)",
        durable=True,
        appendfsync="always",
    ),
    Setup("cluster", "3-shard cluster, crediting alongside", cluster=True),
    Setup("durable", "3-shard cluster, `--durable-ack` (WAIT 1)", cluster=True, durable=True),
    Setup(
        "split",
        "3-shard cluster, gifts alone (crediting afterwards)",
        cluster=True,
        crediting=False,
    ),
    Setup("one1", "one Redis, ScriptBatcher, 1 sender", alone=True),
    Setup(
        "always1",
        "one Redis, `appendfsync always`, 1 sender",
        durable=True,
        appendfsync="always",
        alone=True,
    ),
    Setup("cluster1", "3-shard cluster, 1 sender", cluster=True, alone=True),
    Setup(
        "durable1",
        "3-shard cluster, `--durable-ack`, 1 sender",
        cluster=True,
        durable=True,
        alone=True,
    ),
)


@dataclass
class Outcome:
    """One setup, one run."""

    gifts_per_s: float
    p50_ms: float
    p99_ms: float
    wallet_us: float  # the senders' process, per gift
    masters_us: list[float]  # each master redis-server, per gift (one Redis: one entry)
    replicas_us: list[float] = field(default_factory=list)  # each master's replica, same order
    crediting_us: float = float("nan")  # the crediting runner's process, per gift
    lag_p50_ms: float = float("nan")
    lag_p99_ms: float = float("nan")
    # `split` only: the crediting runner draining the backlog afterwards, per gift credited
    drain_masters_us: float = float("nan")
    drain_replicas_us: float = float("nan")
    drain_crediting_us: float = float("nan")

    @property
    def redis_us(self) -> float:
        return sum(self.masters_us)

    @property
    def total_us(self) -> float:
        credit = 0.0 if self.crediting_us != self.crediting_us else self.crediting_us
        return self.wallet_us + self.redis_us + sum(self.replicas_us) + credit


def cpu_s(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def snapshot(pids: list[int]) -> list[float]:
    return [cpu_s(p) for p in pids]


def used(before: list[float], after: list[float]) -> list[float]:
    return [a - b for a, b in zip(after, before, strict=True)]


class Crediter:
    """The crediting worker process: its stdout read by a thread (the last count it printed,
    then its result)."""

    def __init__(self, url: str, tmp: Path) -> None:
        self.log = (tmp / "cluster-credit.log").open("ab")
        self.popen = subprocess.Popen(
            [*WORKER, "credit", "--url", url],
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        self.credited = 0
        self.result: dict[str, Any] = {}
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            if line.startswith("credited "):
                self.credited = int(line.split()[1])
            elif line.startswith("result "):
                self.result = json.loads(line[7:])

    def wait_for(self, gifts: int, timeout: float = CATCH_UP_S) -> None:
        deadline = time.monotonic() + timeout
        while self.credited < gifts:
            if time.monotonic() > deadline or self.popen.poll() is not None:
                raise RuntimeError(f"crediting: {self.credited} of {gifts} gifts credited")
            time.sleep(0.05)

    def stop(self) -> dict[str, Any]:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._reader.join(10)
        self.log.close()
        return self.result


def run_gifts(
    setup: Setup, url: str, pids: list[int], senders: int, seconds: float, tmp: Path
) -> tuple[dict[str, Any], list[float]]:
    """The senders' process from start to result; returns its result and the CPU seconds each
    of `pids` used between its `go` and `stop` lines (its timed window)."""
    senders = 1 if setup.alone else senders
    cmd = [*WORKER, "gifts", "--url", url, "--senders", str(senders), "--seconds", str(seconds)]
    cmd += [
        flag
        for flag, on in (
            ("--cluster", setup.cluster),
            ("--plain", setup.plain),
            ("--durable", setup.durable),
        )
        if on
    ]
    with (tmp / f"cluster-{setup.key}.log").open("ab") as err:
        popen = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        out: IO[str] = popen.stdout  # type: ignore[assignment]
        before: list[float] = []
        window: list[float] = []
        result: dict[str, Any] = {}
        for line in out:
            if line.startswith("go"):
                before = snapshot(pids)
            elif line.startswith("stop"):
                window = used(before, snapshot(pids))
            elif line.startswith("result "):
                result = json.loads(line[7:])
        if popen.wait(60) != 0 or not result or not window:
            raise RuntimeError(f"{setup.key}: the senders' process failed (see {err.name})")
    return result, window


def per_gift_us(seconds: float, gifts: int) -> float:
    return seconds / gifts * 1e6 if gifts else float("nan")


class Shards:
    """The cluster, started once for the scenario: its masters and, in the same order, the
    replica of each."""

    def __init__(self, tmp: Path) -> None:
        self.procs = RedisClusterProcesses(tmp / "cluster").start()
        for node in self.procs.nodes:  # starved of CPU by the bench, a node must not be failed
            with node.client() as c:
                c.config_set("cluster-node-timeout", NODE_TIMEOUT_MS)
        self.masters = self.procs.masters()
        self.replicas = [self.procs.replicas_of(m)[0] for m in self.masters]

    @property
    def url(self) -> str:
        return self.procs.url

    def pids(self) -> list[int]:
        nodes = [*self.masters, *self.replicas]
        return [n.process.pid for n in nodes if n.process is not None]

    def flush(self) -> None:
        self.procs.flush()
        self.procs.wait_ok()
        for m in self.masters:  # the replicas hold the flush too before the next setup
            with m.client() as c:
                c.wait(1, 10_000)

    def stop(self) -> None:
        self.procs.stop()


def run_setup(
    setup: Setup, shards: Shards | None, senders: int, seconds: float, tmp: Path
) -> Outcome:
    if not setup.cluster:
        # a fresh data dir each run: an AOF of the last run would answer its gift keys as replays
        data = tmp / f"cluster-{setup.key}-{time.monotonic_ns()}-redis"
        r = EmbeddedRedis(data, appendfsync=setup.appendfsync).start()
        try:
            assert r.process is not None
            res, window = run_gifts(setup, r.url, [r.process.pid], senders, seconds, tmp)
        finally:
            r.stop()
        n = res["settled"]
        return Outcome(
            res["gifts_per_s"],
            res["p50_ms"],
            res["p99_ms"],
            per_gift_us(res["cpu_s"], n),
            [per_gift_us(window[0], n)],
        )
    assert shards is not None
    shards.flush()
    node_pids = shards.pids()
    k = len(shards.masters)
    crediter = Crediter(shards.url, tmp) if setup.crediting else None
    try:
        pids = node_pids + ([crediter.pid] if crediter else [])
        res, window = run_gifts(setup, shards.url, pids, senders, seconds, tmp)
        n = res["settled"]
        out = Outcome(
            res["gifts_per_s"],
            res["p50_ms"],
            res["p99_ms"],
            per_gift_us(res["cpu_s"], n),
            [per_gift_us(s, n) for s in window[:k]],
            [per_gift_us(s, n) for s in window[k : 2 * k]],
        )
        if crediter is None:  # drain what the gifts left, with the nodes' CPU over it
            before = snapshot(node_pids)
            crediter = Crediter(shards.url, tmp)
            crediter.wait_for(res["total"])
            drained = used(before, snapshot(node_pids))
            credited = crediter.stop()
            total = res["total"]
            out.drain_masters_us = per_gift_us(sum(drained[:k]), total)
            out.drain_replicas_us = per_gift_us(sum(drained[k:]), total)
            out.drain_crediting_us = per_gift_us(credited["cpu_s"], total)
            return out  # its credit lag is the drain's, not a live one
        else:
            out.crediting_us = per_gift_us(window[-1], n)
            crediter.wait_for(res["total"])
            credited = crediter.stop()
        out.lag_p50_ms, out.lag_p99_ms = credited["lag_p50_ms"], credited["lag_p99_ms"]
        return out
    finally:
        if crediter is not None:
            crediter.stop()


def measure(
    tmp: Path, runs: int, senders: int, seconds: float, log: Log
) -> dict[str, list[Outcome]]:
    """Every setup `runs` times, interleaved (the machine's noise hits each alike)."""
    results: dict[str, list[Outcome]] = {s.key: [] for s in SETUPS}
    shards = Shards(tmp)
    try:
        log(
            f"[cluster] masters {[m.address for m in shards.masters]}, replicas {[r.address for r in shards.replicas]}"
        )
        for run in range(runs):
            for setup in SETUPS:
                try:
                    o = run_setup(setup, shards, senders, seconds, tmp)
                except (RuntimeError, redis.RedisError, OSError) as exc:
                    log(f"[cluster] {setup.key} run {run + 1}: failed: {exc!r}")
                    continue
                results[setup.key].append(o)
                log(
                    f"[cluster] {setup.key} run {run + 1}/{runs}: {o.gifts_per_s:,.0f} gifts/s, "
                    f"p50 {o.p50_ms:.1f} p99 {o.p99_ms:.1f} ms; µs/gift wallet {o.wallet_us:.0f}, "
                    f"Redis {'+'.join(f'{m:.0f}' for m in o.masters_us)}, replicas "
                    f"{'+'.join(f'{m:.0f}' for m in o.replicas_us)}, crediting {o.crediting_us:.0f}; "
                    f"lag p50 {o.lag_p50_ms:.0f} p99 {o.lag_p99_ms:.0f} ms"
                    + (
                        f"; drain: masters {o.drain_masters_us:.1f} replicas {o.drain_replicas_us:.1f} "
                        f"runner {o.drain_crediting_us:.1f} µs/gift"
                        if setup.key == "split"
                        else ""
                    )
                )
    finally:
        shards.stop()
    return results


# ---- the section ------------------------------------------------------------------------
def _vals(outs: list[Outcome], get: Callable[[Outcome], float]) -> list[float]:
    return [get(o) for o in outs]


def _ratio(a: list[float], b: list[float]) -> float:
    x, y = med(a)[0], med(b)[0]
    return x / y if y else float("nan")


def render(
    results: dict[str, list[Outcome]], runs: int, senders: int, seconds: float, cond: str
) -> tuple[list[str], list[SummaryRow]]:
    """The section's body and its lines of the table of results."""
    titles = {s.key: s.title for s in SETUPS}
    R = results

    def m(key: str, get: Callable[[Outcome], float], digits: int = 0) -> str:
        return mmm(_vals(R[key], get), digits)

    def median(key: str, get: Callable[[Outcome], float]) -> float:
        return med(_vals(R[key], get))[0]

    body = [
        f"Conditions: {cond}.",
        "",
        f"{senders} closed-loop senders through the real `Wallet` (a 1-coin rose each, to 100 "
        f"creators, room = creator) in a process of their own, {seconds:g} s timed after 1 s of "
        f"warm-up, each setup {runs} time(s), interleaved. The cluster: 3 masters + 3 replicas "
        f"(tests/cluster.py, AOF on, `appendfsync everysec`), {DEFAULT_PARTITIONS} partitions, "
        "and one crediting runner in another process, its rounds back to back (as a gateway's "
        "are when every gift pokes it). CPU: each process's user + system time (psutil) over "
        "the timed window ÷ gifts settled in it. **All of it on 2 shared cores**: 6 redis-servers, "
        "the senders' process and the crediting runner take turns on them, so the cluster's "
        "gifts/s is this machine's, not 3 shards' worth (each shard would have its own core in "
        "production); the CPU per gift is the figure that carries over. Money only: the "
        "gifts name no room log, so no room event is written (on one Redis the gift script "
        "would append it, on a cluster credit.lua). The `1 sender` rows: one closed-loop "
        "sender, the latency of a gift with nothing queued in front of it (what a `WAIT` or an "
        "fsync adds to each answer).",
        "",
        "| setup | gifts settled/s | gift latency p50 (ms) | p99 (ms) | credit lag p50 (ms) | p99 (ms) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for s in SETUPS:
        lag = (
            (m(s.key, lambda o: o.lag_p50_ms), m(s.key, lambda o: o.lag_p99_ms))
            if s.cluster and s.crediting
            else ("–", "–")
        )
        body.append(
            f"| {s.title} | {m(s.key, lambda o: o.gifts_per_s)} | {m(s.key, lambda o: o.p50_ms, 1)} "
            f"| {m(s.key, lambda o: o.p99_ms, 1)} | {lag[0]} | {lag[1]} |"
        )
    body += [
        "",
        "CPU µs per gift settled, by process (medians):",
        "",
        "| setup | senders' process (wallet) | Redis: each master | Redis: all masters | each master's replica | crediting runner | total |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in SETUPS:
        outs = R[s.key]
        if s.alone:  # the CPU of one sender's gifts is mostly fixed costs: not shown
            continue
        if not outs:
            body.append(f"| {s.title} | failed | | | | | |")
            continue
        k = len(outs[0].masters_us)
        each = " / ".join(fmt(med([o.masters_us[i] for o in outs])[0]) for i in range(k))
        reps = (
            " / ".join(
                fmt(med([o.replicas_us[i] for o in outs])[0])
                for i in range(len(outs[0].replicas_us))
            )
            or "–"
        )
        cred = m(s.key, lambda o: o.crediting_us) if s.cluster and s.crediting else "–"
        if s.key == "split":
            cred = "– (afterwards, below)"
        body.append(
            f"| {s.title} | {m(s.key, lambda o: o.wallet_us)} | {each if k > 1 else '–'} "
            f"| {m(s.key, lambda o: o.redis_us)} | {reps} | {cred} | {m(s.key, lambda o: o.total_us)} |"
        )
    gift_script = median("split", lambda o: o.redis_us)
    live = median("cluster", lambda o: o.redis_us)
    body += [
        "",
        "Redis CPU per gift on the cluster, by script (for the paper model, docs/scaling.md):",
        "",
        "| part | µs per gift | how |",
        "| --- | --- | --- |",
        f"| gift script (debit, ledger, outbox), all masters | {m('split', lambda o: o.redis_us)} | gifts alone, no crediting runner |",
        f"| replication of it, all replicas | {m('split', lambda o: sum(o.replicas_us))} | the same run, the replicas' CPU |",
        f"| crediting, all masters, at full batches (256 a call) | {m('split', lambda o: o.drain_masters_us, 1)} | the runner draining the backlog the gifts-alone run left |",
        f"| crediting's replication, at full batches | {m('split', lambda o: o.drain_replicas_us, 1)} | the same drain, the replicas' CPU |",
        f"| crediting runner process, at full batches | {m('split', lambda o: o.drain_crediting_us, 1)} | its own CPU time over the drain |",
        f"| crediting, all masters, live (small batches, rounds back to back) | {fmt(live - gift_script)} | masters with crediting alongside minus gifts alone (medians) |",
        "",
        f"Durable ack on one Redis: WAITAOF needs Redis ≥ 7.2 and this machine has {redis_version()}, so "
        "`--durable-ack` there needs `appendfsync always` (the gift's reply then follows the fsync); "
        "the `appendfsync always` row measures that. On the cluster it is a `WAIT 1` for the "
        "shard's replica on the script's own connection, before each gift's answer.",
        "",
        "Reproduce: `BENCH_SCENARIOS=cluster BENCH_RUNS=3 make bench` (bench/cluster.py, "
        "bench/cluster_settle.py).",
        "",
    ]
    one, cl, plain = (
        _vals(R["one"], lambda o: o.gifts_per_s),
        _vals(R["cluster"], lambda o: o.gifts_per_s),
        _vals(R["plain"], lambda o: o.gifts_per_s),
    )
    dur = _vals(R["durable"], lambda o: o.gifts_per_s)
    lag99 = median("cluster", lambda o: o.lag_p99_ms)
    rows: list[SummaryRow] = [
        (
            "11. Redis Cluster (3 shards, 2 cores)",
            "gifts settled/s, Wallet, crediting alongside",
            fmt(med(cl)[0]),
            titles["one"],
            fmt(med(one)[0]),
            f"{fmt(_ratio(cl, one), 2)}×",
            "reported",
            "",
        ),
        (
            "",
            "credit lag p99, gift ts → credited (ms)",
            fmt(lag99),
            "",
            "",
            "",
            "≤ 1,000",
            "yes" if lag99 <= 1000 else "no",
        ),
        (
            "",
            "gifts/s with `--durable-ack`",
            fmt(med(dur)[0]),
            "without",
            fmt(med(cl)[0]),
            f"{fmt(_ratio(dur, cl), 2)}×",
            "reported",
            "",
        ),
        (
            "",
            "one Redis gifts/s, ScriptBatcher",
            fmt(med(one)[0]),
            "plain redis-py EVALSHA",
            fmt(med(plain)[0]),
            f"{fmt(_ratio(one, plain), 2)}×",
            "reported",
            "",
        ),
    ]
    return body, rows


def redis_version() -> str:
    out = subprocess.run(
        ["redis-server", "--version"], capture_output=True, text=True, timeout=30
    ).stdout
    return next(
        (w.removeprefix("v=") for w in out.split() if w.startswith("v=")), "an unknown version"
    )
