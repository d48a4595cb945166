"""One load-generating process: its share of the viewers (and of the gifters among them), each
a real WebSocket connection, on its own uvloop.

Timing: every timestamp is `time.time_ns()` (CLOCK_REALTIME), which all processes on one
machine share, so a gift's send time taken in one worker and a viewer's receipt taken in
another subtract into a true send-to-screen latency. The worker only records; the
coordinator joins the two (see loadtest/collect.py).

The worker speaks to the coordinator through one queue of small messages:
  ("ready", index, connected, failed)     once every client has tried to connect
  ("tick", index, {...})                  every TICK_S from the start, and once at the end;
                                          receipts as [(gift event ids of a frame, times)]
  ("drained", index)                      gifting over, every gift answered or given up on
  ("final", index, {...})                 after `finish`, with everything the checks need
  ("failed", index, traceback)
"""

from __future__ import annotations

import asyncio
import itertools
import random
import signal
import socket
import time
import traceback
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import uvloop
from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from giftstream.loadtest import hist
from giftstream.loadtest.link import Link, open_link
from giftstream.loadtest.plan import COUNT_WEIGHTS, COUNTS, ClientSpec, WorkerPlan
from giftstream.loadtest.system import raise_nofile_limit
from giftstream.server.realtime.auth import Role, mint_token

TICK_S = 0.5
TICK_NS = int(TICK_S * 1e9)
CONNECT_ATTEMPTS = 3
REJOIN_ATTEMPTS = 5
RESOLVE_ROUNDS = 3
RESOLVE_WAIT_S = 5.0
ANSWER_TIMEOUT_S = 10.0  # closed loop: give up waiting for one answer (the gift stays pending)
SLOW_READER_RCVBUF = 4096  # a reader that stops reading fills a small window fast
# Errors after which the gift may have settled: resolved by re-sending its key at the end.
UNCERTAIN_CODES = frozenset({"internal"})
# Refusals the money script gives after it has looked the key up: final even for a key sent
# before (a settled key is answered gift_ok instead). Any other refusal of a re-sent key
# (rate_limited above all, given before the key is looked at) leaves it uncertain: its first
# send, on a line that then dropped, may have settled.
SCRIPT_REFUSALS = frozenset({"insufficient_coins", "spending_limit", "underage", "key_reused"})
# Server frames that are the same bytes for every viewer of a room: decoded once per worker.
ROOM_FRAME_PREFIXES = (
    b'{"type":"batch"',
    b'{"type":"gift","room"',
    b'{"type":"viewers"',
    b'{"type":"room_ended"',
)
_CONNECT_ERRORS = (OSError, InvalidHandshake, ConnectionClosed, TimeoutError)

# Counters sent as deltas in every tick, summed over a run in the final message.
COUNTERS = (
    "gifts_sent",
    "gifts_acked",
    "gifts_refused",
    "gifts_skipped_offline",
    "out_of_coins",
    "frames",
    "events",
    "gift_events",
    "reconnects",
    "duplicate_answers",
)


@dataclass(frozen=True, slots=True, eq=False)
class RoomFrame:
    """A room frame (one event or a batch) digested once per worker: every viewer of the room
    gets the same bytes, so what each viewer must do with it is worked out once."""

    events: tuple[dict[str, Any], ...]
    first_seq: int
    last_seq: int
    contiguous: bool  # seqs one apart: a viewer at first_seq - 1 takes it whole
    gift_ids: tuple[str, ...]

    @classmethod
    def of(cls, parsed: dict[str, Any]) -> RoomFrame:
        raw = parsed.get("events", ()) if parsed.get("type") == "batch" else (parsed,)
        events = tuple(e for e in raw if isinstance(e, dict) and type(e.get("seq")) is int)
        seqs = [e["seq"] for e in events]
        return cls(
            events=events,
            first_seq=seqs[0] if seqs else 0,
            last_seq=seqs[-1] if seqs else 0,
            contiguous=bool(seqs) and all(b == a + 1 for a, b in itertools.pairwise(seqs)),
            gift_ids=tuple(e["event"] for e in events if e.get("type") == "gift"),
        )


class Refused(Exception):
    """The server answered a handshake step with something other than its success reply."""


@dataclass(slots=True)
class Pending:
    """A gift sent and not yet answered; re-sent with the same key after a drop."""

    key: str
    gift: str
    count: int
    cost: int
    intended_ns: int  # when it was meant to go: latency is measured from here
    payload: bytes
    late: bool = False  # re-sent after the run to learn its fate: not timed
    sends: int = 0  # how many times it went out: after the first, a refusal may not be final
    waiter: asyncio.Future[None] | None = None


@dataclass(slots=True)
class Record:
    """What one viewer connection saw, for the delivery check."""

    start_seq: int | None = None
    last_seq: int | None = None
    gift_events: int = 0
    gaps: int = 0
    missing: int = 0  # seq numbers skipped over in gaps
    disorder: int = 0  # events at or below the last seq (duplicates, reordering)
    status: str = "connecting"  # intact | slow | unrecovered | lost | failed


class Client:
    """One viewer connection (a gifter is a viewer that also sends gifts)."""

    def __init__(self, spec: ClientSpec, worker: Worker) -> None:
        self.spec = spec
        self.w = worker
        self.conn: Link | None = None
        self.rec = Record()
        self.pending: dict[str, Pending] = {}
        self.uncertain: dict[str, Pending] = {}
        self.answered: dict[str, str] = {}  # key -> event, to catch two answers that differ
        self.balance = 0  # coins, by the client's own count (welcome less what is in flight)
        self.sent = 0
        self.rng = random.Random(spec.seed)
        self.dropping = False
        self.slow_outcome: str | None = None
        self.token = mint_token(
            worker.plan.jwt_secret, spec.user, role=Role.VIEWER, ttl_s=worker.plan.token_ttl_s
        )

    # ---- connection -----------------------------------------------------------------------

    async def connect(self, since: int | None) -> None:
        """Open, hello, join (with `since` after a drop) and start reading."""
        w = self.w
        sock = None
        if self.spec.slow:
            sock = await w.small_window_socket()
        conn = await open_link(w.plan.ws_url, sock=sock)
        try:
            async with asyncio.timeout(30):
                conn.send_text(orjson.dumps({"type": "hello", "token": self.token}))
                welcome = orjson.loads(await conn.recv())
                if welcome.get("type") != "welcome":
                    raise Refused(f"hello answered {welcome.get('code') or welcome.get('type')}")
                join: dict[str, Any] = {"type": "join", "room": self.spec.room}
                if since is not None:
                    join["since"] = since
                conn.send_text(orjson.dumps(join))
                joined = orjson.loads(await conn.recv())
                if joined.get("type") != "joined":
                    raise Refused(f"join answered {joined.get('code') or joined.get('type')}")
        except BaseException:
            conn.abort()
            raise
        if since is None:
            self.rec.start_seq = self.rec.last_seq = int(joined["seq"])
            self.balance = int(welcome["coins"])
        elif joined.get("recovered") is False:
            self.rec.status = "unrecovered"  # history no longer reaches `since`: told, not hidden
            w.unrecovered += 1
        self.conn = conn
        self.dropping = False  # before handle(): a link already lost must count as a drop
        conn.handle(self.on_message, self.on_closed)

    def on_message(self, raw: bytes) -> None:
        now = time.time_ns()
        w = self.w
        w.frames += 1
        try:
            msg = w.decode(raw)
            if type(msg) is RoomFrame:
                self.on_frame(msg, now)
                return
            kind = msg.get("type")
            if kind == "gift_ok":
                self.on_gift_ok(msg, now)
            elif kind == "error":
                self.on_error(msg)
        except Exception as exc:  # a generator bug: shown in the errors, not as a server drop
            w.errors[f"generator:{type(exc).__name__}"] += 1

    def on_closed(self, conn: Link) -> None:
        """A connection ended that we did not end: count its close code and rejoin with
        `since`, as the protocol tells a client to."""
        w = self.w
        if w.finishing or self.dropping or conn is not self.conn:
            return
        code = conn.close_code if conn.close_code is not None else 1006
        w.closes[str(code)] += 1
        self.conn = None
        w.spawn(self.rejoin(self.rng.uniform(0.1, 0.5)))

    async def rejoin(self, delay: float) -> bool:
        """Reconnect and `join` with `since` = the last seq seen; re-send unanswered gifts."""
        w = self.w
        await asyncio.sleep(delay)
        for attempt in range(REJOIN_ATTEMPTS):
            if w.finishing:
                return False
            try:
                await self.connect(since=self.rec.last_seq)
            except (*_CONNECT_ERRORS, Refused) as exc:
                w.errors[f"rejoin:{type(exc).__name__}"] += 1
                await asyncio.sleep(0.2 * (attempt + 1) + self.rng.random() * 0.3)
                continue
            w.reconnects += 1
            await self.resend(list(self.pending.values()))
            return True
        self.rec.status = "lost"
        self.dropping = False
        return False

    def drop(self) -> None:
        """Cut the connection as a lost network would: no close frame."""
        if self.conn is not None:
            self.dropping = True
            self.conn.abort()
            self.conn = None

    # ---- what arrives -------------------------------------------------------------------

    def on_frame(self, frame: RoomFrame, now: int) -> None:
        """The common case in O(1): the frame follows on from the last seq seen. Anything
        else (a gap, an overlap after a rejoin) goes event by event."""
        rec = self.rec
        last = rec.last_seq
        if not frame.contiguous or (last is not None and frame.first_seq != last + 1):
            for event in frame.events:
                self.on_event(event, now)
            return
        w = self.w
        rec.last_seq = frame.last_seq
        w.events += len(frame.events)
        gifts = len(frame.gift_ids)
        if gifts:
            w.gift_events += gifts
            rec.gift_events += gifts
            times = w.frame_receipts.get(frame)
            if times is None:
                times = w.frame_receipts[frame] = array("q")
            times.append(now)

    def on_event(self, event: dict[str, Any], now: int) -> None:
        w = self.w
        rec = self.rec
        seq = event["seq"]
        last = rec.last_seq
        if last is not None and seq != last + 1:
            if seq <= last:
                rec.disorder += 1  # a duplicate or a step back: counted here, not delivered
                return
            rec.gaps += 1
            rec.missing += seq - last - 1
        rec.last_seq = seq
        w.events += 1
        if event["type"] == "gift":
            w.gift_events += 1
            rec.gift_events += 1
            event_id = event["event"]
            times = w.receipts.get(event_id)
            if times is None:
                times = w.receipts[event_id] = array("q")
            times.append(now)

    def on_gift_ok(self, msg: dict[str, Any], now: int) -> None:
        key = msg["key"]
        event = msg["event"]
        first = self.answered.setdefault(key, event)
        if first != event and len(self.w.conflicts) < 20:
            self.w.conflicts.append(f"key {key} answered {first} then {event}")
        pending = self.pending.pop(key, None) or self.uncertain.pop(key, None)
        if pending is None:
            self.w.duplicate_answers += 1
            return
        self.w.acked(self, pending, event, now)
        if pending.waiter is not None and not pending.waiter.done():
            pending.waiter.set_result(None)

    def on_error(self, msg: dict[str, Any]) -> None:
        code = str(msg.get("code"))
        self.w.errors[code] += 1
        key = msg.get("id")
        if not isinstance(key, str):
            return
        pending = self.pending.pop(key, None)
        if pending is None:
            return
        if code in UNCERTAIN_CODES or (pending.sends > 1 and code not in SCRIPT_REFUSALS):
            self.uncertain[key] = pending
        else:  # refused before any money moved
            self.balance += pending.cost
            self.w.gifts_refused += 1
        if pending.waiter is not None and not pending.waiter.done():
            pending.waiter.set_result(None)

    # ---- gifting --------------------------------------------------------------------------

    def next_gift(self, intended_ns: int, waiter: bool) -> Pending | None:
        """Draw the next gift from the mix (a cheap one when the drawn one is not affordable)."""
        w = self.w
        mix = w.plan.mix
        gift = self.rng.choices(mix.gifts, cum_weights=w.gift_cum_weights)[0]
        count = self.rng.choices(COUNTS, cum_weights=w.count_cum_weights)[0]
        if gift.coins * count > self.balance:
            gift, count = mix.cheapest, 1
            if gift.coins > self.balance:
                w.out_of_coins += 1
                return None
        cost = gift.coins * count
        self.balance -= cost
        key = f"{w.plan.run_id}-{self.spec.gifter}-{self.sent:06d}"
        self.sent += 1
        payload = orjson.dumps(
            {
                "type": "gift",
                "id": key,
                "room": self.spec.room,
                "gift": gift.id,
                "count": count,
                "key": key,
            }
        )
        future = asyncio.get_running_loop().create_future() if waiter else None
        return Pending(key, gift.id, count, cost, intended_ns, payload, waiter=future)

    async def send(self, pending: Pending) -> bool:
        """Send one gift; a gift that may have left before the line died stays pending."""
        conn = self.conn
        self.pending[pending.key] = pending
        if conn is None:
            return False
        pending.sends += 1
        try:
            conn.send_text(pending.payload)
        except ConnectionClosed:
            return False
        self.w.gifts_sent += 1
        return True

    async def resend(self, pendings: list[Pending]) -> None:
        conn = self.conn
        for pending in pendings:
            if conn is None:
                return
            self.pending[pending.key] = pending
            pending.sends += 1
            try:
                conn.send_text(pending.payload)
            except ConnectionClosed:
                return

    async def gift_open_loop(self, start_ns: int, end_ns: int, interval_ns: int) -> None:
        """Gifts on a fixed schedule whatever the answers do (open loop): each gift's latency
        counts from when it was due, so a stalled server or generator shows in the figures
        instead of silently thinning the sends (coordinated omission)."""
        w = self.w
        due = start_ns + int(self.spec.phase * 1e9)
        limit = int((end_ns - start_ns) / interval_ns) + 2
        for _ in range(limit):
            if due >= end_ns or w.stopping:
                return
            delay = (due - time.time_ns()) / 1e9
            if delay > 0:
                await asyncio.sleep(delay)
            if w.stopping:
                return
            if self.conn is None:
                w.gifts_skipped_offline += 1  # the app is offline: the user cannot gift
            else:
                pending = self.next_gift(due, waiter=False)
                if pending is not None:
                    lag = time.time_ns() - due
                    hist.record(w.lag_hist, lag // 1000)
                    await self.send(pending)
            due += interval_ns

    async def gift_closed_loop(self, end_ns: int, think_s: float) -> None:
        """Each gift goes when the previous one is answered (then `think_s` later)."""
        w = self.w
        await w.sleep_until(w.start_ns)
        limit = int((end_ns - time.time_ns()) / 1e9 / max(think_s, 0.0005)) + 2
        for _ in range(limit):
            if time.time_ns() >= end_ns or w.stopping:
                return
            if self.conn is None:
                w.gifts_skipped_offline += 1
                await asyncio.sleep(0.1)
                continue
            pending = self.next_gift(time.time_ns(), waiter=True)
            if pending is None:
                return
            await self.send(pending)
            assert pending.waiter is not None
            try:
                await asyncio.wait_for(asyncio.shield(pending.waiter), ANSWER_TIMEOUT_S)
            except TimeoutError:
                w.errors["no_answer_in_time"] += 1
            if think_s > 0:
                await asyncio.sleep(think_s)

    def summary(self) -> tuple[Any, ...]:
        rec = self.rec
        return (
            self.spec.user,
            self.spec.room,
            self.spec.gifter >= 0,
            self.spec.slow,
            self.spec.storm_delay is not None,
            rec.status,
            rec.start_seq,
            rec.last_seq,
            rec.gift_events,
            rec.gaps,
            rec.missing,
            rec.disorder,
            self.slow_outcome,
        )


CLIENT_FIELDS = (
    "user",
    "room",
    "gifter",
    "slow",
    "storm",
    "status",
    "start_seq",
    "last_seq",
    "gift_events",
    "gaps",
    "missing",
    "disorder",
    "slow_outcome",
)


@dataclass(slots=True)
class Control:
    """The coordinator's side of a worker: multiprocessing objects, picklable to spawn."""

    out: Any  # Queue of messages to the coordinator
    go: Any  # Event: start at start_ns
    finish: Any  # Event: every worker drained; close and report
    abort: Any  # Event: stop early (Ctrl-C, a failed worker)
    start_ns: Any  # Value('q')


@dataclass(slots=True)
class Worker:
    plan: WorkerPlan
    control: Control
    clients: list[Client] = field(default_factory=list)
    receipts: dict[str, array[int]] = field(default_factory=dict)  # event -> receipt times
    frame_receipts: dict[RoomFrame, array[int]] = field(default_factory=dict)
    room_seqs: dict[str, dict[int, str]] = field(default_factory=dict)
    acks: list[tuple[Any, ...]] = field(default_factory=list)
    new_acks: list[tuple[str, int]] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    closes: Counter[str] = field(default_factory=Counter)
    ack_hist: HdrHistogram = field(default_factory=hist.new)
    tick_hist: HdrHistogram = field(default_factory=hist.new)
    lag_hist: HdrHistogram = field(default_factory=hist.new)
    cache: dict[bytes, Any] = field(default_factory=dict)
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    gift_cum_weights: list[float] = field(default_factory=list)
    count_cum_weights: list[float] = field(default_factory=list)
    stopping: bool = False  # gifting is over
    aborted: bool = False  # the coordinator cut the run short
    finishing: bool = False
    start_ns: int = 0
    cpu_at_start: float = 0.0
    gifts_sent: int = 0
    gifts_acked: int = 0
    gifts_refused: int = 0
    gifts_skipped_offline: int = 0
    gifts_resolved_late: int = 0
    out_of_coins: int = 0
    frames: int = 0
    events: int = 0
    gift_events: int = 0
    reconnects: int = 0
    duplicate_answers: int = 0
    storm_dropped: int = 0
    unrecovered: int = 0
    connect_failed: int = 0
    _last: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.gift_cum_weights = list(itertools.accumulate(self.plan.mix.weights))
        self.count_cum_weights = list(itertools.accumulate(float(w) for w in COUNT_WEIGHTS))
        self.room_seqs = {spec.room: {} for spec in self.plan.clients}
        self.clients = [Client(spec, self) for spec in self.plan.clients]

    # ---- helpers used by clients --------------------------------------------------------

    def decode(self, raw: bytes) -> Any:
        """Parse a frame. A room frame is the same bytes for every viewer of the room, so it
        is parsed and digested once per worker (a RoomFrame, read-only, shared), and its
        gift events' seqs are noted once for the delivery check."""
        if not raw.startswith(ROOM_FRAME_PREFIXES):
            return orjson.loads(raw)
        frame = self.cache.get(raw)
        if frame is None:
            if len(self.cache) >= 512:
                self.cache.clear()
            frame = self.cache[raw] = RoomFrame.of(orjson.loads(raw))
            for event in frame.events:
                if event.get("type") == "gift":
                    self.note_seq(event["room"], event["seq"], event["event"])
        return frame

    def note_seq(self, room: str, seq: int, event_id: str) -> None:
        known = self.room_seqs.setdefault(room, {}).setdefault(seq, event_id)
        if known != event_id and len(self.conflicts) < 20:
            self.conflicts.append(f"room {room} seq {seq}: {known} and {event_id}")

    def acked(self, client: Client, pending: Pending, event: str, now: int) -> None:
        self.gifts_acked += 1
        spec = client.spec
        self.acks.append(
            (event, spec.user, pending.key, spec.room, pending.gift, pending.count, pending.cost)
        )
        if pending.late:
            self.gifts_resolved_late += 1
            return
        latency_us = (now - pending.intended_ns) // 1000
        hist.record(self.ack_hist, latency_us)
        hist.record(self.tick_hist, latency_us)
        self.new_acks.append((event, pending.intended_ns))

    def spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def small_window_socket(self) -> socket.socket:
        """A connected socket with a small receive buffer, for a reader that stops reading."""
        from urllib.parse import urlparse

        url = urlparse(self.plan.ws_url)
        port = url.port or (443 if url.scheme == "wss" else 80)
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(url.hostname, port, type=socket.SOCK_STREAM)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SLOW_READER_RCVBUF)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, address)
        except BaseException:
            sock.close()
            raise
        return sock

    def send(self, *message: Any) -> None:
        self.control.out.put(message)

    # ---- the run ------------------------------------------------------------------------

    async def main(self) -> None:
        index = self.plan.index
        await self.connect_all()
        connected = sum(1 for c in self.clients if c.conn is not None)
        self.send("ready", index, connected, self.connect_failed)
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
            self.spawn(self.storm(self.start_ns + int(self.plan.storm_at * 1e9)))
        await self.sleep_until(end_ns)
        self.stopping = True
        await gifters
        await self.drain()
        await self.resolve()
        self.send("drained", index)
        await self.wait_event(self.control.finish, 120)
        self.finishing = True
        await self.check_slow_readers()
        ticker.cancel()
        self.send_tick()  # the last counts, receipts and acks
        await self.close_all()
        self.send("final", index, self.final())

    def gifter_task(self, client: Client, end_ns: int) -> Any:
        if self.plan.closed_loop:
            return client.gift_closed_loop(end_ns, self.plan.think_time)
        interval_ns = int(self.plan.interval * 1e9)
        return client.gift_open_loop(self.start_ns, end_ns, interval_ns)

    async def wait_event(self, event: Any, limit_s: float) -> bool:
        """Wait for a coordinator event; False if it never came or the run was aborted."""
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            if await asyncio.to_thread(event.wait, 0.2):
                return True
            if self.control.abort.is_set():
                self.aborted = self.stopping = True
                return bool(event.is_set())
        return False

    async def sleep_until(self, wall_ns: int) -> None:
        """Sleep to a wall-clock time, waking early when the coordinator aborts the run."""
        while not self.aborted:
            delay = (wall_ns - time.time_ns()) / 1e9
            if delay <= 0:
                return
            await asyncio.sleep(min(delay, 0.25))
            if self.control.abort.is_set():
                self.aborted = self.stopping = True

    async def connect_all(self) -> None:
        gate = asyncio.Semaphore(self.plan.connect_concurrency)

        async def one(client: Client) -> None:
            async with gate:
                for attempt in range(CONNECT_ATTEMPTS):
                    try:
                        await client.connect(since=None)
                        client.rec.status = "slow" if client.spec.slow else "intact"
                        return
                    except (*_CONNECT_ERRORS, Refused) as exc:
                        self.errors[f"connect:{type(exc).__name__}:{exc}"[:80]] += 1
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
        if self.stopping:
            return
        for client in self.clients:
            delay = client.spec.storm_delay
            if delay is not None and client.conn is not None:
                client.drop()
                self.storm_dropped += 1
                self.spawn(client.rejoin(delay))

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
        counts = {name: getattr(self, name) - self._last.get(name, 0) for name in COUNTERS}
        for name in COUNTERS:
            self._last[name] = getattr(self, name)
        receipts: list[tuple[tuple[str, ...], bytes]]
        receipts = [((event,), times.tobytes()) for event, times in self.receipts.items()]
        receipts += [(f.gift_ids, times.tobytes()) for f, times in self.frame_receipts.items()]
        self.receipts = {}
        self.frame_receipts = {}
        body = {
            "t_ns": time.time_ns(),
            "counts": counts,
            "ack_hist": hist.encode(self.tick_hist),
            "acks": self.new_acks,
            "receipts": receipts,
            "connections": sum(1 for c in self.clients if c.conn is not None),
            "errors": sum(self.errors.values()) + sum(self.closes.values()),
            "pending": sum(len(c.pending) for c in self.clients),
        }
        self.new_acks = []
        self.tick_hist = hist.new()
        self.send("tick", self.plan.index, body)

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
            code = conn.close_code if conn.close_code is not None else 1006
            client.slow_outcome = f"closed_{code}"
            client.conn = None

        await asyncio.gather(*(one(c) for c in self.clients if c.spec.slow))

    async def close_all(self) -> None:
        conns = [c.conn for c in self.clients if c.conn is not None]
        for task in list(self.tasks):
            task.cancel()
        try:
            async with asyncio.timeout(5):
                await asyncio.gather(*(conn.close() for conn in conns), return_exceptions=True)
        except TimeoutError:
            pass
        for conn in conns:
            conn.abort()

    def final(self) -> dict[str, Any]:
        unresolved = [
            (c.spec.user, p.key, p.cost)
            for c in self.clients
            for p in (*c.pending.values(), *c.uncertain.values())
        ]
        return {
            "counts": {name: getattr(self, name) for name in COUNTERS},
            "gifts_resolved_late": self.gifts_resolved_late,
            "storm_dropped": self.storm_dropped,
            "unrecovered": self.unrecovered,
            "connect_failed": self.connect_failed,
            "cpu_s": time.process_time() - self.cpu_at_start,  # this process, go to final
            "acks": self.acks,
            "unresolved": unresolved,
            "clients": [c.summary() for c in self.clients],
            "room_seqs": self.room_seqs,
            "conflicts": self.conflicts,
            "errors": dict(self.errors),
            "closes": dict(self.closes),
            "ack_hist": hist.encode(self.ack_hist),
            "lag_hist": hist.encode(self.lag_hist),
        }


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
        control.out.put(("failed", plan.index, traceback.format_exc()))
        raise


def client_record(row: tuple[Any, ...]) -> dict[str, Any]:
    """A client summary tuple (compact to pickle) as a dict with named fields."""
    return dict(zip(CLIENT_FIELDS, row, strict=True))
