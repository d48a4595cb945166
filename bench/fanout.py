"""Scenario 1, fan-out: one room, N viewers, 20 senders, driven by the Node client fleet
(bench/peers/fleet.js) against giftstream and against each peer. The gift rate is stepped up
(open loop) and each step measures room events delivered per second and the send-to-screen
p99; the result is the highest delivered/s of a step whose p99 stays <= 100 ms.

Send-to-screen = the viewer's receipt time - the gift's due time in the senders' schedule.
The peers carry the due time in the event (`sent`); giftstream's protocol has no such field,
so its senders map key -> due time, learn the event id from `gift_ok`, and the viewers'
processes join their receipts to it by event id (as `giftstream loadtest` does).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]

from bench.procs import NODE_DIR, PEERS_SRC, raise_nofile
from giftstream.loadtest.api import Api, bounded
from giftstream.server.realtime.auth import Role, mint_token

P99_LIMIT_MS = 100.0
BUCKET_MS = 0.1
MAX_BUCKET = 100000  # fleet.js: the overflow bucket (>= 10 s, or never matched)


def now_ms() -> float:
    return time.time() * 1000.0


@dataclass
class Target:
    """A server under test, as the fleet speaks to it."""

    name: str  # giftstream, ws, socket.io, python-socketio
    mode: str  # fleet protocol: gs, ws, sio
    url: str
    pids: list[int]  # server processes whose CPU is reported (giftstream: server + Redis)
    jwt_secret: str | None = None
    admin_url: str | None = None
    webhook_secret: str | None = None
    max_gifts_per_s: float = math.inf  # giftstream: 20 gifts/s per connection (Limits)
    # several gateways: viewer process p connects to viewer_urls[p % len]; senders to `url`
    viewer_urls: list[str] | None = None


@dataclass
class Step:
    offered_dps: float
    gifts_per_s: float
    delivered_dps: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    unmatched: int
    server_cpu: float  # % of one core over the measured window
    fleet_cpu: float
    errors: dict[str, int]
    ok: bool
    frames_per_s: float = 0.0  # room frames read by the viewers
    slack_dps: float = 0.0  # two gifts' worth of deliveries over the window: rounding at low rates
    cpu_by_pid: dict[int, float] = field(default_factory=dict)  # server_cpu, process by process

    @property
    def keeps_up(self) -> bool:
        """Delivered at least 90% of what was offered (less two gifts' worth), no errors."""
        return self.delivered_dps >= 0.9 * self.offered_dps - self.slack_dps and not self.errors


@dataclass
class LadderResult:
    target: str
    viewers: int
    steps: list[Step] = field(default_factory=list)
    connect_s: float = 0.0
    failed_connects: int = 0

    @property
    def best(self) -> Step | None:
        passing = [s for s in self.steps if s.ok]
        return max(passing, key=lambda s: s.delivered_dps) if passing else None

    @property
    def ceiling(self) -> Step | None:
        """The highest delivered/s of a step that kept up (>= 90% of the offered), any p99."""
        up = [s for s in self.steps if s.keeps_up]
        return max(up, key=lambda s: s.delivered_dps) if up else None


class Node:
    """One fleet process; commands and answers are JSON lines."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.ps = psutil.Process(proc.pid)

    @classmethod
    async def start(cls, cfg: dict[str, Any], cfg_path: Path) -> Node:
        cfg_path.write_text(json.dumps(cfg))  # noqa: ASYNC240  (small, local, once)
        proc = await asyncio.create_subprocess_exec(
            "node",
            str(PEERS_SRC / "fleet.js"),
            str(cfg_path),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env={"NODE_PATH": str(NODE_DIR / "node_modules"), "PATH": "/usr/bin:/bin"},
            preexec_fn=raise_nofile,
            limit=64 << 20,
        )
        return cls(proc)

    async def read(self, timeout: float = 120.0) -> dict[str, Any]:  # noqa: ASYNC109
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise RuntimeError(f"fleet process {self.proc.pid} ended ({self.proc.returncode})")
        answer: dict[str, Any] = json.loads(line)
        if "fatal" in answer:
            raise RuntimeError(f"fleet process: {answer['fatal']}")
        return answer

    async def cmd(self, obj: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:  # noqa: ASYNC109
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(obj).encode() + b"\n")
        await self.proc.stdin.drain()
        return await self.read(timeout)

    def cpu_s(self) -> float:
        try:
            t = self.ps.cpu_times()
            return float(t.user + t.system)
        except psutil.Error:
            return 0.0

    async def exit(self) -> None:
        if self.proc.returncode is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(b'{"cmd":"exit"}\n')
                await self.proc.stdin.drain()
                await asyncio.wait_for(self.proc.wait(), 10)
            except (TimeoutError, ConnectionError):
                self.proc.kill()
                await self.proc.wait()


def cpu_each(pids: Sequence[int]) -> dict[int, float]:
    """CPU seconds used so far by each of `pids` still running."""
    found = {}
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            found[pid] = float(t.user + t.system)
        except psutil.Error:
            pass
    return found


def cpu_of(pids: list[int]) -> float:
    return sum(cpu_each(pids).values())


def percentile(hist: dict[int, int], q: float) -> float:
    total = sum(hist.values())
    if total == 0:
        return math.nan
    rank = math.ceil(q * total)
    seen = 0
    for bucket in sorted(hist):
        seen += hist[bucket]
        if seen >= rank:
            return math.inf if bucket >= MAX_BUCKET else (bucket + 1) * BUCKET_MS
    return math.inf


async def _go_live(target: Target, creator: str) -> None:
    from websockets.asyncio.client import connect

    token = mint_token(target.jwt_secret or "", creator, role=Role.CREATOR, ttl_s=3600)
    async with connect(target.url, compression=None, open_timeout=30) as conn:
        await conn.send(json.dumps({"type": "hello", "token": token}))
        welcome = json.loads(await conn.recv())
        if welcome.get("type") != "welcome":
            raise RuntimeError(f"creator hello answered {welcome}")
        await conn.send(json.dumps({"type": "go_live", "title": "bench fan-out"}))
        answer = json.loads(await conn.recv())
        if answer.get("type") != "live":
            raise RuntimeError(f"go_live answered {answer}")


async def _fund(target: Target, users: list[str]) -> None:
    """Coins through the real signed purchase API (one 17,500-coin package per sender)."""
    assert target.admin_url and target.webhook_secret
    async with Api(target.admin_url, target.webhook_secret) as api:
        catalog = await api.catalog()
        package = max(catalog["packages"], key=lambda p: p["coins"])["id"]

        async def buy(user: str) -> None:
            answer = await api.purchase(f"{user}-r0", user, package)
            if answer.get("credited") is not True:
                raise RuntimeError(f"purchase for {user}: {answer}")

        await bounded(buy, users)


async def ladder(
    target: Target,
    *,
    viewers: int,
    senders: int,
    run_id: str,
    tmp: Path,
    start_dps: float,
    factor: float,
    step_s: float,
    warm_s: float,
    max_steps: int,
    coarse: float | None = None,
    viewer_procs: int,
    log: Any = print,
) -> LadderResult:
    """Connect a fresh fleet to `target`, step the rate up until a step fails, disconnect."""
    room = "benchroom"
    result = LadderResult(target.name, viewers)
    base = {"mode": target.mode, "url": target.url, "room": room, "run": run_id, "max_s": 900}
    vtokens: list[str] = []
    stokens: list[str] = []
    if target.mode == "gs":
        assert target.jwt_secret
        room = f"fo{run_id}"
        base["room"] = room
        await _go_live(target, room)
        vtokens = [
            mint_token(target.jwt_secret, f"fv{run_id}-{i}", ttl_s=3600) for i in range(viewers)
        ]
        susers = [f"fs{run_id}-{i}" for i in range(senders)]
        await _fund(target, susers)
        stokens = [mint_token(target.jwt_secret, u, ttl_s=3600) for u in susers]
    nodes: list[Node] = []
    try:
        per = math.ceil(viewers / viewer_procs)
        for p in range(viewer_procs):
            first, count = p * per, min(per, viewers - p * per)
            if count <= 0:
                break
            cfg = {
                **base,
                "role": "viewer",
                "url": target.viewer_urls[p % len(target.viewer_urls)]
                if target.viewer_urls
                else target.url,
                "first": first,
                "count": count,
                "prefix": f"v{run_id}-",
                "tokens": vtokens,
                "concurrency": 100,
            }
            nodes.append(await Node.start(cfg, tmp / f"fleet-v{p}.json"))
        scfg = {
            **base,
            "role": "sender",
            "first": 0,
            "count": senders,
            "prefix": f"s{run_id}-",
            "tokens": stokens,
            "concurrency": senders,
        }
        sender = await Node.start(scfg, tmp / "fleet-s.json")
        nodes.append(sender)
        t0 = time.monotonic()
        readies = await asyncio.gather(*(n.read(timeout=180) for n in nodes))
        result.connect_s = time.monotonic() - t0
        result.failed_connects = sum(r["failed"] for r in readies)
        if result.failed_connects:
            errs = {r.get("error") for r in readies if r.get("error")}
            raise RuntimeError(f"{target.name}: {result.failed_connects} connects failed: {errs}")
        viewers_nodes = nodes[:-1]
        fleet_pids = [n.proc.pid for n in nodes]
        all_sends: dict[str, float] = {}

        async def step(dps: float) -> Step:
            gps = min(dps / viewers, target.max_gifts_per_s)
            offered = gps * viewers
            start = now_ms() + 100
            until = start + step_s * 1000
            await sender.cmd({"cmd": "rate", "rate": gps, "start": start, "until": until})
            w0 = start + warm_s * 1000
            await asyncio.sleep(max(0.0, (w0 - now_ms()) / 1000))
            cpu_s0, cpu_f0, wall0 = cpu_each(target.pids), cpu_of(fleet_pids), time.monotonic()
            await asyncio.sleep(max(0.0, (until - now_ms()) / 1000))
            cpu_s1, cpu_f1, wall1 = cpu_each(target.pids), cpu_of(fleet_pids), time.monotonic()
            await asyncio.sleep(0.3)  # answers and frames still in flight
            sent = await sender.cmd({"cmd": "sends"})
            all_sends.update(sent["sends"])
            recent = {k: v for k, v in all_sends.items() if v >= w0 - 5000}
            answers = await asyncio.gather(
                *(
                    n.cmd({"cmd": "stats", "t0": w0, "t1": until, "sends": recent})
                    for n in viewers_nodes
                )
            )
            hist: dict[int, int] = {}
            deliveries = unmatched = 0
            for a in answers:
                deliveries += a["deliveries"]
                unmatched += a["unmatched"]
                for b, c in a["hist"].items():
                    hist[int(b)] = hist.get(int(b), 0) + c
            if unmatched:  # latency unknown: count it as too late, never as fast
                hist[MAX_BUCKET] = hist.get(MAX_BUCKET, 0) + unmatched
            window_s = (until - w0) / 1000
            wall = wall1 - wall0
            s = Step(
                offered_dps=offered,
                gifts_per_s=gps,
                delivered_dps=deliveries / window_s,
                p50_ms=percentile(hist, 0.50),
                p99_ms=percentile(hist, 0.99),
                max_ms=max((a["max_ms"] for a in answers), default=math.nan),
                unmatched=unmatched,
                server_cpu=100 * (sum(cpu_s1.values()) - sum(cpu_s0.values())) / wall,
                fleet_cpu=100 * (cpu_f1 - cpu_f0) / wall,
                errors=sent.get("errors") or {},
                ok=False,
                slack_dps=2 * viewers / window_s,
                frames_per_s=sum(a.get("frames", 0) for a in answers) / window_s,
                cpu_by_pid={p: 100 * (c - cpu_s0.get(p, c)) / wall for p, c in cpu_s1.items()},
            )
            s.ok = s.p99_ms <= P99_LIMIT_MS and s.keeps_up
            result.steps.append(s)
            log(
                f"    {target.name:16} {viewers:5d} viewers  offered {offered:9,.0f}/s "
                f"({gps:6.1f} gifts/s)  delivered {s.delivered_dps:9,.0f}/s  "
                f"p50 {s.p50_ms:6.1f}  p99 {s.p99_ms:7.1f} ms  server {s.server_cpu:4.0f}%"
                f"  fleet {s.fleet_cpu:4.0f}%  {'ok' if s.ok else 'FAIL'}"
                + (f"  errors {s.errors}" if s.errors else "")
            )
            await asyncio.sleep(0.2)
            return s

        # coarse (x `coarse`) from start_dps until a step fails, then fine (x `factor`) from
        # the last passing coarse step until a step fails. While no step has met the p99
        # bound, the coarse phase goes on as long as the server still delivers >= 90% of
        # what is offered, to find its throughput ceiling (result.ceiling).
        steps_left = max_steps
        dps = start_dps
        last_ok: float | None = None
        # A failing step after a passing one is run once more before the ladder stops: near
        # the bound one noisy second on a shared machine must not end it.
        for phase_factor in (coarse, factor) if coarse else (factor,):
            if phase_factor is factor and coarse:
                if last_ok is None:
                    break
                dps = last_ok * factor
            retried = False
            while steps_left > 0:
                steps_left -= 1
                s = await step(dps)
                if s.ok:
                    last_ok = dps
                    retried = False
                    if s.gifts_per_s >= target.max_gifts_per_s:
                        steps_left = 0
                        break
                elif last_ok is not None and not retried:
                    retried = True
                    continue
                elif last_ok is None and not coarse:
                    dps /= 1.3  # a later run that starts too high: step down to a good step
                    continue
                elif not (last_ok is None and phase_factor is coarse and s.keeps_up):
                    break
                dps *= phase_factor
    finally:
        await asyncio.gather(*(n.exit() for n in nodes), return_exceptions=True)
    return result
