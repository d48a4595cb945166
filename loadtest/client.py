"""One simulated viewer (a gifter is a viewer that also sends gifts) over a lean `Link`, and
what the clients of one worker process keep together: counters, receipts, the frame cache.

Timing: every timestamp is `time.time_ns()` (CLOCK_REALTIME), which all processes on one
machine share, so a gift's send time taken in one worker and a viewer's receipt taken in
another subtract into a true send-to-screen latency. A client only records; the
coordinator joins the two (see loadtest/collect.py).
"""

from __future__ import annotations

import asyncio
import itertools
import random
import socket
import time
from array import array
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, final
from urllib.parse import urlparse

import orjson
from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from giftstream.loadtest import hist
from giftstream.loadtest.link import Link, open_link
from giftstream.loadtest.messages import Ack, ClientRow
from giftstream.loadtest.plan import COUNT_WEIGHTS, COUNTS, ClientSpec, WorkerPlan
from giftstream.protocol.codec import BATCH, ROOM_FRAME_PREFIXES
from giftstream.protocol.errors import ErrorCode
from giftstream.server.realtime.auth import Role, mint_token

REJOIN_ATTEMPTS = 5
ANSWER_TIMEOUT_S = 10.0  # closed loop: give up waiting for one answer (the gift stays pending)
SLOW_READER_RCVBUF = 4096  # a reader that stops reading fills a small window fast
ABNORMAL_CLOSE = 1006  # what a connection ended without a close frame counts as
# Errors after which the gift may have settled: resolved by re-sending its key at the end.
UNCERTAIN_CODES = frozenset({ErrorCode.INTERNAL})
# Refusals the money script gives after it has looked the key up: final even for a key sent
# before (a settled key is answered gift_ok instead). Any other refusal of a re-sent key
# (rate_limited above all, given before the key is looked at) leaves it uncertain: its first
# send, on a line that then dropped, may have settled.
SCRIPT_REFUSALS = frozenset(
    {
        ErrorCode.INSUFFICIENT_COINS,
        ErrorCode.SPENDING_LIMIT,
        ErrorCode.UNDERAGE,
        ErrorCode.KEY_REUSED,
    }
)
CONNECT_ERRORS = (OSError, InvalidHandshake, ConnectionClosed, TimeoutError)


@final  # so the hot path's `type(msg) is RoomFrame` narrows `msg` both ways
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
        raw = parsed.get("events", ()) if parsed.get("type") == BATCH else (parsed,)
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


@dataclass(slots=True, eq=False)
class Shared:
    """What the clients of one worker process keep together: the counters its ticks report
    (COUNTERS), receipts and acks not yet ticked, the run's histograms, and the room frames
    digested once for every viewer. The worker reads and resets it; clients only add."""

    plan: WorkerPlan
    receipts: dict[str, array[int]] = field(default_factory=dict)  # event -> receipt times
    frame_receipts: dict[RoomFrame, array[int]] = field(default_factory=dict)
    room_seqs: dict[str, dict[int, str]] = field(default_factory=dict)
    acks: list[Ack] = field(default_factory=list)
    new_acks: list[tuple[str, int]] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    closes: Counter[str] = field(default_factory=Counter)
    ack_hist: HdrHistogram = field(default_factory=hist.new)
    tick_hist: HdrHistogram = field(default_factory=hist.new)
    lag_hist: HdrHistogram = field(default_factory=hist.new)
    cache: dict[bytes, RoomFrame] = field(default_factory=dict)
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    gift_cum_weights: list[float] = field(default_factory=list)
    count_cum_weights: list[float] = field(default_factory=list)
    stopping: bool = False  # gifting is over
    finishing: bool = False  # the run is closing: a lost connection is not rejoined
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
    unrecovered: int = 0

    def __post_init__(self) -> None:
        self.gift_cum_weights = list(itertools.accumulate(self.plan.mix.weights))
        self.count_cum_weights = list(itertools.accumulate(float(w) for w in COUNT_WEIGHTS))
        self.room_seqs = {spec.room: {} for spec in self.plan.clients}

    def decode(self, raw: bytes) -> dict[str, Any] | RoomFrame:
        """Parse a frame. A room frame is the same bytes for every viewer of the room, so it
        is parsed and digested once per worker (a RoomFrame, read-only, shared), and its
        gift events' seqs are noted once for the delivery check."""
        if not raw.startswith(ROOM_FRAME_PREFIXES):
            reply: dict[str, Any] = orjson.loads(raw)
            return reply
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

    def spawn(self, work: Coroutine[Any, Any, object]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


class Client:
    """One viewer connection (a gifter is a viewer that also sends gifts)."""

    def __init__(self, spec: ClientSpec, shared: Shared) -> None:
        self.spec = spec
        self.shared = shared
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
            shared.plan.jwt_secret, spec.user, role=Role.VIEWER, ttl_s=shared.plan.token_ttl_s
        )

    # ---- connection -----------------------------------------------------------------------

    async def connect(self, since: int | None) -> None:
        """Open, hello, join (with `since` after a drop) and start reading."""
        shared = self.shared
        sock = None
        if self.spec.slow:
            sock = await small_window_socket(shared.plan.ws_url)
        conn = await open_link(shared.plan.ws_url, sock=sock)
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
            shared.unrecovered += 1
        self.conn = conn
        self.dropping = False  # before handle(): a link already lost must count as a drop
        conn.handle(self.on_message, self.on_closed)

    def on_message(self, raw: bytes) -> None:
        now = time.time_ns()
        shared = self.shared
        shared.frames += 1
        try:
            msg = shared.decode(raw)
            if type(msg) is RoomFrame:
                self.on_frame(msg, now)
                return
            kind = msg.get("type")
            if kind == "gift_ok":
                self.on_gift_ok(msg, now)
            elif kind == "error":
                self.on_error(msg)
        except Exception as exc:  # a generator bug: shown in the errors, not as a server drop
            shared.errors[f"generator:{type(exc).__name__}"] += 1

    def on_closed(self, conn: Link) -> None:
        """A connection ended that we did not end: count its close code and rejoin with
        `since`, as the protocol tells a client to."""
        shared = self.shared
        if shared.finishing or self.dropping or conn is not self.conn:
            return
        code = conn.close_code if conn.close_code is not None else ABNORMAL_CLOSE
        shared.closes[str(code)] += 1
        self.conn = None
        shared.spawn(self.rejoin(self.rng.uniform(0.1, 0.5)))

    async def rejoin(self, delay: float) -> bool:
        """Reconnect and `join` with `since` = the last seq seen; re-send unanswered gifts."""
        shared = self.shared
        await asyncio.sleep(delay)
        for attempt in range(REJOIN_ATTEMPTS):
            if shared.finishing:
                return False
            try:
                await self.connect(since=self.rec.last_seq)
            except (*CONNECT_ERRORS, Refused) as exc:
                shared.errors[f"rejoin:{type(exc).__name__}"] += 1
                await asyncio.sleep(0.2 * (attempt + 1) + self.rng.random() * 0.3)
                continue
            shared.reconnects += 1
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
        shared = self.shared
        rec.last_seq = frame.last_seq
        shared.events += len(frame.events)
        gifts = len(frame.gift_ids)
        if gifts:
            shared.gift_events += gifts
            rec.gift_events += gifts
            times = shared.frame_receipts.get(frame)
            if times is None:
                times = shared.frame_receipts[frame] = array("q")
            times.append(now)

    def on_event(self, event: dict[str, Any], now: int) -> None:
        shared = self.shared
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
        shared.events += 1
        if event["type"] == "gift":
            shared.gift_events += 1
            rec.gift_events += 1
            event_id = event["event"]
            times = shared.receipts.get(event_id)
            if times is None:
                times = shared.receipts[event_id] = array("q")
            times.append(now)

    def on_gift_ok(self, msg: dict[str, Any], now: int) -> None:
        key = msg["key"]
        event = msg["event"]
        first = self.answered.setdefault(key, event)
        if first != event and len(self.shared.conflicts) < 20:
            self.shared.conflicts.append(f"key {key} answered {first} then {event}")
        pending = self.pending.pop(key, None) or self.uncertain.pop(key, None)
        if pending is None:
            self.shared.duplicate_answers += 1
            return
        self.shared.acked(self, pending, event, now)
        if pending.waiter is not None and not pending.waiter.done():
            pending.waiter.set_result(None)

    def on_error(self, msg: dict[str, Any]) -> None:
        code = str(msg.get("code"))
        self.shared.errors[code] += 1
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
            self.shared.gifts_refused += 1
        if pending.waiter is not None and not pending.waiter.done():
            pending.waiter.set_result(None)

    # ---- gifting --------------------------------------------------------------------------

    def next_gift(self, intended_ns: int, waiter: bool) -> Pending | None:
        """Draw the next gift from the mix (a cheap one when the drawn one is not affordable)."""
        shared = self.shared
        mix = shared.plan.mix
        gift = self.rng.choices(mix.gifts, cum_weights=shared.gift_cum_weights)[0]
        count = self.rng.choices(COUNTS, cum_weights=shared.count_cum_weights)[0]
        if gift.coins * count > self.balance:
            gift, count = mix.cheapest, 1
            if gift.coins > self.balance:
                shared.out_of_coins += 1
                return None
        cost = gift.coins * count
        self.balance -= cost
        key = f"{shared.plan.run_id}-{self.spec.gifter}-{self.sent:06d}"
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
        self.shared.gifts_sent += 1
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
        shared = self.shared
        due = start_ns + int(self.spec.phase * 1e9)
        limit = int((end_ns - start_ns) / interval_ns) + 2
        for _ in range(limit):
            if due >= end_ns or shared.stopping:
                return
            delay = (due - time.time_ns()) / 1e9
            if delay > 0:
                await asyncio.sleep(delay)
            if shared.stopping:
                return
            if self.conn is None:
                shared.gifts_skipped_offline += 1  # the app is offline: the user cannot gift
            else:
                pending = self.next_gift(due, waiter=False)
                if pending is not None:
                    lag = time.time_ns() - due
                    hist.record(shared.lag_hist, lag // 1000)
                    await self.send(pending)
            due += interval_ns

    async def gift_closed_loop(self, end_ns: int, think_s: float) -> None:
        """Each gift goes when the previous one is answered (then `think_s` later)."""
        shared = self.shared
        limit = int((end_ns - time.time_ns()) / 1e9 / max(think_s, 0.0005)) + 2
        for _ in range(limit):
            if time.time_ns() >= end_ns or shared.stopping:
                return
            if self.conn is None:
                shared.gifts_skipped_offline += 1
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
                shared.errors["no_answer_in_time"] += 1
            if think_s > 0:
                await asyncio.sleep(think_s)

    def summary(self) -> ClientRow:
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


async def small_window_socket(ws_url: str) -> socket.socket:
    """A connected socket with a small receive buffer, for a reader that stops reading."""
    url = urlparse(ws_url)
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
