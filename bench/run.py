# ruff: noqa: E501, RUF001  (markdown tables: long rows, typographic signs on purpose)
"""`make bench`: start our own Redis and servers, run the scenarios of issue 5 (each >= 3
times), and write docs/benchmarks.md: one table of the results and the ratios against the
peers first, then the method, the machine and every figure with its command.

    .venv/bin/python -m bench.run                       # everything (about 25 minutes)
    BENCH_SCENARIOS=fanout,settle BENCH_RUNS=3 .venv/bin/python -m bench.run
    BENCH_SMOKE=1 .venv/bin/python -m bench.run         # small and short: checks the wiring

Knobs (environment): BENCH_SCENARIOS (fanout,settle,mixed,connections,storm,fleet, and
issue 13's broker,workers,crossgw,onebroker: bench/scaleout.py; issue 14's cluster:
bench/cluster.py), BENCH_RUNS, BENCH_CLUSTER_SENDERS (200), BENCH_CLUSTER_S (8),
BENCH_SMOKE, BENCH_FANOUT_VIEWERS (1000,5000), BENCH_PEERS (ws,sio,psio), BENCH_STEP_S,
BENCH_MIXED_S, BENCH_MIXED_SCALE (share of the full mixed/storm size, default 0.25: what this
machine's load generator can read; 1 = the issue's 5,000 viewers and 2,000 gifts/s), BENCH_OUT
(default docs/benchmarks.md; a smoke run writes
bench/.peers/benchmarks-smoke.md unless told).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]

from bench import cluster
from bench.fanout import LadderResult, Step, Target, ladder
from bench.figures import fmt, med, mmm
from bench.procs import ROOT, VENV_BIN, Giftstream, Proc, install_peers, raise_nofile, start_peer
from bench.scaleout import (
    CpuWindow,
    Service,
    cpu_per_delivery_us,
    describe,
    fixed_step,
    has_option,
    skipped,
)

ENV = os.environ
SMOKE = ENV.get("BENCH_SMOKE", "") not in ("", "0")
SCENARIOS = ENV.get("BENCH_SCENARIOS", "fanout,settle,mixed,connections,storm,fleet").split(",")
SCALEOUT_VIEWERS = int(ENV.get("BENCH_SCALEOUT_VIEWERS", "200" if SMOKE else "1000"))
RUNS = int(ENV.get("BENCH_RUNS", "1" if SMOKE else "3"))
FANOUT_VIEWERS = [
    int(v) for v in ENV.get("BENCH_FANOUT_VIEWERS", "200" if SMOKE else "1000,5000").split(",")
]
PEERS = [p for p in ENV.get("BENCH_PEERS", "ws,sio,psio").split(",") if p]
STEP_S = float(ENV.get("BENCH_STEP_S", "1.5" if SMOKE else "2.5"))
MIXED_S = float(ENV.get("BENCH_MIXED_S", "8" if SMOKE else "60"))
MIXED_SCALE = float(ENV.get("BENCH_MIXED_SCALE", "0.1" if SMOKE else "0.25"))
LOADTEST_LIMIT_S = 900  # a load test still running after this is killed, and recorded so
DEFAULT_OUT = "bench/.peers/benchmarks-smoke.md" if SMOKE else "docs/benchmarks.md"
OUT = ROOT / ENV.get("BENCH_OUT", DEFAULT_OUT)
PEER_NAMES = {"ws": "Node ws", "sio": "Node socket.io", "psio": "python-socketio"}
PEER_TARGETS = {"ws": 1.0, "sio": 2.0, "psio": 10.0}  # ours / peer, issue 5
SENDERS = 20
NUMBER = {
    "fanout": 1,
    "settle": 2,
    "mixed": 3,
    "connections": 4,
    "storm": 5,
    "fleet": 6,
    "broker": 7,
    "workers": 8,
    "crossgw": 9,
    "onebroker": 10,
    "cluster": 11,
}  # doc sections; broker, workers, crossgw, onebroker and cluster run when asked for


def log(msg: str) -> None:
    print(msg, flush=True)


def loadavg() -> str:
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def busy_others(own: set[int]) -> str:
    """The other processes using CPU right now (1 s sample): what else shares the cores."""
    procs = [p for p in psutil.process_iter(["pid", "name", "cmdline"]) if p.pid not in own]
    for p in procs:
        try:
            p.cpu_percent(None)
        except psutil.Error:
            pass
    time.sleep(1.0)
    busy = []
    for p in procs:
        try:
            c = p.cpu_percent(None)
        except psutil.Error:
            continue
        if c >= 10:
            busy.append((c, " ".join(p.info["cmdline"] or [p.info["name"]])[:60]))
    busy.sort(reverse=True)
    return "; ".join(f"{c:.0f}% {cmd}" for c, cmd in busy[:4]) or "none over 10% of a core"


@dataclass
class Row:
    """One line of the table of results that opens the document."""

    scenario: str  # "1. Fan-out, 1,000 viewers": the number of its section leads
    figure: str  # what is measured, with its unit
    ours: str  # giftstream's median
    peer: str = ""  # what it is compared with, if anything
    theirs: str = ""
    ratio: str = ""
    target: str = ""
    met: str = ""

    def cells(self) -> list[str]:
        return [
            self.scenario,
            self.figure,
            self.ours,
            self.peer,
            self.theirs,
            self.ratio,
            self.target,
            self.met,
        ]


@dataclass
class Section:
    title: str
    body: list[str] = field(default_factory=list)
    summary: list[Row] = field(default_factory=list)  # its lines of the table of results

    @property
    def number(self) -> str:
        return self.title.split(".", 1)[0]


def met(ok: bool) -> str:
    return "yes" if ok else "no"


@dataclass
class Bench:
    tmp: Path
    sections: list[Section] = field(default_factory=list)
    own_pids: set[int] = field(default_factory=set)
    machine: dict[str, str] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def conditions(self) -> str:
        return (
            f"measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; load average before: {loadavg()};"
            f" other busy processes: {busy_others(self.own_pids)}"
        )


# ---- the machine ------------------------------------------------------------------------
def machine_info(versions: dict[str, str]) -> dict[str, str]:
    def cmd(*args: str) -> str:
        try:
            return subprocess.run(args, capture_output=True, text=True, timeout=30).stdout.strip()
        except OSError:
            return "n/a"

    mem = psutil.virtual_memory().total / 2**30
    return {
        "cores": f"{os.cpu_count()} ({platform.processor() or platform.machine()}), {mem:.0f} GiB",
        "uname": " ".join(platform.uname()),
        "Python": sys.version.split()[0] + f" ({sys.executable})",
        "Redis": cmd("redis-server", "--version"),
        "websockets": importlib.metadata.version("websockets"),
        "Node": cmd("node", "--version"),
        "peers": ", ".join(f"{k} {v}" for k, v in versions.items()),
        "open files": f"{__import__('resource').getrlimit(__import__('resource').RLIMIT_NOFILE)}",
        "load average at start": loadavg(),
    }


# ---- 1: fan-out -------------------------------------------------------------------------
async def scenario_fanout(b: Bench) -> Section:
    sec = Section(
        "1. Fan-out: one room, 20 senders, events delivered/s at send-to-screen p99 ≤ 100 ms"
    )
    cond = b.conditions()
    log(f"[fanout] {cond}")
    gs = Giftstream(b.tmp, raised_limits=True, name="giftstream-fanout")
    b.own_pids |= {gs.server.pid, gs.redis.process.pid}  # type: ignore[union-attr]
    peers: dict[str, Proc] = {}
    try:
        for kind in PEERS:
            peers[kind] = start_peer(kind, b.tmp)
            b.own_pids.add(peers[kind].pid)
        targets = [
            Target(
                "giftstream",
                "gs",
                gs.url,
                [gs.server.pid, gs.redis.process.pid],  # type: ignore[union-attr]
                gs.jwt_secret,
                gs.admin_url,
                gs.webhook_secret,
            )
        ]
        for kind, proc in peers.items():
            targets.append(
                Target(
                    PEER_NAMES[kind],
                    "ws" if kind == "ws" else "sio",
                    f"ws://127.0.0.1:{proc.port}",
                    [proc.pid],
                )
            )
        results: dict[tuple[str, int], list[LadderResult]] = {}
        for viewers in FANOUT_VIEWERS:
            for run in range(RUNS):
                for t in targets:  # interleaved: noise from the shared machine hits every server
                    first = results.get((t.name, viewers), [])
                    ref = first[0].best if first else None
                    run_id = f"{viewers}r{run}{int(time.time()) % 100000}"
                    kw: dict[str, Any] = dict(
                        viewers=viewers,
                        senders=SENDERS,
                        run_id=run_id,
                        tmp=b.tmp,
                        step_s=STEP_S,
                        warm_s=0.5,
                        max_steps=6 if SMOKE else 18,
                        viewer_procs=2,
                        factor=1.15,
                        log=log,
                    )
                    if ref is None:  # coarse x2 from 2.5 gifts/s, then fine x1.15
                        kw.update(start_dps=2.5 * viewers, coarse=2.0)
                    else:  # later runs: fine steps from 70% of the first run's result
                        kw.update(start_dps=0.7 * ref.offered_dps, coarse=None)
                    log(f"[fanout] {t.name}, {viewers} viewers, run {run + 1}/{RUNS}")
                    try:
                        r = await ladder(t, **kw)
                    except Exception as exc:  # a failed connect etc.: recorded, not fatal
                        log(f"[fanout] {t.name}: {exc!r}")
                        r = LadderResult(t.name, viewers)
                    results.setdefault((t.name, viewers), []).append(r)
        sec.body, sec.summary = fanout_tables(results, [t.name for t in targets], cond)
    finally:
        for p in peers.values():
            p.stop()
        gs.stop()
    return sec


def fanout_tables(
    results: dict[tuple[str, int], list[LadderResult]], names: list[str], cond: str
) -> tuple[list[str], list[Row]]:
    """The section's tables and its lines of the table of results, from the ladders of every
    server (giftstream first) at each number of viewers."""
    summary: list[Row] = []
    out = [
        f"Conditions: {cond}.",
        "",
        f"Target: giftstream ≥ 1.0× Node ws, ≥ 2× Node socket.io, ≥ 10× python-socketio. "
        f"Medians of {RUNS} run(s) (min–max); ladder steps of {STEP_S:g} s (the first 0.5 s "
        "of each not measured).",
        "",
    ]
    for viewers in FANOUT_VIEWERS:
        out += [
            f"#### {viewers:,} viewers",
            "",
            "| server | delivered/s at p99 ≤ 100 ms | p99 there (ms) | p50 there (ms) "
            "| gifts/s there | server CPU there (% of a core) | fleet CPU there | "
            "ceiling: delivered/s keeping up, any p99 | p99 at the ceiling (ms) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        best: dict[str, float] = {}
        ceiling: dict[str, float] = {}
        for name in names:
            rs = results.get((name, viewers), [])
            bests = [r.best for r in rs]
            vals = [s.delivered_dps if s else 0.0 for s in bests]
            ok = [s for s in bests if s]
            ceil = [r.ceiling for r in rs]
            best[name] = med(vals)[0] if rs else float("nan")
            ceiling[name] = med([c.delivered_dps if c else 0.0 for c in ceil])[0]
            out.append(
                f"| {name} | {mmm(vals)} | {mmm([s.p99_ms for s in ok], 1)} "
                f"| {mmm([s.p50_ms for s in ok], 1)} | {mmm([s.gifts_per_s for s in ok], 1)} "
                f"| {mmm([s.server_cpu for s in ok])} | {mmm([s.fleet_cpu for s in ok])} "
                f"| {mmm([c.delivered_dps if c else 0.0 for c in ceil])} "
                f"| {mmm([c.p99_ms for c in ceil if c], 1)} |"
            )
        out += [
            "",
            "| giftstream / peer (medians) | at p99 ≤ 100 ms | target | met | ceilings (any p99) |",
            "| --- | --- | --- | --- | --- |",
        ]
        ours = best.get("giftstream", float("nan"))
        ours_ceil = ceiling.get("giftstream", float("nan"))
        for kind in PEERS:
            name = PEER_NAMES[kind]
            theirs = best.get(name, float("nan"))
            target = PEER_TARGETS[kind]
            if not theirs and not ours:
                ratio, cell, is_met = (
                    "n/a",
                    "n/a: neither met p99 ≤ 100 ms at any rate tried",
                    "not measured",
                )
            elif not theirs:
                ratio, cell, is_met = (
                    "∞",
                    "∞ (the peer met p99 ≤ 100 ms at no rate tried in at least half its runs)",
                    "yes",
                )
            else:
                ratio = cell = f"{fmt(ours / theirs, 2)}×"
                is_met = met(ours / theirs >= target)
            theirs_ceil = ceiling.get(name, float("nan"))
            ceil_ratio = f"{fmt(ours_ceil / theirs_ceil, 2)}×" if theirs_ceil else "n/a"
            out.append(
                f"| giftstream / {name} | {cell} | ≥ {target:g}× | {is_met} | {ceil_ratio} |"
            )
            summary.append(
                Row(
                    f"1. Fan-out, {viewers:,} viewers",
                    "deliveries/s at send-to-screen p99 ≤ 100 ms",
                    fmt(ours),
                    name,
                    fmt(theirs),
                    ratio,
                    f"≥ {target:g}×",
                    is_met,
                )
            )
        out.append("")
        out += ["<details><summary>every ladder step</summary>", "", "```"]
        for name in names:
            for i, r in enumerate(results.get((name, viewers), [])):
                out.append(f"{name} run {i + 1}: connect {r.connect_s:.1f} s")
                for s in r.steps:
                    out.append(
                        f"  offered {s.offered_dps:>10,.0f}/s ({s.gifts_per_s:7.1f} gifts/s) "
                        f"delivered {s.delivered_dps:>10,.0f}/s p50 {s.p50_ms:6.1f} "
                        f"p99 {s.p99_ms:7.1f} ms server {s.server_cpu:3.0f}% fleet "
                        f"{s.fleet_cpu:3.0f}% {'ok' if s.ok else 'FAIL'}"
                    )
        out += ["```", "</details>", ""]
    out += [
        "Reproduce: `BENCH_SCENARIOS=fanout make bench` (servers: `python -m bench.serve` = "
        "`giftstream serve` with the per-connection gift limit raised; "
        "`node bench/peers/ws_server.js`, `node bench/peers/sio_server.js`, "
        "`bench/.peers/psio/bin/python bench/peers/psio_server.py`; fleet: "
        "`node bench/peers/fleet.js CONFIG.json`, driven by bench/fanout.py).",
        "",
    ]
    return out, summary


# ---- the loadtest-driven scenarios ------------------------------------------------------
class LoadtestFailed(RuntimeError):
    def __init__(self, shown: str, tail: str) -> None:
        super().__init__(f"the load test wrote no report: {tail[-300:]}")
        self.shown = shown
        self.tail = tail


def loadtest(
    b: Bench,
    gs: Giftstream | Service,
    args: list[str],
    name: str,
    on_line: Callable[[str, float], None] | None = None,
) -> tuple[dict[str, Any], str]:
    report = b.tmp / f"{name}.json"
    cmd = [
        str(VENV_BIN / "giftstream"),
        "loadtest",
        "--url",
        gs.url,
        "--admin-url",
        gs.admin_url,
        "--data-dir",
        str(gs.data_dir),
        "--redis-url",
        gs.redis.url,
        "--server-pid",
        str(gs.server.pid),
        *args,
        "--report",
        str(report),
    ]
    shown = (
        "giftstream loadtest --url ws://127.0.0.1:PORT/ws --admin-url http://127.0.0.1:ADMIN "
        "--data-dir DIR --redis-url redis://127.0.0.1:RPORT/0 " + shlex.join(args)
    )
    log(f"  $ {shown}")
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        preexec_fn=raise_nofile,
        env={**ENV, "COLUMNS": "120"},
    )
    assert proc.stdout is not None
    watchdog = threading.Timer(LOADTEST_LIMIT_S, proc.kill)  # its own budget failed too
    watchdog.start()
    tail: list[str] = []
    try:
        for line in proc.stdout:
            if on_line:
                on_line(line, time.monotonic())
            tail = [*tail, line.rstrip()][-40:]
        proc.wait(timeout=60)
    finally:
        watchdog.cancel()
    if proc.returncode == -signal.SIGKILL:
        tail.append(f"(killed by the bench after {LOADTEST_LIMIT_S} s)")
    if not report.exists():
        raise LoadtestFailed(shown, f"exit {proc.returncode}\n" + "\n".join(tail))
    data: dict[str, Any] = json.loads(report.read_text())
    log(
        f"    -> {data['result']}  settled/s {data['totals']['gifts_settled_per_s']:,.0f}  ack p99 "
        f"{data['latency_ms']['gift_ack']['p99']}  screen p99 "
        f"{data['latency_ms']['send_to_screen']['p99']}"
    )
    return data, shown


def redis_benchmark(gs: Giftstream, n: int) -> tuple[float, str]:
    """The gift script as redis-benchmark drives it: EVALSHA, pipelined -P 32, on db 1 of the
    same Redis, every call a real successful debit of one of 1,000 funded wallets."""
    import redis

    from giftstream.server.money.catalog import load_catalog
    from giftstream.server.scripts import script_source

    r = redis.Redis(host=gs.redis.host, port=gs.redis.port, db=1)
    sha = r.script_load(script_source("send_gift"))
    pipe = r.pipeline(transaction=False)
    for i in range(1000):
        pipe.hset(f"bench:wallet:s{i:012d}", "coins", 10**12)
    pipe.execute()
    economics = load_catalog().economics
    diamonds = economics.diamonds_for(1)
    now = int(time.time() * 1000)
    args = [
        "EVALSHA",
        sha,
        "6",
        "bench:wallet:s__rand_int__",
        "bench:wallet:creator",
        "bench:gift_key:s:k__rand_int____rand_int____rand_int__",
        "bench:spent:s__rand_int__",
        "bench:combo:s__rand_int__/room",
        "bench:ledger",
        "e__rand_int__",
        "s__rand_int__",
        "creator",
        "room",
        "rose",
        "k__rand_int__",
        "1",
        "1",
        str(diamonds),
        "1",
        str(now),
        "86400000",
        "172800000",
        "5000",
        "60000",
    ]
    cmd = [
        "redis-benchmark",
        "-h",
        gs.redis.host,
        "-p",
        str(gs.redis.port),
        "--dbnum",
        "1",
        "-n",
        str(n),
        "-c",
        "50",
        "-P",
        "32",
        "-r",
        "1000",
        "--csv",
        *args,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True).stdout
    rps = float(
        next(csv for csv in out.splitlines() if csv.startswith('"EVALSHA')).split(",")[1].strip('"')
    )
    settled = r.xlen("bench:ledger")
    r.flushdb()
    r.close()
    if settled < n * 0.99:
        raise RuntimeError(f"redis-benchmark: only {settled} of {n} calls were debits")
    shown = shlex.join(["redis-benchmark", "-p", "RPORT", *cmd[5:]]).replace(
        sha, "<sha of send_gift>"
    )
    return rps, shown


def check_status(report: dict[str, Any]) -> str:
    bad = [c["name"] for c in report["checks"] if c["status"] == "fail"]
    skipped = [c["name"] for c in report["checks"] if c["status"] == "skipped"]
    return (
        str(report["result"])
        + (f" (failed: {', '.join(bad)})" if bad else "")
        + (f" (skipped: {', '.join(skipped)})" if skipped else "")
    )


async def scenario_settle(b: Bench) -> Section:
    sec = Section("2. Settlement: 100 rooms × 20 viewers, 500 gifters in closed loop")
    cond = b.conditions()
    log(f"[settle] {cond}")
    gs = Giftstream(b.tmp, raised_limits=True, name="giftstream-settle")
    b.own_pids |= {gs.server.pid, gs.redis.process.pid}  # type: ignore[union-attr]
    dur = "4" if SMOKE else "12"
    args = (
        ["--viewers", "200", "--rooms", "10", "--gifters", "50"]
        if SMOKE
        else ["--viewers", "2000", "--rooms", "100", "--gifters", "500"]
    ) + [
        "--closed-loop",
        "--think-time",
        "0",
        "--duration",
        dur,
        "--workers",
        "2",
        "--zipf",
        "0.0001",
        "--drain",
        "5",
    ]
    rows = []
    try:
        for run in range(RUNS):
            rep, shown = loadtest(b, gs, args, f"settle-{run}")
            rps, rb_shown = redis_benchmark(gs, 50_000 if SMOKE else 150_000)
            log(f"    redis-benchmark EVALSHA -P 32: {rps:,.0f}/s")
            rows.append((rep, rps))
    finally:
        gs.stop()
    settled = [r["totals"]["gifts_settled_per_s"] for r, _ in rows]
    rb = [x for _, x in rows]
    ratio = [s / x for s, x in zip(settled, rb, strict=True)]
    money = [check_status(r) for r, _ in rows]
    money_met = met(all(r["result"] == "PASS" for r, _ in rows))
    sec.summary = [
        Row(
            "2. Settlement",
            "gifts settled/s over the WebSocket",
            fmt(med(settled)[0]),
            "redis-benchmark, same script and Redis (calls/s)",
            fmt(med(rb)[0]),
            f"{fmt(100 * med(ratio)[0], 1)} %",
            "≥ 35 %",
            met(med(ratio)[0] >= 0.35),
        ),
        Row("2. Settlement", "money check", ", ".join(money), target="PASS", met=money_met),
    ]
    sec.body += [
        f"Conditions: {cond}.",
        "",
        "| figure | median (min–max) | target | met |",
        "| --- | --- | --- | --- |",
        f"| gifts settled/s (giftstream, over the WebSocket) | {mmm(settled)} | | |",
        f"| gift ack p99 (ms) | {mmm([r['latency_ms']['gift_ack']['p99'] for r, _ in rows], 1)} | | |",
        f"| gift ack p50 (ms) | {mmm([r['latency_ms']['gift_ack']['p50'] for r, _ in rows], 1)} | | |",
        f"| redis-benchmark, same script, EVALSHA -P 32, same Redis (calls/s) | {mmm(rb)} | | |",
        f"| ratio giftstream / redis-benchmark | {mmm([100 * x for x in ratio], 1)} % | ≥ 35 % "
        f"| {'yes' if med(ratio)[0] >= 0.35 else 'no'} |",
        f"| server CPU (% of a core, mean) | {mmm([r['server']['cpu_percent_mean'] for r, _ in rows])} | | |",
        f"| load generator CPU (% of a core, mean) | {mmm([r['load_generator']['cpu_percent_mean'] for r, _ in rows])} | | |",
        f"| money check | {', '.join(money)} | PASS | {money_met} |",
        "",
        "Commands (each run: the load test, then redis-benchmark on the same Redis):",
        "",
        f"    {shown}",
        f"    {rb_shown}",
        "",
        "The server runs as `python -m bench.serve` (`giftstream serve` with the per-connection "
        "gift limit of 20/s raised: 500 closed-loop gifters with no think time ask for more). "
        "redis-benchmark runs on db 1 with keys of its own (`bench:*`): each call is a real, "
        "successful debit of one of 1,000 funded wallets with a fresh idempotency key "
        "(`__rand_int__` three times), so it measures the script's own ceiling in this Redis; the "
        "bench checks afterwards that the ledger stream got one entry per call.",
        "",
    ]
    return sec


async def scenario_mixed(b: Bench, storm: bool) -> Section:
    full_size = MIXED_SCALE >= 1
    viewers, rate, gifters = (round(n * MIXED_SCALE) for n in (5000, 2000, 250))
    size = (
        ""
        if full_size
        else (f" — at {MIXED_SCALE:g} of full size: {viewers:,} viewers, {rate:,} gifts/s")
    )
    title = (
        (
            "5. Reconnect storm: 30% of 5,000 viewers drop and rejoin with `since` within 5 s, "
            "during the mixed load"
        )
        if storm
        else ("3. Mixed: 50 rooms, 5,000 viewers, 2,000 gifts/s open loop")
    )
    title += size
    sec = Section(title)
    label = title.split(":", 1)[0] + ("" if full_size else f" at {MIXED_SCALE:g} of full size")
    cond = b.conditions()
    name = "storm" if storm else "mixed"
    log(f"[{name}] {cond}")
    gs = Giftstream(b.tmp, name=f"giftstream-{name}")
    b.own_pids |= {gs.server.pid, gs.redis.process.pid}  # type: ignore[union-attr]
    dur = min(MIXED_S, 30.0) if storm else MIXED_S
    storm_at = max(2.0, dur / 2 - 2.5)
    args = [
        "--viewers",
        str(viewers),
        "--rooms",
        "50",
        "--gifters",
        str(gifters),
        "--gift-rate",
        str(rate),
        "--duration",
        f"{dur:g}",
        "--workers",
        "4",
    ]
    if storm:
        args += ["--reconnect-storm", f"0.3@{storm_at:g}", "--storm-spread", "5"]
    reps = []
    failed: list[str] = []
    shown = ""
    try:
        for run in range(RUNS):
            try:
                rep, shown = loadtest(b, gs, args, f"{name}-{run}")
            except LoadtestFailed as exc:  # recorded; further runs would fail the same way
                shown, failed = exc.shown, [*failed, exc.tail]
                log(f"    run {run + 1} wrote no report; the remaining runs are skipped")
                break
            reps.append(rep)
    finally:
        gs.stop()
    if not reps:
        sec.summary = [Row(label, "no run completed: see its section", "n/a")]
        sec.body += [
            f"Conditions: {cond}.",
            "",
            "**No run completed**: the load test wrote no report. Its last lines:",
            "",
            "```",
            *failed[0].splitlines()[-14:],
            "```",
            "",
            "Command:",
            "",
            f"    {shown}",
            "",
        ]
        return sec

    def lat(report: dict[str, Any], kind: str, quantile: str) -> float:
        value: float = report["latency_ms"][kind][quantile]
        return value

    errors = [sum(r["errors"].values()) for r in reps]
    money = [check_status(r) for r in reps]
    money_met = met(not any(errors) and all(r["result"] == "PASS" for r in reps))
    rows = [
        f"Conditions: {cond}.",
        "",
        "| figure | median (min–max) | target | met |",
        "| --- | --- | --- | --- |",
    ]
    if storm:

        def storm_p99(r: dict[str, Any]) -> float:
            s = [
                x.get("screen_p99_ms")
                for x in r["series"]
                if storm_at <= x["t"] <= storm_at + 7 and x.get("screen_p99_ms") is not None
            ]
            return max(s) if s else float("nan")

        lost = [
            r["viewers"]["statuses"].get("lost", 0) + r["storm"].get("rejoined_unrecovered", 0)
            for r in reps
        ]
        deliv = [
            next((c["status"] for c in r["checks"] if c["name"] == "deliveries"), "?") for r in reps
        ]
        storm_p99s = [storm_p99(r) for r in reps]
        sec.summary = [
            Row(
                label,
                "viewers that lost an event, or rejoined unrecovered",
                fmt(med(lost)[0]),
                target="0",
                met=met(not any(lost)),
            ),
            Row(
                label,
                "delivery check: every gift event, in seq order",
                ", ".join(deliv),
                target="pass",
                met=met(all(d == "pass" for d in deliv)),
            ),
            Row(
                label,
                "send-to-screen p99 during the storm (ms)",
                fmt(med(storm_p99s)[0], 1),
                target="reported",
            ),
        ]
        rows += [
            f"| viewers dropped by the storm | {mmm([r['storm']['dropped'] for r in reps])} | {round(0.3 * viewers):,} | |",
            f"| storm viewers held to the delivery check | {mmm([r['viewers']['storm_rejoined_checked'] for r in reps])} | | |",
            f"| viewers that lost an event, or rejoined unrecovered | {mmm(lost)} | 0 | {'yes' if not any(lost) else 'no'} |",
            f"| delivery check (every gift event, in seq order) | {', '.join(deliv)} | pass | {'yes' if all(d == 'pass' for d in deliv) else 'no'} |",
            f"| send-to-screen p99 during the storm (ms, worst second from the drop to 7 s after) | {mmm(storm_p99s, 1)} | reported | |",
            f"| send-to-screen p99 whole run (ms) | {mmm([lat(r, 'send_to_screen', 'p99') for r in reps], 1)} | | |",
            f"| send-to-screen p99.9 / max whole run (ms) | {mmm([lat(r, 'send_to_screen', 'p999') for r in reps], 1)} / {mmm([lat(r, 'send_to_screen', 'max') for r in reps], 1)} | | |",
            f"| gift ack p99 (ms) | {mmm([lat(r, 'gift_ack', 'p99') for r in reps], 1)} | | |",
        ]
    else:
        ack = [lat(r, "gift_ack", "p99") for r in reps]
        scr = [lat(r, "send_to_screen", "p99") for r in reps]
        sec.summary = [
            Row(
                label,
                "gift ack p99 (ms)",
                fmt(med(ack)[0], 1),
                target="≤ 10",
                met=met(med(ack)[0] <= 10),
            ),
            Row(
                label,
                "send-to-screen p99 (ms)",
                fmt(med(scr)[0], 1),
                target="≤ 60",
                met=met(med(scr)[0] <= 60),
            ),
        ]
        rows += [
            f"| gift ack p99 (ms) | {mmm(ack, 1)} | ≤ 10 | {'yes' if med(ack)[0] <= 10 else 'no'} |",
            f"| send-to-screen p99 (ms) | {mmm(scr, 1)} | ≤ 60 | {'yes' if med(scr)[0] <= 60 else 'no'} |",
            f"| gift ack p50 / send-to-screen p50 (ms) | {mmm([lat(r, 'gift_ack', 'p50') for r in reps], 1)} / {mmm([lat(r, 'send_to_screen', 'p50') for r in reps], 1)} | | |",
            f"| gifts settled/s | {mmm([r['totals']['gifts_settled_per_s'] for r in reps])} | {rate:,} | |",
            f"| gift events delivered/s | {mmm([r['totals']['gift_events_per_s'] for r in reps])} | | |",
            f"| send lag p99 (ms: the generator's own delay) | {mmm([lat(r, 'send_lag', 'p99') for r in reps], 1)} | | |",
        ]
    sec.summary.append(
        Row(
            label,
            "errors; money check",
            f"{fmt(med(errors)[0])}; {', '.join(money)}",
            target="0; PASS",
            met=money_met,
        )
    )
    rows += [
        f"| errors (all codes) | {mmm(errors)} | 0 | {met(not any(errors))} |",
        f"| money check | {', '.join(money)} | PASS | {met(all(r['result'] == 'PASS' for r in reps))} |",
        f"| server CPU (% of a core, mean) | {mmm([r['server']['cpu_percent_mean'] for r in reps])} | | |",
        f"| load generator CPU (% of a core, mean) | {mmm([r['load_generator']['cpu_percent_mean'] for r in reps])} | | |",
        "",
        "Command (its own `giftstream serve`, embedded-style Redis of its own):",
        "",
        f"    {shown}",
        "",
    ]
    sec.body += rows
    if failed:
        sec.body += [
            f"Only {len(reps)} of {RUNS} runs completed: the next wrote no report, and "
            "the rest were skipped.",
            "",
        ]
    return sec


async def scenario_connections(b: Bench) -> Section:
    sec = Section("4. Connections: 15,000 idle viewers on one server process")
    cond = b.conditions()
    log(f"[connections] {cond}")
    n = 1000 if SMOKE else 15000
    gs = Giftstream(b.tmp, name="giftstream-conns")
    b.own_pids |= {gs.server.pid, gs.redis.process.pid}  # type: ignore[union-attr]
    args = [
        "--viewers",
        str(n),
        "--rooms",
        "50",
        "--gifters",
        "0",
        "--duration",
        "6",
        "--workers",
        "2",
        "--drain",
        "1",
    ]
    rows = []
    try:
        for run in range(RUNS):
            gs.restart_server(b.tmp)  # a fresh process: a clean RSS baseline
            b.own_pids.add(gs.server.pid)
            await asyncio.sleep(1.0)
            before = gs.server.rss()
            peak = {"rss": before, "conns": 0}
            marks: dict[str, float] = {}

            def on_line(line: str, t: float, marks: dict[str, float] = marks) -> None:
                if "connecting" in line and "viewers" in line and "connecting" not in marks:
                    marks["connecting"] = t
                if re.search(r"\d+ viewers connected", line):
                    marks["connected"] = t

            # sample the server's RSS while the load test holds every connection
            stop = threading.Event()

            def sample(stop: threading.Event = stop, peak: dict[str, int] = peak) -> None:
                while not stop.wait(0.25):
                    try:
                        rss = gs.server.rss()
                        conns = gs.server.ps.num_fds()  # cheap, unlike a socket table scan
                    except psutil.Error:
                        continue
                    if conns >= peak["conns"]:
                        peak["conns"], peak["rss"] = conns, max(rss, peak["rss"])

            th = threading.Thread(target=sample, daemon=True)
            th.start()
            rep, shown = loadtest(b, gs, args, f"conns-{run}", on_line)
            stop.set()
            th.join(5)
            held = rep["totals"]["connections_peak"]
            per_kib = (peak["rss"] - before) / max(1, held) / 1024
            connect_s = marks.get("connected", float("nan")) - marks.get("connecting", float("nan"))
            log(
                f"    RSS {before / 2**20:.1f} -> {peak['rss'] / 2**20:.1f} MiB, {held} held: "
                f"{per_kib:.1f} KiB/connection; connect {connect_s:.1f} s"
            )
            rows.append((rep, before, peak["rss"], held, per_kib, connect_s))
    finally:
        gs.stop()
    per = [r[4] for r in rows]
    held = [r[3] for r in rows]
    held_met = met(all(h >= n for h in held))
    sec.summary = [
        Row(
            "4. Connections",
            "connections held (peak)",
            fmt(med(held)[0]),
            target=f"{n:,}",
            met=held_met,
        ),
        Row(
            "4. Connections",
            "RSS per connection (KiB)",
            fmt(med(per)[0], 1),
            target="≤ 20",
            met=met(med(per)[0] <= 20),
        ),
    ]
    sec.body += [
        f"Conditions: {cond}.",
        "",
        "| figure | median (min–max) | target | met |",
        "| --- | --- | --- | --- |",
        f"| connections held (peak) | {mmm(held)} | {n:,} | {held_met} |",
        f"| server RSS before (MiB, fresh process) | {mmm([r[1] / 2**20 for r in rows], 1)} | | |",
        f"| server RSS with every connection held (MiB) | {mmm([r[2] / 2**20 for r in rows], 1)} | | |",
        f"| RSS per connection (KiB) | {mmm(per, 1)} | ≤ 20 | {met(med(per)[0] <= 20)} |",
        f"| time to connect all (s: hello + join each, from the load test's `connecting` to `connected`) | {mmm([r[5] for r in rows], 1)} | | |",
        f"| money/delivery checks | {', '.join(check_status(r[0]) for r in rows)} | PASS | |",
        "",
        "Command (a fresh `giftstream serve` process before each run):",
        "",
        f"    {shown}",
        "",
        "RSS is the server process's resident set (psutil), sampled every 0.25 s while the load "
        "test holds the connections; the per-connection figure is (RSS held − RSS before) / "
        "connections held. Every viewer joined a room (hello + join), so it includes the room "
        "membership, not just the socket.",
        "",
    ]
    return sec


async def scenario_fleet(b: Bench) -> Section:
    """Which client fleet: CPU per received frame of the Node fleet and of the Python loadtest
    workers, against the same giftstream, room and gift rate."""
    sec = Section("6. The client fleet: CPU per received frame, Node fleet vs Python loadtest")
    cond = b.conditions()
    log(f"[fleet] {cond}")
    gs = Giftstream(b.tmp, raised_limits=True, name="giftstream-fleet")
    b.own_pids |= {gs.server.pid, gs.redis.process.pid}  # type: ignore[union-attr]
    viewers, rate, dur = (200, 50, 4) if SMOKE else (1000, 100, 8)
    target = Target(
        "giftstream", "gs", gs.url, [gs.server.pid], gs.jwt_secret, gs.admin_url, gs.webhook_secret
    )
    args = [
        "--viewers",
        str(viewers + SENDERS),
        "--rooms",
        "1",
        "--gifters",
        str(SENDERS),
        "--gift-rate",
        str(rate),
        "--duration",
        str(dur),
        "--workers",
        "2",
        "--drain",
        "2",
    ]
    py: list[float] = []
    node: list[float] = []
    rows: list[str] = []
    try:
        for run in range(min(RUNS, 2)):  # a side measurement (why this fleet), not a target
            rep, shown = loadtest(b, gs, args, f"fleet-py-{run}")
            fps = rep["totals"]["frames_per_s"]
            cpu = rep["load_generator"]["cpu_percent_mean"]
            py.append(cpu / 100 / fps * 1e6 if fps else float("nan"))
            r = await ladder(
                target,
                viewers=viewers,
                senders=SENDERS,
                run_id=f"fc{run}{int(time.time()) % 10000}",
                tmp=b.tmp,
                start_dps=rate * viewers,
                factor=1.0,
                step_s=dur,
                warm_s=1.0,
                max_steps=1,
                viewer_procs=2,
                log=log,
            )
            s = r.steps[0]
            node.append(
                s.fleet_cpu / 100 / s.frames_per_s * 1e6 if s.frames_per_s else float("nan")
            )
            rows.append(
                f"run {run + 1}: Python {cpu:.0f}% of a core for {fps:,.0f} frames/s; "
                f"Node {s.fleet_cpu:.0f}% for {s.frames_per_s:,.0f} frames/s"
            )
            log(f"    {rows[-1]}")
    finally:
        gs.stop()
    sec.body += [
        f"Conditions: {cond}.",
        "",
        f"One room, {viewers:,} viewers and {SENDERS} senders, {rate} gifts/s for {dur} s, against "
        "the same giftstream: the load generator's CPU (all its processes, % of one core) divided "
        "by the room frames its viewers read per second.",
        "",
        "| fleet | CPU µs per received frame | ",
        "| --- | --- |",
        f"| Node fleet (bench/peers/fleet.js: 2 viewer processes + 1 sender process) | {mmm(node, 1)} |",
        f"| Python loadtest workers (`giftstream loadtest --workers 2`, coordinator included) | {mmm(py, 1)} |",
        "",
        *[f"- {x}" for x in rows],
        "",
        f"Commands: `{shown}`; the Node fleet as in scenario 1 with one {dur} s step at {rate} gifts/s.",
        "",
    ]
    return sec


# ---- 7-9: several gateways (issue 13) ----------------------------------------------------
SCALEOUT_RATE = 20.0 if SMOKE else 50.0  # gifts/s into the room: a fixed load, not a ladder
SCALEOUT_STEP_S = 4.0 if SMOKE else 10.0
SCALEOUT_SETTLE_S = 4.0 if SMOKE else 12.0


def scaleout_settle_args() -> list[str]:
    """Scenario 2's load test (100 rooms x 20 viewers, 500 gifters in closed loop), for the
    settlement steps of scenarios 8 and 10."""
    return [
        *("--viewers", "200" if SMOKE else "2000", "--rooms", "10" if SMOKE else "100"),
        *("--gifters", "50" if SMOKE else "500", "--closed-loop", "--think-time", "0"),
        *("--duration", f"{SCALEOUT_SETTLE_S:g}", "--workers", "2", "--drain", "5"),
    ]


async def scaleout_step(b: Bench, target: Target, run_id: str) -> Step:
    """Scenarios 7-10's one measured step: the same load on whatever `target` serves it;
    `run_id` names the run (made unique by the clock)."""
    return await fixed_step(
        target,
        viewers=SCALEOUT_VIEWERS,
        senders=SENDERS,
        gifts_per_s=SCALEOUT_RATE,
        step_s=SCALEOUT_STEP_S,
        tmp=b.tmp,
        run_id=f"{run_id}{int(time.time()) % 10000}",
        log=log,
    )


async def scenario_broker(b: Bench) -> Section:
    """One room of N viewers: on 1 gateway, and spread over 3 on one Redis; the gateways' CPU
    per delivery (all their processes), the second over the first."""
    sec = Section(
        f"7. Broker overhead: one room of {SCALEOUT_VIEWERS:,} viewers on 1 gateway vs "
        "spread over 3 on one Redis"
    )
    if not has_option("--broker"):
        sec.body = skipped("--broker", "the Redis broker, branch broker")
        sec.summary = [Row("7. Broker overhead", "skipped: no --broker", "n/a")]
        return sec
    cond = b.conditions()
    log(f"[broker] {cond}")
    one: list[float] = []
    three: list[float] = []
    lines: list[str] = []
    for run in range(RUNS):
        for n in (1, 3):
            svc = Service(b.tmp, f"broker{n}r{run}")
            try:
                gws = [svc.add() for _ in range(n)]
                b.own_pids |= {*svc.gateway_pids(), svc.redis_pid}
                # three viewer processes either way: the same load generator in both arms
                viewers_on = [gws[i % n] for i in range(3)]
                step = await scaleout_step(
                    b, svc.target(f"{n} gateway(s)", gws[0], viewers_on), f"b{n}{run}"
                )
            finally:
                svc.stop()
            us = cpu_per_delivery_us(step)
            (one if n == 1 else three).append(us)
            lines.append(
                f"- run {run + 1}, {n} gateway(s): {step.delivered_dps:,.0f} deliveries/s, "
                f"gateways {step.server_cpu:.0f}% of a core, {us:.2f} µs a delivery, "
                f"p50 {step.p50_ms:.1f} ms, p99 {step.p99_ms:.1f} ms"
            )
            log("    " + lines[-1][2:])
    ratio = med(three)[0] / med(one)[0] if med(one)[0] else float("nan")
    sec.summary = [
        Row(
            "7. Broker overhead",
            "gateway CPU per delivery, 3 gateways / 1",
            f"{fmt(ratio, 2)}×",
            target="≤ 1.25×",
            met=met(ratio <= 1.25),
        )
    ]
    sec.body = [
        f"Conditions: {cond}.",
        "",
        f"One room, {SCALEOUT_VIEWERS:,} viewers and {SENDERS} senders, {SCALEOUT_RATE:g} gifts/s "
        f"for {SCALEOUT_STEP_S:g} s (the first 1 s not measured). The senders are on the first "
        "gateway; the viewers are in 3 fleet processes, all on 1 gateway, or one on each of 3. CPU: every "
        "gateway process (psutil), Redis not included.",
        "",
        "| gateways | gateway CPU per delivery (µs) |",
        "| --- | --- |",
        f"| 1 | {mmm(one, 2)} |",
        f"| 3, one Redis | {mmm(three, 2)} |",
        f"| ratio 3 / 1 | {fmt(ratio, 2)}× (target ≤ 1.25×: {met(ratio <= 1.25)}) |",
        "",
        *lines,
        "",
        "Reproduce: `BENCH_SCENARIOS=broker make bench` (bench/scaleout.py).",
        "",
    ]
    return sec


async def scenario_workers(b: Bench) -> Section:
    """`--workers 1` vs `--workers 2` on one port: fan-out at a fixed rate and settlement in
    closed loop, with each process's share of the CPU (where the second core went)."""
    sec = Section("8. `--workers 1` vs `--workers 2`: fan-out and settlement side by side")
    if not has_option("--workers"):
        sec.body = skipped("--workers", "branch workers")
        sec.summary = [Row("8. Workers", "skipped: no --workers", "n/a")]
        return sec
    cond = b.conditions()
    log(f"[workers] {cond}")
    rows: list[str] = []
    shown = ""
    settle_args = scaleout_settle_args()
    for run in range(RUNS):
        for workers in (1, 2):
            svc = Service(b.tmp, f"workers{workers}r{run}")
            try:
                gw = svc.add("--workers", str(workers))
                b.own_pids |= {*svc.gateway_pids(), svc.redis_pid}
                target = svc.target(f"--workers {workers}", gw, [gw, gw])
                target.pids.append(svc.redis_pid)
                step = await scaleout_step(b, target, f"w{workers}{run}")
                fan = describe(svc, step.cpu_by_pid)
                window = CpuWindow(target.pids, SCALEOUT_SETTLE_S)
                rep, shown = loadtest(
                    b, svc, settle_args, f"workers{workers}-{run}", window.on_line
                )
                settle = describe(svc, window.shares())
            finally:
                svc.stop()
            rows.append(
                f"| {workers} | {step.delivered_dps:,.0f} | {step.p99_ms:.1f} | {fan} "
                f"| {rep['totals']['gifts_settled_per_s']:,.0f} "
                f"| {rep['latency_ms']['gift_ack']['p99']} | {settle} | {check_status(rep)} |"
            )
            log(f"    {rows[-1]}")
    sec.summary = [Row("8. Workers", "see the section: figures side by side", "")]
    sec.body = [
        f"Conditions: {cond}.",
        "",
        f"Fan-out: one room, {SCALEOUT_VIEWERS:,} viewers, {SCALEOUT_RATE:g} gifts/s for "
        f"{SCALEOUT_STEP_S:g} s. Settlement: the load test of scenario 2 "
        f"(`{' '.join(settle_args)}`). CPU: % of a core of each process over the measured "
        "window (the fan-out step after its first second; the load test's timed run, not its "
        "connecting or draining): the gateway's workers and Redis.",
        "",
        "| --workers | fan-out delivered/s | fan-out p99 (ms) | fan-out CPU by process "
        "| gifts settled/s | ack p99 (ms) | settlement CPU by process | money check |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        f"Settlement command: `{shown}`. Reproduce: `BENCH_SCENARIOS=workers make bench` "
        "(bench/scaleout.py).",
        "",
    ]
    return sec


async def scenario_crossgw(b: Bench) -> Section:
    """Send-to-screen with the viewers on the senders' gateway, and on another gateway."""
    sec = Section("9. Send-to-screen: same gateway vs across gateways")
    if not has_option("--broker"):
        sec.body = skipped("--broker", "the Redis broker, branch broker")
        sec.summary = [Row("9. Across gateways", "skipped: no --broker", "n/a")]
        return sec
    cond = b.conditions()
    log(f"[crossgw] {cond}")
    same: list[float] = []
    cross: list[float] = []
    same99: list[float] = []
    cross99: list[float] = []
    svc = Service(b.tmp, "crossgw")
    try:
        a, other = svc.add(), svc.add()
        b.own_pids |= {*svc.gateway_pids(), svc.redis_pid}
        for run in range(RUNS):
            for where, viewers_on in (("same", a), ("cross", other)):
                step = await scaleout_step(
                    b,
                    svc.target(f"viewers on {where}", a, [viewers_on, viewers_on]),
                    f"x{where[0]}{run}",
                )
                (same if where == "same" else cross).append(step.p50_ms)
                (same99 if where == "same" else cross99).append(step.p99_ms)
    finally:
        svc.stop()
    sec.summary = [
        Row("9. Across gateways", "send-to-screen p50, same gateway (ms)", fmt(med(same)[0], 1)),
        Row("", "send-to-screen p50, across gateways (ms)", fmt(med(cross)[0], 1)),
    ]
    sec.body = [
        f"Conditions: {cond}.",
        "",
        f"Two gateways on one Redis; one room, {SCALEOUT_VIEWERS:,} viewers, {SENDERS} senders on "
        f"the first gateway, {SCALEOUT_RATE:g} gifts/s for {SCALEOUT_STEP_S:g} s; the viewers on "
        "the senders' gateway, then on the other one.",
        "",
        "| viewers | send-to-screen p50 (ms) | p99 (ms) |",
        "| --- | --- | --- |",
        f"| on the senders' gateway | {mmm(same, 1)} | {mmm(same99, 1)} |",
        f"| on another gateway | {mmm(cross, 1)} | {mmm(cross99, 1)} |",
        "",
        "Reproduce: `BENCH_SCENARIOS=crossgw make bench` (bench/scaleout.py).",
        "",
    ]
    return sec


async def scenario_onebroker(b: Bench) -> Section:
    """One process, `--broker memory` vs `--broker redis`, in the same run: the CPU (gateway
    and Redis) per delivery of the fan-out step and per settled gift of the settlement step."""
    sec = Section("10. One process: `--broker memory` vs `--broker redis`")
    if not has_option("--broker"):
        sec.body = skipped("--broker", "the Redis broker, branch broker")
        sec.summary = [Row("10. One process", "skipped: no --broker", "n/a")]
        return sec
    cond = b.conditions()
    log(f"[onebroker] {cond}")
    settle_args = scaleout_settle_args()
    shown = ""
    # per broker, per run: µs of CPU per delivery / per settled gift, (gateway, Redis)
    fan: dict[str, list[tuple[float, float]]] = {"memory": [], "redis": []}
    gift: dict[str, list[tuple[float, float]]] = {"memory": [], "redis": []}
    settled: dict[str, list[float]] = {"memory": [], "redis": []}
    money: list[str] = []
    for run in range(RUNS):
        for kind in ("memory", "redis"):  # interleaved: the machine's noise hits both
            svc = Service(b.tmp, f"one{kind}r{run}")
            try:
                gw = svc.add("--broker", kind)
                b.own_pids |= {gw.pid, svc.redis_pid}
                target = svc.target(f"--broker {kind}", gw, [gw, gw])
                target.pids.append(svc.redis_pid)
                step = await scaleout_step(b, target, f"o{kind[0]}{run}")
                window = CpuWindow(target.pids, SCALEOUT_SETTLE_S)
                rep, shown = loadtest(b, svc, settle_args, f"one{kind}-{run}", window.on_line)
                used = window.used_s()
            finally:
                svc.stop()
            pct = step.cpu_by_pid
            dps = step.delivered_dps or float("nan")
            fan[kind].append(
                (
                    pct.get(gw.pid, 0.0) / 100 / dps * 1e6,
                    pct.get(svc.redis_pid, 0.0) / 100 / dps * 1e6,
                )
            )
            gifts = rep["totals"]["gifts_settled_per_s"] * SCALEOUT_SETTLE_S or float("nan")
            gift[kind].append(
                (used.get(gw.pid, 0.0) / gifts * 1e6, used.get(svc.redis_pid, 0.0) / gifts * 1e6)
            )
            settled[kind].append(rep["totals"]["gifts_settled_per_s"])
            money.append(check_status(rep))
            log(
                f"    --broker {kind}: {fan[kind][-1][0]:.2f} + {fan[kind][-1][1]:.2f} µs a "
                f"delivery (gateway + Redis); {gift[kind][-1][0]:.0f} + {gift[kind][-1][1]:.0f} µs "
                f"a settled gift at {settled[kind][-1]:,.0f}/s"
            )

    Part = Callable[[list[tuple[float, float]]], list[float]]

    def total(runs: list[tuple[float, float]]) -> list[float]:
        return [g + r for g, r in runs]

    def gateway(runs: list[tuple[float, float]]) -> list[float]:
        return [g for g, _ in runs]

    def redis_part(runs: list[tuple[float, float]]) -> list[float]:
        return [r for _, r in runs]

    def ratio(figures: dict[str, list[tuple[float, float]]], part: Part = total) -> float:
        memory = med(part(figures["memory"]))[0]
        return med(part(figures["redis"]))[0] / memory if memory else float("nan")

    def line(what: str, figures: dict[str, list[tuple[float, float]]], digits: int) -> list[str]:
        return [
            f"| {what}, gateway + Redis | {mmm(total(figures['memory']), digits)} "
            f"| {mmm(total(figures['redis']), digits)} | {fmt(ratio(figures), 2)}× | ≤ 1.15× "
            f"| {met(ratio(figures) <= 1.15)} |",
            f"| {what}, gateway | {mmm(gateway(figures['memory']), digits)} "
            f"| {mmm(gateway(figures['redis']), digits)} | {fmt(ratio(figures, gateway), 2)}× | | |",
            f"| {what}, Redis | {mmm(redis_part(figures['memory']), digits)} "
            f"| {mmm(redis_part(figures['redis']), digits)} "
            f"| {fmt(ratio(figures, redis_part), 2)}× | | |",
        ]

    sec.summary = [
        Row(
            "10. One process, Redis broker",
            f"CPU µs per {what} (gateway + Redis)",
            fmt(med(total(figures["redis"]))[0], digits),
            "`--broker memory`",
            fmt(med(total(figures["memory"]))[0], digits),
            f"{fmt(ratio(figures), 2)}×",
            "≤ 1.15×",
            met(ratio(figures) <= 1.15),
        )
        for what, figures, digits in (("delivery", fan, 2), ("settled gift", gift, 0))
    ]
    sec.body = [
        f"Conditions: {cond}.",
        "",
        f"One `giftstream serve` process on its own Redis, `--broker memory` then `--broker "
        f"redis`, alternately, {RUNS} time(s). Fan-out: one room, {SCALEOUT_VIEWERS:,} viewers, "
        f"{SENDERS} senders, {SCALEOUT_RATE:g} gifts/s for {SCALEOUT_STEP_S:g} s (the first 1 s "
        f"not measured). Settlement: the load test of scenario 2 (`{' '.join(settle_args)}`), "
        "CPU over its timed run. CPU: the gateway process and Redis (psutil), per room event "
        "delivered and per gift settled.",
        "",
        "| CPU µs per | `--broker memory` | `--broker redis` | redis / memory | target | met |",
        "| --- | --- | --- | --- | --- | --- |",
        *line("delivery (fan-out)", fan, 2),
        *line("settled gift (settlement)", gift, 0),
        f"| gifts settled/s | {mmm(settled['memory'])} | {mmm(settled['redis'])} | | | |",
        "",
        f"Money checks: {', '.join(money)}. Settlement command: `{shown}`. Reproduce: "
        "`BENCH_SCENARIOS=onebroker make bench` (bench/scaleout.py).",
        "",
    ]
    return sec


CLUSTER_SENDERS = int(ENV.get("BENCH_CLUSTER_SENDERS", "50" if SMOKE else "200"))
CLUSTER_S = float(ENV.get("BENCH_CLUSTER_S", "2" if SMOKE else "8"))


async def scenario_cluster(b: Bench) -> Section:
    """Issue 14: settlement on one Redis against a 3-shard Redis Cluster (bench/cluster.py)."""
    sec = Section("11. Settlement on a Redis Cluster: one Redis against 3 shards, CPU per gift")
    cond = b.conditions()
    log(f"[cluster] {cond}")
    results = await asyncio.to_thread(cluster.measure, b.tmp, RUNS, CLUSTER_SENDERS, CLUSTER_S, log)
    sec.body, rows = cluster.render(results, RUNS, CLUSTER_SENDERS, CLUSTER_S, cond)
    sec.summary = [Row(*cells) for cells in rows]
    return sec


# ---- the document -----------------------------------------------------------------------
TITLE = "# Benchmarks"

SUMMARY_HEAD = (
    "| scenario | figure | giftstream | compared with | its figure | ratio | target | met |"
)

AFTER_SUMMARY = """Written by `make bench` (bench/run.py): do not edit by hand, except the section
*How to read this* and the unnumbered sections at the end (benchmarks run by hand, each with
its command), which the runner keeps. Rerun it all with `make bench` (about 25 minutes),
or a subset: `BENCH_SCENARIOS=fanout,settle BENCH_RUNS=3 make bench`. The machine is shared
(2 cores: server, Redis and the load generator on the same cores, and other engineers' test
runs at times), so each section records the load average and the other busy processes before
it ran, and ratios against a peer measured in the same run count more than absolute figures
(DESIGN.md §6)."""

HOW_TO_READ_MARK = "## How to read this"
MACHINE_TITLE = "The machine and the run"


def how_to_read(old: str) -> str:
    """Keep the hand-written section of the existing document, if any."""
    if HOW_TO_READ_MARK in old:
        part = old[old.index(HOW_TO_READ_MARK) :]
        end = part.find("\n## ", len(HOW_TO_READ_MARK))
        return part if end < 0 else part[: end + 1]
    return (ROOT / "bench" / "how_to_read.md").read_text()


def old_sections(old: str) -> dict[str, str]:
    """The numbered scenario sections of the document as it was, by number."""
    found: dict[str, str] = {}
    for part in re.split(r"(?m)^(?=## )", old):
        m = re.match(r"## (\d+)\. ", part)
        if m:
            found[m.group(1)] = part.rstrip() + "\n"
    return found


def hand_sections(old: str) -> list[str]:
    """The sections of benchmarks run by hand (unnumbered: `make bench` does not run them), as
    they are, in their order: the runner puts them after the numbered ones."""
    fixed = (HOW_TO_READ_MARK, f"## {MACHINE_TITLE}")
    return [
        part.rstrip() + "\n"
        for part in re.split(r"(?m)^(?=## )", old)
        if part.startswith("## ")
        and not re.match(r"## \d+\. ", part)
        and part.splitlines()[0] not in fixed
    ]


def old_summary(old: str) -> dict[str, list[str]]:
    """The lines of the table of results of the document as it was, by scenario number (a
    line with no scenario of its own belongs to the one above it)."""
    found: dict[str, list[str]] = {}
    lines = old.splitlines()
    if SUMMARY_HEAD not in lines:
        return found
    number = ""
    for line in lines[lines.index(SUMMARY_HEAD) + 2 :]:
        if not line.startswith("|"):
            break
        m = re.match(r"\| (\d+)\. ", line)
        number = m.group(1) if m else number
        if number:
            found.setdefault(number, []).append(line)
    return found


def table_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def summary_lines(rows: list[Row]) -> list[str]:
    """A section's lines of the table of results; the scenario, the figure and giftstream's
    figure are written once for the rows under them that repeat them (one row per peer)."""
    lines = []
    above = ["", "", ""]
    for row in rows:
        cells = row.cells()
        lead = cells[:3]
        shown = [
            "" if all(lead[j] == above[j] for j in range(i + 1)) else cell
            for i, cell in enumerate(lead)
        ]
        lines.append(table_row(shown + cells[3:]))
        above = lead
    return lines


def summary_table(rows: dict[str, list[str]]) -> list[str]:
    """The table of results that opens the document: its lines by scenario number, in order."""
    return [
        SUMMARY_HEAD,
        table_row(["---"] * (SUMMARY_HEAD.count(" | ") + 1)),
        *(line for no in sorted(rows, key=int) for line in rows[no]),
    ]


def anchor(title: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return "#" + re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def render_doc(old: str, sections: list[Section], machine: dict[str, str], last_run: str) -> str:
    """The document: the table of results, then the method, the machine and each scenario's
    section. A scenario not run this time keeps its section and its lines of the table from
    the document as it was (with its own date and load average), so a subset run updates only
    what it measured."""
    by_no = old_sections(old)
    rows = old_summary(old)
    for sec in sections:
        by_no[sec.number] = "\n".join([f"## {sec.title}", "", *sec.body])
        rows[sec.number] = summary_lines(sec.summary)
    titles = [HOW_TO_READ_MARK[3:], MACHINE_TITLE]
    titles += [by_no[no].splitlines()[0][3:] for no in sorted(by_no, key=int)]
    hand = hand_sections(old)
    titles += [part.splitlines()[0][3:] for part in hand]
    contents = " · ".join(f"[{t.split(':', 1)[0]}]({anchor(t)})" for t in titles)
    lines = [
        TITLE,
        "",
        "Medians of the runs of `make bench`; each scenario's section below gives the spread",
        "(min–max), its conditions and its command.",
        "",
        *summary_table(rows),
        "",
        AFTER_SUMMARY,
        "",
        f"Contents: {contents}",
        "",
        how_to_read(old).rstrip(),
        "",
        f"## {MACHINE_TITLE}",
        "",
        "| | |",
        "| --- | --- |",
        *(f"| {k} | {v} |" for k, v in machine.items()),
        f"| last run | {last_run} |",
        "",
    ]
    for no in sorted(by_no, key=int):
        lines += [by_no[no].rstrip(), ""]
    for part in hand:
        lines += [part.rstrip(), ""]
    return "\n".join(lines).rstrip() + "\n"


def write_doc(b: Bench, elapsed: float, argv: str) -> None:
    """Render the document over the one there is (see render_doc) and write it."""
    try:
        old = OUT.read_text()
    except OSError:
        old = ""
    last_run = (
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {elapsed / 60:.1f} min, "
        f"`{argv}` ({RUNS} run(s) per figure{', SMOKE: small and short' if SMOKE else ''}); "
        "a section it did not run is kept from an earlier run, whose date and load average "
        "it states"
    )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(render_doc(old, b.sections, b.machine, last_run))
    log(f"wrote {OUT}")


async def main() -> int:
    raise_nofile()
    task = asyncio.current_task()
    assert task is not None
    for sig in (signal.SIGINT, signal.SIGTERM):  # stop in order: every child is stopped
        asyncio.get_running_loop().add_signal_handler(sig, task.cancel)
    t0 = time.monotonic()
    log(
        f"make bench: scenarios {','.join(SCENARIOS)}, {RUNS} run(s) each"
        f"{' (smoke)' if SMOKE else ''}; load average {loadavg()}"
    )
    wanted = set(SCENARIOS)
    needs_fleet = (
        bool({"fanout", "fleet"} & wanted)
        or (bool({"broker", "crossgw", "onebroker"} & wanted) and has_option("--broker"))
        or ("workers" in wanted and has_option("--workers"))
    )  # issue 13's scenarios skip, measuring nothing, without the options they measure
    versions = install_peers() if needs_fleet else {}
    with tempfile.TemporaryDirectory(prefix="giftstream-bench-") as tmp:
        b = Bench(Path(tmp), own_pids={os.getpid()})
        b.machine = machine_info(versions)
        runners: dict[str, Callable[[Bench], Awaitable[Section]]] = {
            "fanout": scenario_fanout,
            "settle": scenario_settle,
            "mixed": lambda b: scenario_mixed(b, storm=False),
            "connections": scenario_connections,
            "storm": lambda b: scenario_mixed(b, storm=True),
            "fleet": scenario_fleet,
            "broker": scenario_broker,
            "workers": scenario_workers,
            "crossgw": scenario_crossgw,
            "onebroker": scenario_onebroker,
            "cluster": scenario_cluster,
        }
        for name in NUMBER:
            if name not in SCENARIOS:
                continue
            s0 = time.monotonic()
            try:
                b.sections.append(await runners[name](b))
            except Exception as exc:
                log(f"[{name}] failed: {exc!r}")
                b.sections.append(
                    Section(
                        f"{NUMBER[name]}. {name}: FAILED",
                        [f"Failed: `{exc!r}`", ""],
                        [Row(f"{NUMBER[name]}. {name}", "failed: see its section", "n/a")],
                    )
                )
            log(f"[{name}] {time.monotonic() - s0:.0f} s")
        knobs = " ".join(f"{k}={ENV[k]}" for k in sorted(ENV) if k.startswith("BENCH_"))
        write_doc(b, time.monotonic() - t0, f"{knobs} make bench".strip())
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
