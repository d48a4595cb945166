"""The coordinator: prepares the server (catalog, coins, live rooms), starts the worker
processes, follows their ticks with the live display, ends the run, and holds the result to
the money and delivery checks.

    setup ─> workers connect ─> go (one start time for all) ─> run ─> drain + resolve
          ─> every worker drained ─> quiet ─> finish ─> finals ─> rooms ended ─> checks
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import secrets
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from typing import Any, NoReturn, assert_never

import orjson
from rich.console import Console
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from giftstream.loadtest.api import Api, ApiError, bounded
from giftstream.loadtest.check import (
    Check,
    Outcome,
    check_answers,
    check_deliveries,
    check_redis,
    check_wallets,
)
from giftstream.loadtest.collect import Tally
from giftstream.loadtest.live import Progress
from giftstream.loadtest.messages import (
    Drained,
    Failed,
    Final,
    Ready,
    Tick,
    WorkerMessage,
    client_record,
)
from giftstream.loadtest.plan import Plan, make_plan
from giftstream.loadtest.scenario import SERVER_GIFTS_PER_S, Scenario, Secrets
from giftstream.loadtest.system import ServerSample, ServerWatch, raise_nofile_limit
from giftstream.loadtest.worker import Control, worker_main
from giftstream.server.config import redact_url
from giftstream.server.money.keys import KeySpace
from giftstream.server.money.keys import text as keys_text
from giftstream.server.realtime.auth import Role, mint_token

START_DELAY_S = 0.5  # from "go" to the common start time: every worker is waiting by then
QUIET_S = 1.0  # after every worker drained, for the last room frames to reach every viewer
SAMPLE_S = 1.0


class RunError(RuntimeError):
    """The run could not go on (server unreachable, a worker died); the message says why."""


@dataclass(slots=True)
class RunInfo:
    """What a `before_check` hook gets: enough to find this run's users and wallets."""

    scenario: Scenario
    plan: Plan
    bought: dict[str, int]


@dataclass(slots=True)
class Finals:
    """The workers' final messages merged, with the run's own figures."""

    outcome: Outcome = field(default_factory=Outcome)
    counts: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    closes: dict[str, int] = field(default_factory=dict)
    ack_hist: list[bytes] = field(default_factory=list)
    lag_hist: list[bytes] = field(default_factory=list)
    extra: dict[str, int] = field(default_factory=dict)
    cpu_s: list[float] = field(default_factory=list)  # each worker's, from go to its final
    coordinator_cpu_s: float = 0.0
    wall_s: float = 0.0  # from go to the last final

    def add(self, final: Final) -> None:
        extra = {
            "gifts_resolved_late": final.gifts_resolved_late,
            "storm_dropped": final.storm_dropped,
            "unrecovered": final.unrecovered,
            "connect_failed": final.connect_failed,
        }
        for source, into in (
            (final.counts, self.counts),
            (final.errors, self.errors),
            (final.closes, self.closes),
            (extra, self.extra),
        ):
            for name, value in source.items():
                into[name] = into.get(name, 0) + value
        self.cpu_s.append(final.cpu_s)
        self.ack_hist.append(final.ack_hist)
        self.lag_hist.append(final.lag_hist)
        outcome = self.outcome
        outcome.acks.extend(final.acks)
        outcome.unresolved.extend(final.unresolved)
        outcome.clients.extend(client_record(row) for row in final.clients)
        outcome.add_room_seqs(final.room_seqs)
        outcome.conflicts.extend(final.conflicts)


@dataclass(slots=True)
class RunResult:
    passed: bool
    report: dict[str, Any]


BeforeCheck = Callable[[RunInfo], Awaitable[None]]


CHECKS_BUDGET_S = 600  # buying coins before, the audit and ledger checks after


def time_budget(s: Scenario) -> float:
    """The longest a whole run may take: each phase's own deadline plus room for the setup
    and the checks. Past it the run is stopped as hung, whatever it was waiting for."""
    connect = 120 + s.viewers / max(1, s.workers) / 20
    return connect + START_DELAY_S + s.duration + s.drain + 120 + CHECKS_BUDGET_S


async def run(
    s: Scenario,
    keys: Secrets,
    console: Console,
    *,
    before_check: BeforeCheck | None = None,
    command: list[str] | None = None,
    budget_s: float | None = None,
) -> RunResult:
    """One whole run against the server of `s.url`; the report and whether every check
    passed. Bounded by `time_budget(s)` (or `budget_s`): a run that hangs ends with a
    RunError."""
    budget = time_budget(s) if budget_s is None else budget_s
    bound = asyncio.timeout(budget)
    try:
        async with bound:
            return await _run(s, keys, console, before_check=before_check, command=command)
    except TimeoutError:
        if bound.expired():
            raise RunError(f"the run did not finish within {budget:.0f}s; stopped") from None
        raise


async def _run(
    s: Scenario,
    keys: Secrets,
    console: Console,
    *,
    before_check: BeforeCheck | None,
    command: list[str] | None,
) -> RunResult:
    from giftstream.loadtest.report import build_report, print_summary, write_plot, write_report

    started = time.time()
    run_id = "lt" + secrets.token_hex(3)
    nofile = raise_nofile_limit()
    async with Api(s.admin, keys.webhook) as api:
        try:
            catalog = await api.catalog()
        except ApiError as exc:
            raise RunError(f"cannot read the catalog from {s.admin}: {exc}") from exc
        plan = make_plan(s, catalog, run_id)
        _warn(s, console)
        keyspace = KeySpace(ledger_key=s.ledger_key)  # its ledger key; a cluster's is found
        ledger_from = await _ledger_position(s.redis_url, s.ledger_key)
        console.print(
            f"[bold]giftstream loadtest[/] run {run_id}: {s.viewers} viewers ({s.gifters} "
            f"gifting) in {s.rooms} rooms over {s.workers} workers, {s.duration:g} s, "
            + ("closed loop" if s.closed_loop else f"open loop at {s.gift_rate:g} gifts/s")
            + f" -> {s.url}"
        )
        console.print(
            f"buying {plan.purchases_per_gifter} x {plan.package['id']} for each of "
            f"{len(plan.gifters)} gifters; {s.rooms} creators going live"
        )
        bought = await _fund(api, plan)
        await _set_live(s.url, keys.jwt, plan.creators, live=True)
        try:
            tally, finals, aborted, watch = await _drive(s, plan, keys, console)
        finally:
            with contextlib.suppress(Exception):
                await _set_live(s.url, keys.jwt, plan.creators, live=False)
        if before_check is not None:
            await before_check(RunInfo(s, plan, bought))
        console.print("checking the money and the deliveries ...")
        outcome = finals.outcome
        checks: list[Check] = [check_answers(outcome)]
        wallet_check, money = await check_wallets(api, bought, outcome, plan.creators)
        checks.append(wallet_check)
        checks += await check_redis(
            s.redis_url, keyspace, ledger_from, outcome, set(plan.gifters), bought
        )
        delivery_check, delivery = check_deliveries(outcome)
        checks.append(delivery_check)
    passed = all(c.status != "fail" for c in checks)
    report = build_report(
        s,
        plan,
        tally,
        finals,
        checks,
        money,
        delivery,
        watch,
        passed=passed,
        aborted=aborted,
        started=started,
        nofile=nofile,
        command=command,
    )
    print_summary(console, report)
    if s.report is not None:
        write_report(s.report, report)
        console.print(f"report written to {s.report}")
    if s.plot is not None:
        write_plot(s.plot, report)
        console.print(f"plot written to {s.plot}")
    console.print("[bold green]PASS[/]" if passed else "[bold red]FAIL[/]")
    return RunResult(passed, report)


def _warn(s: Scenario, console: Console) -> None:
    if s.gifters and s.per_gifter_rate > SERVER_GIFTS_PER_S * 0.9:
        console.print(
            f"[yellow]warning:[/] {s.per_gifter_rate:.1f} gifts/s per gifter is near or over "
            f"the server's default {SERVER_GIFTS_PER_S:g}/s per connection: expect "
            "rate_limited; add --gifters"
        )


async def _ledger_position(redis_url: str | None, ledger_key: str) -> dict[str, str] | None:
    """Each ledger's last entry id before the run (one Redis: the one ledger; a cluster:
    every partition's), the empty ones left out: the ledger check reads only after them."""
    if redis_url is None:
        return None
    from redis.exceptions import RedisError

    from giftstream.server.ledger.connect import NoPartitions, open_ledger_redis

    positions: dict[str, str] = {}
    try:
        client, keyspace = await open_ledger_redis(redis_url, ledger_key)
    except (RedisError, OSError, NoPartitions) as exc:
        raise RunError(f"cannot read the ledger at {redact_url(redis_url)}: {exc}") from exc
    try:
        for key in keyspace.ledgers():
            last = await client.xrevrange(key, count=1)
            if last:
                entry_id = last[0][0]
                positions[key] = keys_text(entry_id)
    except (RedisError, OSError) as exc:
        raise RunError(f"cannot read the ledger at {redact_url(redis_url)}: {exc}") from exc
    finally:
        await client.aclose()
    return positions


async def _fund(api: Api, plan: Plan) -> dict[str, int]:
    """Buy each gifter's coins through the real signed purchase API, once per receipt."""
    package = plan.package
    jobs = [(u, i) for u in plan.gifters for i in range(plan.purchases_per_gifter)]

    async def buy(job: tuple[str, int]) -> tuple[str, int]:
        user, i = job
        answer = await api.purchase(f"{user}-r{i}", user, str(package["id"]))
        if answer.get("credited") is not True:
            raise RunError(f"purchase {user}-r{i} was not credited: {answer}")
        return user, int(package["coins"])

    bought = dict.fromkeys(plan.gifters, 0)
    try:
        for user, coins in await bounded(buy, jobs):
            bought[user] += coins
    except ApiError as exc:
        raise RunError(f"cannot buy coins: {exc}") from exc
    return bought


async def _set_live(url: str, jwt_secret: str, creators: list[str], *, live: bool) -> None:
    """Each creator goes live (or ends the live) over its own short connection."""

    async def one(creator: str) -> None:
        token = mint_token(jwt_secret, creator, role=Role.CREATOR, ttl_s=600)
        async with connect(url, proxy=None, compression=None, open_timeout=30) as conn:
            await conn.send(orjson.dumps({"type": "hello", "token": token}), text=True)
            welcome = orjson.loads(await conn.recv(decode=False))
            if welcome.get("type") != "welcome":
                raise RunError(f"creator {creator}: hello answered {welcome}")
            request = (
                {"type": "go_live", "title": f"load test {creator}"}
                if live
                else {"type": "end_live"}
            )
            await conn.send(orjson.dumps(request), text=True)
            answer = orjson.loads(await conn.recv(decode=False))
            if live and answer.get("type") != "live":
                raise RunError(f"creator {creator}: go_live answered {answer}")

    try:
        await bounded(one, creators)
    except ConnectionClosed as exc:
        code = exc.rcvd.code if exc.rcvd is not None else None
        hint = " (the token was refused: is --jwt-secret the server's?)" if code == 4401 else ""
        raise RunError(f"the server at {url} closed a creator's connection: {exc}{hint}") from exc
    except (OSError, TimeoutError) as exc:
        raise RunError(f"cannot reach the server at {url}: {exc}") from exc
    except Exception as exc:
        if isinstance(exc, RunError):
            raise
        raise RunError(f"creators at {url}: {exc!r}") from exc


async def _drive(
    s: Scenario, plan: Plan, keys: Secrets, console: Console
) -> tuple[Tally, Finals, bool, ServerWatch]:
    """Start the workers, follow them to the end, and merge what they report."""
    ctx = multiprocessing.get_context("spawn")
    control = Control.create(ctx)
    procs = [
        ctx.Process(
            target=worker_main,
            args=(plan.for_worker(i, s.workers, s, keys.jwt), control),
            name=f"giftstream-loadtest-{i}",
            daemon=True,
        )
        for i in range(s.workers)
    ]
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[WorkerMessage] = asyncio.Queue()

    def pump() -> None:
        while True:
            message = control.out.get()
            if message is None:
                return
            loop.call_soon_threadsafe(inbox.put_nowait, message)

    reader = threading.Thread(target=pump, name="loadtest-inbox", daemon=True)
    reader.start()
    aborted = False

    def interrupt() -> None:
        nonlocal aborted
        aborted = True
        control.abort.set()

    loop.add_signal_handler(signal.SIGINT, interrupt)
    for proc in procs:
        proc.start()
    try:
        return await _follow(s, control, procs, inbox, console, lambda: aborted)
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        control.abort.set()  # a worker still waiting for go or finish stops now
        for proc in procs:
            await asyncio.to_thread(proc.join, 10)
            if proc.is_alive():
                proc.terminate()
                await asyncio.to_thread(proc.join, 5)
        control.out.put(None)
        reader.join(5)


async def _follow(
    s: Scenario,
    control: Control,
    procs: Sequence[BaseProcess],
    inbox: asyncio.Queue[WorkerMessage],
    console: Console,
    interrupted: Callable[[], bool],
) -> tuple[Tally, Finals, bool, ServerWatch]:
    """Wait for every worker to be ready, give one start time, then take their messages
    until every final is in, showing the progress as it goes."""
    console.print(f"connecting {s.viewers} viewers ...")
    ready = await _await_ready(s, procs, inbox, interrupted)
    connected = sum(r.connected for r in ready)
    failed = sum(r.failed for r in ready)
    console.print(f"{connected} viewers connected" + (f", {failed} failed" if failed else ""))
    if connected == 0:
        raise RunError("no viewer could connect")
    start_ns = (time.time_ns() + int(START_DELAY_S * 1e9)) // 1_000_000 * 1_000_000
    control.start_ns.value = start_ns
    control.go.set()
    cpu_at_go = time.process_time()
    run = _Following(control, len(procs), Tally(start_ns), start_ns + int(s.duration * 1e9))
    dead_since: dict[int, float] = {}
    hard_deadline = time.monotonic() + START_DELAY_S + s.duration + s.drain + 120
    async with ServerWatch(s.server_pid, s.admin) as watch:
        sampler = asyncio.get_running_loop().create_task(_sample_server(watch, run))
        with Progress(console, s.duration) as progress:
            try:
                while len(run.done) < run.workers:
                    message = await _next(inbox, procs, time.monotonic() + 0.5, None)
                    if message is not None:
                        run.take(message)
                    run.advance(interrupted())
                    _check_alive(procs, run.done, dead_since)
                    if time.monotonic() > hard_deadline:
                        control.abort.set()
                        raise RunError("the run did not end in time; workers stopped")
                    elapsed = max(0.0, (time.time_ns() - start_ns) / 1e9)
                    progress.update(run.phase, elapsed, run.tally.now_view(), run.latest)
            finally:
                sampler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampler
    run.finals.coordinator_cpu_s = time.process_time() - cpu_at_go
    run.finals.wall_s = (time.time_ns() - start_ns) / 1e9
    return run.tally, run.finals, interrupted(), watch


async def _await_ready(
    s: Scenario,
    procs: Sequence[BaseProcess],
    inbox: asyncio.Queue[WorkerMessage],
    interrupted: Callable[[], bool],
) -> list[Ready]:
    """Every worker's `Ready`, sent once each of its clients has tried to connect."""
    deadline = time.monotonic() + 120 + s.viewers / max(1, len(procs)) / 20
    ready: dict[int, Ready] = {}
    while len(ready) < len(procs):
        message = await _next(inbox, procs, deadline, "connecting")
        match message:
            case Ready():
                ready[message.worker] = message
            case Failed():
                raise _failed(message)
            case _:
                pass  # nothing else comes before go
        if interrupted():
            raise RunError("interrupted while connecting")
    return list(ready.values())


@dataclass(slots=True)
class _Following:
    """What the coordinator has heard from its workers since go, and the phase it shows."""

    control: Control
    workers: int
    tally: Tally
    end_ns: int
    finals: Finals = field(default_factory=Finals)
    drained: set[int] = field(default_factory=set)
    done: set[int] = field(default_factory=set)  # the workers whose final is in
    finish_at: float | None = None  # monotonic: when to tell every worker to finish
    phase: str = "running"
    latest: ServerSample = field(default_factory=ServerSample)

    def take(self, message: WorkerMessage) -> None:
        match message:
            case Tick():
                self.tally.add_tick(message)
            case Drained():
                self.on_drained(message)
            case Final():
                self.on_final(message)
            case Failed():
                self.on_failed(message)
            case Ready():
                pass  # connecting is over
            case _:
                assert_never(message)

    def on_drained(self, message: Drained) -> None:
        self.drained.add(message.worker)
        self.phase = "draining"
        if len(self.drained) == self.workers:
            self.finish_at = time.monotonic() + QUIET_S

    def on_final(self, message: Final) -> None:
        self.finals.add(message)
        self.done.add(message.worker)

    def on_failed(self, message: Failed) -> NoReturn:
        self.control.abort.set()
        raise _failed(message)

    def advance(self, interrupted: bool) -> None:
        """The phase by the clock: past the end, draining; QUIET_S after every worker
        drained, tell them all to finish."""
        if time.time_ns() >= self.end_ns and self.phase == "running":
            self.phase = "draining"
        if self.finish_at is not None and time.monotonic() >= self.finish_at:
            self.control.finish.set()
            self.phase = "closing"
        if interrupted:
            self.phase = "stopping (Ctrl-C)"


async def _sample_server(watch: ServerWatch, run: _Following) -> None:
    """Every SAMPLE_S: the server's CPU, RSS and its own counters' rates into the tally."""
    before: tuple[float, dict[str, float]] | None = None
    while True:
        latest = run.latest = await watch.sample()
        now = time.monotonic()
        figures: dict[str, Any] = {
            "server_cpu_percent": latest.cpu_percent,
            "server_rss_mb": latest.rss_mb,
        }
        if "connections" in latest.metrics:
            figures["server_connections"] = latest.metrics["connections"]
        if before is not None and latest.metrics:
            for name in ("gifts_settled", "broadcast_deliveries", "slow_consumer_closes"):
                if name in latest.metrics and name in before[1]:
                    rate = (latest.metrics[name] - before[1][name]) / (now - before[0])
                    figures[f"server_{name}_per_s"] = round(rate, 1)
        if latest.metrics:
            before = (now, latest.metrics)
        run.tally.add_server(time.time_ns(), figures)
        await asyncio.sleep(SAMPLE_S)


def _failed(message: Failed) -> RunError:
    return RunError(f"worker {message.worker} failed:\n{message.traceback}")


async def _next(
    inbox: asyncio.Queue[WorkerMessage],
    procs: Sequence[BaseProcess],
    deadline: float,
    waiting: str | None,
) -> WorkerMessage | None:
    """The next worker message; None when none came by `deadline` (an error while
    `waiting` for something), and an error when a worker process died without saying why."""
    try:
        return await asyncio.wait_for(inbox.get(), max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        for index, proc in enumerate(procs):
            if proc.exitcode is not None and proc.exitcode != 0:
                await asyncio.sleep(0.2)  # its Failed message may be on its way
                if not inbox.empty():
                    return inbox.get_nowait()
                raise RunError(f"worker {index} exited with code {proc.exitcode}") from None
        if waiting is not None:
            raise RunError(f"timed out {waiting}") from None
        return None


def _check_alive(
    procs: Sequence[BaseProcess], done: set[int], dead_since: dict[int, float]
) -> None:
    """A worker that exited without its final message (after a grace for messages still on
    their way) ends the run with an error rather than a wait."""
    now = time.monotonic()
    for index, proc in enumerate(procs):
        if index in done or proc.exitcode is None:
            continue
        first = dead_since.setdefault(index, now)
        if now - first > 3.0:
            raise RunError(f"worker {index} exited (code {proc.exitcode}) without its results")
