"""How latencies are measured: histograms merged exactly across workers, send-to-screen
joined across processes whichever half arrives first, and open-loop gifts timed from when
they were due, so a stalled generator cannot hide its stall (coordinated omission)."""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import time
from array import array

import orjson
from websockets.asyncio.server import ServerConnection, serve

from giftstream.loadtest import hist
from giftstream.loadtest.client import RoomFrame, Shared
from giftstream.loadtest.collect import Tally
from giftstream.loadtest.messages import Final, Tick
from giftstream.loadtest.plan import ClientSpec, GiftMix, WorkerPlan
from giftstream.loadtest.worker import Control, Worker
from giftstream.protocol.codec import encode, encode_error, encode_reply, encode_room_frame
from giftstream.protocol.errors import ErrorCode, ProtocolError
from giftstream.protocol.events import (
    GiftEvent,
    GiftOk,
    Joined,
    RoomEnded,
    ViewersEvent,
    Welcome,
)
from giftstream.server.money.catalog import load_catalog

MS = 1_000_000


def test_histograms_merge_exactly_across_workers() -> None:
    values = [1 + (i * 7919) % 250_000 for i in range(20_000)]
    whole = hist.new()
    parts = [hist.new(), hist.new(), hist.new()]
    for i, value in enumerate(values):
        hist.record(whole, value)
        hist.record(parts[i % 3], value)
    merged = hist.merge(hist.encode(p) for p in parts)
    assert merged.get_total_count() == len(values)
    assert hist.summary_ms(merged) == hist.summary_ms(whole)


def test_values_past_the_range_are_clamped_not_lost() -> None:
    h = hist.new()
    hist.record(h, 10**12)
    hist.record(h, -5)
    assert h.get_total_count() == 2
    assert hist.summary_ms(h)["max"] >= hist.HIGHEST_US / 1000 * 0.99


def _tick(
    worker: int, t_ns: int, acks: list[tuple[str, int]], receipts: dict[str, list[int]]
) -> Tick:
    return Tick(
        worker=worker,
        t_ns=t_ns,
        counts={},
        ack_hist=hist.encode(hist.new()),
        acks=acks,
        receipts=[((e,), array("q", times).tobytes()) for e, times in receipts.items()],
        connections=1,
        errors=0,
        pending=0,
    )


def test_send_to_screen_joins_whichever_half_arrives_first() -> None:
    start = 1_764_000_000_000_000_000
    tally = Tally(start)
    sent_a, sent_b = start + 100 * MS, start + 200 * MS
    # worker 1's viewers saw event a before worker 0 reported a's send time...
    tally.add_tick(_tick(1, start + 500 * MS, [], {"a": [sent_a + 5 * MS, sent_a + 9 * MS]}))
    assert tally.screen.get_total_count() == 0 and tally.unmatched_receipts == 2
    tally.add_tick(_tick(0, start + 500 * MS, [("a", sent_a), ("b", sent_b)], {}))
    # ...and saw b after; c was never acknowledged in the timed run
    tally.add_tick(_tick(1, start + 1000 * MS, [], {"b": [sent_b + 7 * MS], "c": [start]}))
    summary = hist.summary_ms(tally.screen)
    assert summary["count"] == 3
    assert 6.9 < summary["p50"] < 7.1 and 8.9 < summary["max"] < 9.1
    assert tally.unmatched_receipts == 1  # c: counted, not guessed


async def _instant_server(conn: ServerConnection) -> None:
    """Answers hello, join and every gift at once, like a server that is never slow."""
    events = itertools.count()
    async for raw in conn:
        msg = orjson.loads(raw)
        if msg["type"] == "hello":
            reply = {"type": "welcome", "user": "u", "coins": 10**9}
        elif msg["type"] == "join":
            reply = {"type": "joined", "room": msg["room"], "seq": 0}
        else:
            reply = {
                "type": "gift_ok",
                "key": msg["key"],
                "event": f"e{next(events)}",
                "coins": 1,
                "combo": 1,
            }
        await conn.send(orjson.dumps(reply).decode())


async def test_open_loop_times_gifts_from_when_they_were_due() -> None:
    """The generator's own loop stalls 300 ms mid-run; the server answers instantly. The
    gifts due during the stall go late but still go, and their latency includes the wait."""
    async with serve(_instant_server, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        plan = WorkerPlan(
            index=0,
            run_id="lttest01",
            ws_url=f"ws://127.0.0.1:{port}/ws",
            jwt_secret="x" * 32,
            clients=(ClientSpec(user="u", room="r", gifter=0, seed=1),),
            mix=GiftMix.from_catalog(load_catalog().as_wire()),
            duration=1.2,
            closed_loop=False,
            interval=0.02,
            think_time=0.0,
            storm_at=None,
            drain=2.0,
            connect_concurrency=1,
            token_ttl_s=60,
        )
        control = _control()
        control.go.set()
        control.finish.set()  # finish as soon as drained
        control.start_ns.value = time.time_ns() + 300 * MS
        loop = asyncio.get_running_loop()
        loop.call_later(0.3 + 0.5, time.sleep, 0.3)  # the generator stalls 0.5 s into the run
        await Worker(plan, control).main()
    final = None
    while final is None:  # the last message a worker sends
        message = control.out.get(timeout=10)
        final = message if isinstance(message, Final) else None
    assert final.counts["gifts_sent"] == 60  # every gift due in 1.2 s at 50/s went
    ack = hist.merge([final.ack_hist])
    lag = hist.merge([final.lag_hist])
    assert ack.get_total_count() == 60
    assert hist.summary_ms(lag)["max"] >= 250  # sent late because the generator stalled
    assert hist.summary_ms(ack)["max"] >= 250  # and the latency shows the stall
    late = sum(
        v.count_added_in_this_iter_step
        for v in ack.get_recorded_iterator()
        if v.value_iterated_to >= 100_000
    )
    assert late >= 5  # several gifts, not one: the whole backlog of the stall is counted


def _frame(*events: tuple[int, str | None]) -> bytes:
    """A room frame as the server encodes it: (seq, gift event id or None for viewers)."""
    wire = [
        {"type": "gift", "room": "r", "seq": seq, "event": eid, "sender": {"id": "u"}}
        if eid
        else {"type": "viewers", "room": "r", "seq": seq, "count": 3}
        for seq, eid in events
    ]
    return orjson.dumps(wire[0] if len(wire) == 1 else {"type": "batch", "events": wire})


def _control() -> Control:
    return Control.create(multiprocessing.get_context("spawn"))


def _offline_plan(run_id: str, *clients: ClientSpec) -> WorkerPlan:
    """A plan for clients fed frames by hand: nothing connects."""
    return WorkerPlan(
        index=0,
        run_id=run_id,
        ws_url="ws://127.0.0.1:1/ws",
        jwt_secret="x" * 32,
        clients=clients,
        mix=GiftMix.from_catalog(load_catalog().as_wire()),
        duration=1,
        closed_loop=True,
        interval=1,
        think_time=0,
        storm_at=None,
        drain=0,
        connect_concurrency=1,
        token_ttl_s=60,
    )


def test_room_frames_are_told_from_replies_by_the_codec_prefixes() -> None:
    """A worker digests a frame once for all its viewers when it begins as a room frame
    does: every room frame the server's codec writes does, and no reply does."""
    gift = GiftEvent(
        room="r",
        seq=1,
        event="e1",
        sender_id="u",
        sender_name="U",
        gift_id="rose",
        gift_name="Rose",
        gift_coins=1,
        animation="float",
        count=1,
        combo=1,
        ts=0,
    )
    events = [e.as_dict() for e in (gift, ViewersEvent("r", 2, 3), RoomEnded("r", 3))]
    room_frames = [encode_room_frame([e]) for e in events] + [encode_room_frame(events)]
    replies = [
        encode(Welcome(user="u", name="U", coins=5, diamonds=0, ts=0)),
        encode_reply(Joined(room="r", creator="c", title="t", viewers=1, seq=0), "j"),
        encode_reply(GiftOk(key="k-00000001", event="e1", coins=4, combo=1), "g"),
        encode_error(ProtocolError(ErrorCode.RATE_LIMITED, "slow down", "g")),
    ]
    shared = Shared(_offline_plan("lttest03", ClientSpec(user="a", room="r")))
    assert [type(shared.decode(f)) for f in room_frames] == [RoomFrame] * 4
    assert [type(shared.decode(f)) for f in replies] == [dict] * 4
    assert shared.room_seqs == {"r": {1: "e1"}}


def _room_frame(shared: Shared, raw: bytes) -> RoomFrame:
    frame = shared.decode(raw)
    assert type(frame) is RoomFrame
    return frame


def test_viewers_take_shared_frames_whole_and_fall_back_on_gaps_and_overlaps() -> None:
    plan = _offline_plan("lttest01", ClientSpec(user="a", room="r"), ClientSpec(user="b", room="r"))
    worker = Worker(plan, _control())
    shared = worker.shared
    a, b = worker.clients
    a.rec.last_seq = b.rec.last_seq = 0
    batch = _frame((1, "e1"), (2, None), (3, "e3"))
    for client in (a, b):  # the same bytes: parsed once, taken whole by both
        client.on_frame(_room_frame(shared, batch), now=10)
    assert len(shared.cache) == 1 and shared.room_seqs == {"r": {1: "e1", 3: "e3"}}
    a.on_frame(_room_frame(shared, _frame((5, "e5"))), now=20)  # seq 4 never came: a gap
    b.on_frame(_room_frame(shared, _frame((2, None), (3, "e3"), (4, "e4"))), now=20)  # overlap
    assert (a.rec.gaps, a.rec.missing, a.rec.disorder, a.rec.gift_events) == (1, 1, 0, 3)
    assert (b.rec.gaps, b.rec.disorder, b.rec.gift_events, b.rec.last_seq) == (0, 2, 3, 4)
    assert shared.events == 3 + 3 + 1 + 1 and shared.gift_events == 2 + 2 + 1 + 1
    receipts = dict(shared.frame_receipts.items())
    assert [list(t) for f, t in receipts.items() if f.gift_ids == ("e1", "e3")] == [[10, 10]]
    assert {e: list(t) for e, t in shared.receipts.items()} == {"e5": [20], "e4": [20]}


def test_a_refused_resend_leaves_its_gift_uncertain_not_refunded() -> None:
    """A key sent again (after a drop, or to learn its fate at the end) and refused with
    `rate_limited` may have settled on its first send: it stays to be resolved, and the
    first send's late `gift_ok` still counts. A first send refused so is final."""
    plan = _offline_plan("lttest02", ClientSpec(user="g", room="r", gifter=0))
    worker = Worker(plan, _control())
    (client,) = worker.clients
    client.balance = 1_000_000
    first, again = client.next_gift(0, waiter=False), client.next_gift(0, waiter=False)
    assert first is not None and again is not None
    for pending in (first, again):
        pending.sends = 1
        client.pending[pending.key] = pending
    again.sends = 2  # went out twice: the second copy is the one refused
    client.on_error({"type": "error", "id": first.key, "code": "rate_limited"})
    client.on_error({"type": "error", "id": again.key, "code": "rate_limited"})
    assert worker.shared.gifts_refused == 1 and first.key not in client.pending
    assert client.balance == 1_000_000 - again.cost  # only the first send's coins came back
    assert client.uncertain == {again.key: again}
    client.on_gift_ok({"type": "gift_ok", "key": again.key, "event": "e1"}, now=5)
    shared = worker.shared
    assert shared.gifts_acked == 1 and not client.uncertain and shared.duplicate_answers == 0
