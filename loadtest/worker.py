"""One load-generating process: its share of the clients (viewers, and the gifters among
them), each a real WebSocket connection, on its own uvloop; it connects them, runs the
gifting, and reports to the coordinator.

The worker speaks to the coordinator through one queue of `loadtest.messages`: `Ready` once
every client has tried to connect, a `Tick` every TICK_S from the start (and once at the
end), `Drained` when every gift is answered or given up on, then `Final` after `finish`, or
`Failed` with a traceback.
"""

from __future__ import annotations

import asyncio
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.context import BaseContext
from multiprocessing.queues import Queue
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event

import uvloop

from giftstream.loadtest import hist
from giftstream.loadtest.client import (
    ABNORMAL_CLOSE,
    CONNECT_ERRORS,
    Client,
    Refused,
    Shared,
)
from giftstream.loadtest.messages import (
    COUNTERS,
    TICK_NS,
    TICK_S,
    Drained,
    Failed,
    Final,
    Ready,
    Tick,
    WorkerMessage,
)
from giftstream.loadtest.plan import WorkerPlan
from giftstream.loadtest.system import raise_nofile_limit

CONNECT_ATTEMPTS = 3
RESOLVE_ROUNDS = 3
RESOLVE_WAIT_S = 5.0


@dataclass(slots=True)
class Control:
    """The coordinator's side of a worker: multiprocessing objects, picklable to spawn."""

    out: Queue[WorkerMessage | None]  # to the coordinator; None only ends its own reader
    go: Event  # start at start_ns
    finish: Event  # every worker drained; close and report
    abort: Event  # stop early (Ctrl-C, a failed worker)
    start_ns: Synchronized[int]

    @classmethod
    def create(cls, ctx: BaseContext) -> Control:
        return cls(
            out=ctx.Queue(),
            go=ctx.Event(),
            finish=ctx.Event(),
            abort=ctx.Event(),
            start_ns=ctx.Value("q", 0),
        )


@dataclass(slots=True)
class Worker:
    """One process's run, start to end: its clients, their schedule, its reports."""

    plan: WorkerPlan
    control: Control
    shared: Shared = field(init=False)
    clients: list[Client] = field(init=False)
    aborted: bool = False  # the coordinator cut the run short
    start_ns: int = 0
    cpu_at_start: float = 0.0
    storm_dropped: int = 0
    connect_failed: int = 0
    _last: dict[str, int] = field(default_factory=dict)  # COUNTERS at the last tick

    def __post_init__(self) -> None:
        self.shared = Shared(self.plan)
        self.clients = [Client(spec, self.shared) for spec in self.plan.clients]

    def tell(self, message: WorkerMessage) -> None:
        self.control.out.put(message)

    # ---- the run ------------------------------------------------------------------------

    async def main(self) -> None:
        index = self.plan.index
        shared = self.shared
        await self.connect_all()
        connected = sum(1 for c in self.clients if c.conn is not None)
        self.tell(Ready(index, connected, self.connect_failed))
        if not await self.wait_event(self.control.go, 600):
            return
        self.start_ns = int(self.control.start_ns.value)
        self.cpu_at_start = time.process_time()
        end_ns = self.start_ns + int(self.plan.duration * 1e9)
        ticker = asyncio.get_running_loop().create_task(self.ticker())
        gifting = [self.gifter_task(c, end_ns) for c in self.clients if c.spec.gifter >= 0]
        gifters = asyncio.gather(*gifting)
        await self.sleep_until(self.start_ns)
        for client in self.clients:
            if client.spec.slow and client.conn is not None:
                client.conn.on_close = None  # checked at the end, not rejoined
                client.conn.pause_reading()  # the server sees its backlog grow
        if self.plan.storm_at is not None:
            shared.spawn(self.storm(self.start_ns + int(self.plan.storm_at * 1e9)))
        await self.sleep_until(end_ns)
        shared.stopping = True
        await gifters
        await self.drain()
        await self.resolve()
        self.tell(Drained(index))
        await self.wait_event(self.control.finish, 120)
        shared.finishing = True
        await self.check_slow_readers()
        ticker.cancel()
        self.send_tick()  # the last counts, receipts and acks
        await self.close_all()
        self.tell(self.final())

    async def gifter_task(self, client: Client, end_ns: int) -> None:
        if self.plan.closed_loop:
            await self.sleep_until(self.start_ns)
            await client.gift_closed_loop(end_ns, self.plan.think_time)
            return
        interval_ns = int(self.plan.interval * 1e9)
        await client.gift_open_loop(self.start_ns, end_ns, interval_ns)

    async def wait_event(self, event: Event, limit_s: float) -> bool:
        """Wait for a coordinator event; False if it never came or the run was aborted."""
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            if await asyncio.to_thread(event.wait, 0.2):
                return True
            if self.control.abort.is_set():
                self.aborted = self.shared.stopping = True
                return event.is_set()
        return False

    async def sleep_until(self, wall_ns: int) -> None:
        """Sleep to a wall-clock time, waking early when the coordinator aborts the run."""
        while not self.aborted:
            delay = (wall_ns - time.time_ns()) / 1e9
            if delay <= 0:
                return
            await asyncio.sleep(min(delay, 0.25))
            if self.control.abort.is_set():
                self.aborted = self.shared.stopping = True

    async def connect_all(self) -> None:
        gate = asyncio.Semaphore(self.plan.connect_concurrency)

        async def one(client: Client) -> None:
            async with gate:
                for attempt in range(CONNECT_ATTEMPTS):
                    try:
                        await client.connect(since=None)
                        client.rec.status = "slow" if client.spec.slow else "intact"
                        return
                    except (*CONNECT_ERRORS, Refused) as exc:
                        self.shared.errors[f"connect:{type(exc).__name__}:{exc}"[:80]] += 1
                        await asyncio.sleep(0.2 * (attempt + 1))
                client.rec.status = "failed"
                self.connect_failed += 1

        budget = 60 + len(self.clients) / 20
        try:
            async with asyncio.timeout(budget):
                await asyncio.gather(*(one(c) for c in self.clients))
        except TimeoutError:
            for client in self.clients:
                if client.conn is None and client.rec.status == "connecting":
                    client.rec.status = "failed"
                    self.connect_failed += 1

    async def storm(self, at_ns: int) -> None:
        """Drop the chosen viewers together; each rejoins with `since` after its delay."""
        await self.sleep_until(at_ns)
        if self.shared.stopping:
            return
        for client in self.clients:
            delay = client.spec.storm_delay
            if delay is not None and client.conn is not None:
                client.drop()
                self.storm_dropped += 1
                self.shared.spawn(client.rejoin(delay))

    async def ticker(self) -> None:
        """A tick every TICK_S from the start until cancelled at finish."""
        k = 1
        while True:
            await self.sleep_until(self.start_ns + k * TICK_NS)
            if self.aborted:  # off the schedule now: keep reporting while winding down
                await asyncio.sleep(TICK_S)
            self.send_tick()
            k += 1

    def send_tick(self) -> None:
        """What happened since the last tick: the counters' deltas, and the receipts, acks
        and ack latencies gathered since, handed over and started afresh."""
        shared = self.shared
        totals = {name: getattr(shared, name) for name in COUNTERS}
        counts = {name: total - self._last.get(name, 0) for name, total in totals.items()}
        self._last = totals
        receipts: list[tuple[tuple[str, ...], bytes]]
        receipts = [((event,), times.tobytes()) for event, times in shared.receipts.items()]
        receipts += [(f.gift_ids, times.tobytes()) for f, times in shared.frame_receipts.items()]
        tick = Tick(
            worker=self.plan.index,
            t_ns=time.time_ns(),
            counts=counts,
            ack_hist=hist.encode(shared.tick_hist),
            acks=shared.new_acks,
            receipts=receipts,
            connections=sum(1 for c in self.clients if c.conn is not None),
            errors=sum(shared.errors.values()) + sum(shared.closes.values()),
            pending=sum(len(c.pending) for c in self.clients),
        )
        shared.receipts = {}
        shared.frame_receipts = {}
        shared.new_acks = []
        shared.tick_hist = hist.new()
        self.tell(tick)

    async def drain(self) -> None:
        """Wait (up to `drain` s) for the answers to gifts still in flight."""
        await poll(lambda: not any(c.pending for c in self.clients), self.plan.drain)

    async def resolve(self) -> None:
        """Learn the fate of every gift still unanswered (dropped line, `internal`): re-send
        the same key, which the server answers with the first result or settles now. Their
        answers are not timed: they are there to make the money check exact."""
        for _ in range(RESOLVE_ROUNDS):
            todo = [c for c in self.clients if c.pending or c.uncertain]
            if not todo:
                return
            for client in todo:
                client.pending.update(client.uncertain)
                client.uncertain.clear()
                for pending in client.pending.values():
                    pending.late = True
                if client.conn is None:
                    await client.rejoin(0)  # which re-sends what is pending
                else:
                    await client.resend(list(client.pending.values()))
            await poll(lambda: not any(c.pending for c in self.clients), RESOLVE_WAIT_S)

    async def check_slow_readers(self) -> None:
        """Read what each slow reader left unread, to see whether the server closed it (4008,
        or cut off, 1006, when the close frame could not get through the backlog)."""

        async def one(client: Client) -> None:
            conn = client.conn
            if conn is None:
                client.slow_outcome = "gone"
                return
            heard = [time.monotonic()]
            conn.handle(lambda raw: heard.__setitem__(0, time.monotonic()), lambda link: None)
            conn.resume_reading()
            deadline = heard[0] + 5
            while not conn.closed.done():
                now = time.monotonic()
                if now >= deadline or now - heard[0] >= 1.0:  # quiet for a second: still open
                    client.slow_outcome = "open"
                    return
                await asyncio.wait([conn.closed], timeout=0.1)
            code = conn.close_code if conn.close_code is not None else ABNORMAL_CLOSE
            client.slow_outcome = f"closed_{code}"
            client.conn = None

        await asyncio.gather(*(one(c) for c in self.clients if c.spec.slow))

    async def close_all(self) -> None:
        conns = [c.conn for c in self.clients if c.conn is not None]
        for task in list(self.shared.tasks):
            task.cancel()
        try:
            async with asyncio.timeout(5):
                await asyncio.gather(*(conn.close() for conn in conns), return_exceptions=True)
        except TimeoutError:
            pass
        for conn in conns:
            conn.abort()

    def final(self) -> Final:
        shared = self.shared
        unresolved = [
            (c.spec.user, p.key, p.cost)
            for c in self.clients
            for p in (*c.pending.values(), *c.uncertain.values())
        ]
        return Final(
            worker=self.plan.index,
            counts={name: getattr(shared, name) for name in COUNTERS},
            gifts_resolved_late=shared.gifts_resolved_late,
            storm_dropped=self.storm_dropped,
            unrecovered=shared.unrecovered,
            connect_failed=self.connect_failed,
            cpu_s=time.process_time() - self.cpu_at_start,
            acks=shared.acks,
            unresolved=unresolved,
            clients=[c.summary() for c in self.clients],
            room_seqs=shared.room_seqs,
            conflicts=shared.conflicts,
            errors=dict(shared.errors),
            closes=dict(shared.closes),
            ack_hist=hist.encode(shared.ack_hist),
            lag_hist=hist.encode(shared.lag_hist),
        )


async def poll(done: Callable[[], bool], limit_s: float, every_s: float = 0.05) -> bool:
    """Check `done` every `every_s` until it holds or `limit_s` passes; whether it held."""
    for _ in range(int(limit_s / every_s) + 1):
        if done():
            return True
        await asyncio.sleep(every_s)
    return done()


def worker_main(plan: WorkerPlan, control: Control) -> None:
    """The process entry point (multiprocessing spawn): its own uvloop, no Ctrl-C of its own
    (the coordinator stops it through `abort`), every failure reported, never swallowed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise_nofile_limit()
    try:
        uvloop.run(Worker(plan, control).main())
    except BaseException:
        control.out.put(Failed(plan.index, traceback.format_exc()))
        raise
