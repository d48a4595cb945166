"""The connection's rules without sockets: states and illegal steps, the hello deadline, the
buckets with injected time, strikes to 4429 after earlier replies, and reply order."""

from __future__ import annotations

import json
import re
from contextlib import AbstractContextManager
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from giftstream.protocol.errors import CloseCode, ErrorCode, ProtocolError
from giftstream.protocol.messages import Hello, Ping, SendGift
from giftstream.server.config import Limits
from giftstream.server.realtime.connection import (
    _ACCEPTS,
    EXPIRED_REASON,
    FLOOD_REASON,
    MAX_GIFTS_IN_FLIGHT,
    USER_CAP_REASON,
    Connection,
    IllegalEvent,
    State,
    Step,
)

LIVE = "cara"  # the room that is live here and joined: its gifts go straight


def frame(kind: str, **fields: Any) -> str:
    return json.dumps({"type": kind, **fields})


def hello(request_id: str | None = None) -> str:
    return frame("hello", token="x.y.z", **({"id": request_id} if request_id else {}))


def gift(request_id: str, room: str = LIVE) -> str:
    key = f"key-{request_id}".ljust(8, "0")
    return frame("gift", room=room, gift="rose", count=1, key=key, id=request_id)


def state_of(core: Connection) -> State:
    """Read afresh: every event may move the state (mypy would keep an earlier narrowing)."""
    return core.state


def illegal(message: str) -> AbstractContextManager[pytest.ExceptionInfo[IllegalEvent]]:
    return pytest.raises(IllegalEvent, match=f"^{re.escape(message)}$")


def connection(now: float = 0.0, **limits: Any) -> Connection:
    return Connection(Limits(**limits), now, goes_straight=lambda room: room == LIVE)


def ready(now: float = 0.0, **limits: Any) -> Connection:
    """A connection past its hello: the hello took one message from the budget."""
    core = connection(now, **limits)
    assert core.receive(hello(), now) is Step.AUTHENTICATE
    core.welcomed()
    assert state_of(core) is State.READY
    return core


def start_gifts(core: Connection, count: int, now: float = 0.0) -> list[int]:
    tickets = []
    for n in range(count):
        assert core.receive(gift(f"g{n}"), now) is Step.START_GIFT
        tickets.append(core.ticket)
    return tickets


def serve(core: Connection, message: str, now: float = 0.0) -> Any:
    """Receive a frame that must be served now; its request."""
    assert core.receive(message, now) is Step.SERVE
    request = core.request
    core.answered()
    return request


# ---- states and illegal steps ----------------------------------------------------------


def test_hello_then_ready() -> None:
    core = connection()
    assert state_of(core) is State.AWAITING_HELLO
    assert core.receive(hello("h1"), 0.0) is Step.AUTHENTICATE
    assert core.request == Hello(token="x.y.z", id="h1")
    core.welcomed()
    assert state_of(core) is State.READY
    assert isinstance(serve(core, frame("ping", id=1)), Ping)
    assert core.close_with is None


def _put_in(state: State) -> Connection:
    core = connection()
    if state is State.READY:
        core = ready()
    elif state is State.CLOSED:
        core.connection_lost()
    return core


# Each event with arguments that would suit it, were it legal in that state.
_EVENTS: dict[str, Any] = {
    "receive": lambda core: core.receive(frame("ping"), 0.0),
    "resume": lambda core: core.resume(0.0),
    "hello_deadline_passed": lambda core: core.hello_deadline_passed(),
    "welcomed": lambda core: core.welcomed(),
    "token_refused": lambda core: core.token_refused("bad"),
    "over_user_cap": lambda core: core.over_user_cap(),
    "token_deadline_passed": lambda core: core.token_deadline_passed(),
    "answered": lambda core: core.answered(),
    "refused": lambda core: core.refused(ProtocolError(ErrorCode.BAD_REQUEST, "no"), 0.0),
    "admit_gift": lambda core: core.admit_gift(0.0),
    "gift_answered": lambda core: core.gift_answered(0, None),
    "connection_lost": lambda core: core.connection_lost(),
}


def test_every_event_is_in_the_table() -> None:
    assert set(_EVENTS) == set().union(*_ACCEPTS.values())


@pytest.mark.parametrize(
    ("state", "event"),
    [(state, event) for state in State for event in _EVENTS if event not in _ACCEPTS[state]],
)
def test_an_event_the_state_does_not_accept_fails_loudly(state: State, event: str) -> None:
    core = _put_in(state)
    with pytest.raises(IllegalEvent, match=f"can't handle event {event} in state {state.name}"):
        _EVENTS[event](core)
    assert state_of(core) is state


def test_steps_out_of_turn_fail_loudly() -> None:
    core = connection()
    with illegal(
        "can't handle event welcomed in state AWAITING_HELLO with no request with the caller"
    ):
        core.welcomed()  # no hello was received
    assert core.receive(hello(), 0.0) is Step.AUTHENTICATE
    with illegal(
        "can't handle event receive in state AWAITING_HELLO while a request is with the caller"
    ):
        core.receive(hello(), 0.0)  # the hello is still being checked
    with illegal(
        "can't handle event hello_deadline_passed in state AWAITING_HELLO"
        " while the hello is checked"
    ):
        core.hello_deadline_passed()
    core.welcomed()
    with illegal("can't handle event answered in state READY with no request being served"):
        core.answered()
    with illegal("can't handle event resume in state READY with nothing waiting"):
        core.resume(0.0)
    assert core.receive(frame("ping"), 0.0) is Step.SERVE
    with illegal("can't handle event receive in state READY while a request is with the caller"):
        core.receive(frame("ping"), 0.0)  # the ping is not answered yet
    core.answered()
    (ticket,) = start_gifts(core, 1)
    assert core.receive(frame("ping"), 0.0) is Step.WAIT
    with illegal(
        "can't handle event resume in state READY before every gift in flight is answered"
    ):
        core.resume(0.0)
    with illegal("can't handle event gift_answered in state READY for ticket 7, not in flight"):
        core.gift_answered(7, b"gift_ok")
    core.gift_answered(ticket, b"gift_ok")
    with illegal("can't handle event gift_answered in state READY for ticket 0, not in flight"):
        core.gift_answered(ticket, b"gift_ok")  # answered twice
    assert core.resume(0.0) is Step.SERVE


def test_an_early_outcome_given_twice_fails_loudly() -> None:
    core = ready()
    _, second = start_gifts(core, 2)
    assert core.gift_answered(second, b"second") == []  # kept until the first is answered
    with illegal("can't handle event gift_answered in state READY for ticket 1, not in flight"):
        core.gift_answered(second, b"second")


def test_no_way_back_from_closed() -> None:
    core = ready()
    core.connection_lost()
    assert state_of(core) is State.CLOSED
    assert core.receive(frame("ping"), 0.0) is Step.NOTHING
    core.connection_lost()  # the session's cleanup may run after a flood closed it
    assert state_of(core) is State.CLOSED


# ---- hello -----------------------------------------------------------------------------


def test_hello_deadline_is_fixed_at_the_upgrade() -> None:
    core = connection(now=100.0, hello_timeout_s=10.0)
    assert core.hello_deadline == 110.0
    assert core.receive(b"\x00", 105.0) is Step.REFUSE  # frames do not move it
    assert core.hello_deadline == 110.0
    assert core.hello_deadline_passed() is Step.CLOSE
    assert core.close_with == (CloseCode.HELLO_TIMEOUT, "no hello in time")
    assert state_of(core) is State.CLOSED


def test_bad_frame_before_hello_is_refused_then_hello_still_works() -> None:
    core = connection()
    assert core.receive("not json", 0.0) is Step.REFUSE
    assert core.refusal is not None and core.refusal.code is ErrorCode.BAD_REQUEST
    assert state_of(core) is State.AWAITING_HELLO
    assert core.receive(hello(), 0.0) is Step.AUTHENTICATE


@pytest.mark.parametrize(
    ("first", "reason"),
    [
        (frame("join", room=LIVE), "the first message must be hello"),
        (frame("hello"), "`hello` needs `token`: a JWT string of 1 to 4096 characters"),
        (frame("hello", token=7), "`hello` needs `token`: a JWT string of 1 to 4096 characters"),
    ],
)
def test_anything_but_a_hello_with_a_token_closes_4401(first: str, reason: str) -> None:
    core = connection()
    assert core.receive(first, 0.0) is Step.CLOSE
    assert core.close_with == (CloseCode.BAD_TOKEN, reason)
    assert state_of(core) is State.CLOSED


def test_refused_token_closes_4401_with_a_short_reason() -> None:
    core = connection()
    core.receive(hello(), 0.0)
    assert core.token_refused("x" * 300) is Step.CLOSE
    assert core.close_with == (CloseCode.BAD_TOKEN, "x" * 100)
    assert state_of(core) is State.CLOSED


def test_a_good_hello_past_the_user_cap_closes_4429() -> None:
    core = connection()
    core.receive(hello(), 0.0)
    assert core.over_user_cap() is Step.CLOSE
    assert core.close_with == (CloseCode.FLOOD, USER_CAP_REASON)
    assert state_of(core) is State.CLOSED


def test_token_deadline_closes_4401_once_the_gifts_in_flight_are_answered() -> None:
    core = connection()
    core.receive(hello(), 0.0)
    core.welcomed(token_deadline=60.0)
    assert core.token_deadline == 60.0
    (ticket,) = start_gifts(core, 1)
    assert core.token_deadline_passed() is Step.CLOSE
    assert state_of(core) is State.CLOSED
    assert core.close_with == (CloseCode.BAD_TOKEN, EXPIRED_REASON)
    assert core.close_due is None  # the gift's reply goes first
    assert core.receive(frame("ping"), 61.0) is Step.NOTHING  # nothing more is served
    assert core.gift_answered(ticket, b"gift_ok") == [b"gift_ok"]
    assert core.close_due == (CloseCode.BAD_TOKEN, EXPIRED_REASON)


def test_token_deadline_after_another_close_changes_nothing() -> None:
    core = ready(flood_strikes=0, flood_strikes_per_s=0.01)
    assert core.receive(b"\x00", 0.0) is Step.REFUSE  # the first strike closes: no budget
    assert core.close_with == (CloseCode.FLOOD, FLOOD_REASON)
    assert core.token_deadline_passed() is Step.NOTHING
    assert core.close_with == (CloseCode.FLOOD, FLOOD_REASON)


def test_over_budget_before_hello_is_refused_without_an_id() -> None:
    core = connection(messages_per_s=0.01, messages_burst=1)
    assert core.receive("not json", 0.0) is Step.REFUSE  # the budget's one message
    assert core.receive(hello("h1"), 0.0) is Step.REFUSE
    assert core.refusal is not None
    assert (core.refusal.code, core.refusal.request_id) == (ErrorCode.RATE_LIMITED, None)


def test_flood_before_hello_closes_4429() -> None:
    core = connection(flood_strikes=2, flood_strikes_per_s=0.01)
    assert [core.receive(b"\x00", 0.0) for _ in range(3)] == [Step.REFUSE] * 3
    assert state_of(core) is State.CLOSED
    assert core.close_with == (CloseCode.FLOOD, FLOOD_REASON)
    assert core.close_due == (CloseCode.FLOOD, FLOOD_REASON)


# ---- buckets, with the time passed in --------------------------------------------------


def test_message_budget_burst_then_rate_then_refusals_echo_ids() -> None:
    """The rule of the socket test of the same name: 1 a second, 5 in a burst (the hello
    took one), refusals echo their request's id."""
    core = ready(messages_per_s=1.0, messages_burst=5, flood_strikes=10)
    for n in range(4):
        serve(core, frame("ping", id=n), now=0.5)
    assert core.receive(frame("ping", id="over-0"), 0.9) is Step.REFUSE
    assert core.refusal is not None
    assert (core.refusal.code, core.refusal.request_id) == (ErrorCode.RATE_LIMITED, "over-0")
    assert core.refusal.message == "too many messages; slow down"
    serve(core, frame("ping"), now=1.0)  # one message a second comes back
    assert core.receive(frame("ping"), 1.5) is Step.REFUSE
    serve(core, frame("ping"), now=2.0)


def test_bad_frames_spend_the_message_budget() -> None:
    core = ready(messages_per_s=0.01, messages_burst=3, flood_strikes=10)
    assert core.receive(b"\x00", 0.0) is Step.REFUSE
    serve(core, frame("ping"))
    assert core.receive(frame("ping", id="late"), 0.0) is Step.REFUSE
    assert core.refusal is not None and core.refusal.code is ErrorCode.RATE_LIMITED


def test_gift_budget_with_injected_time() -> None:
    core = ready(gifts_per_s=2.0, gifts_burst=2)
    core.admit_gift(0.0)
    core.admit_gift(0.0)
    with pytest.raises(ProtocolError) as refused:
        core.admit_gift(0.4)
    assert refused.value.code is ErrorCode.RATE_LIMITED
    assert refused.value.message == "too many gifts; slow down"
    core.admit_gift(0.5)  # one gift back after half a second at 2 a second


# ---- strikes ---------------------------------------------------------------------------


def test_fourth_strike_closes_4429() -> None:
    """The rule of the socket test: 3 strikes allowed in a burst, the fourth closes."""
    core = ready(messages_per_s=0.01, messages_burst=5, flood_strikes=3, flood_strikes_per_s=0.01)
    for _ in range(4):
        serve(core, frame("ping"))
    for n in range(3):
        assert core.receive(frame("ping", id=f"over-{n}"), 0.0) is Step.REFUSE
        assert state_of(core) is State.READY
    assert core.receive(frame("ping"), 0.0) is Step.REFUSE  # still answered
    assert state_of(core) is State.CLOSED
    assert core.close_due == (CloseCode.FLOOD, FLOOD_REASON)
    assert core.receive(frame("ping"), 0.0) is Step.NOTHING


def test_strikes_are_forgiven_with_time() -> None:
    core = ready(flood_strikes=1, flood_strikes_per_s=1.0)
    assert core.receive(b"\x00", 0.0) is Step.REFUSE
    assert core.receive(b"\x00", 1.0) is Step.REFUSE
    assert state_of(core) is State.READY
    assert core.receive(b"\x00", 1.5) is Step.REFUSE
    assert state_of(core) is State.CLOSED


@pytest.mark.parametrize(
    ("code", "strike"),
    [(code, code in {ErrorCode.BAD_REQUEST, ErrorCode.RATE_LIMITED}) for code in ErrorCode],
)
def test_which_refusals_are_strikes(code: ErrorCode, strike: bool) -> None:
    core = ready(flood_strikes=1, flood_strikes_per_s=0.01)
    for _ in range(2):
        assert core.receive(frame("balance"), 0.0) is Step.SERVE
        core.refused(ProtocolError(code, "no"), 0.0)
        core.answered()  # its refusal is written even if it closed the connection
    assert state_of(core) is (State.CLOSED if strike else State.READY)
    assert core.close_due == ((CloseCode.FLOOD, FLOOD_REASON) if strike else None)


def test_flood_found_by_a_gift_closes_once_earlier_replies_are_out() -> None:
    core = ready(flood_strikes=1, flood_strikes_per_s=0.01)
    first, second, third = start_gifts(core, 3)
    refusal = ProtocolError(ErrorCode.RATE_LIMITED, "too many gifts; slow down", "g1")
    core.refused(refusal, 0.0)  # strike one, counted as soon as it is decided
    assert core.gift_answered(second, refusal) == []
    core.refused(refusal, 0.0)  # strike two: the flood
    assert core.gift_answered(third, refusal) == []
    assert state_of(core) is State.CLOSED
    assert core.close_with == (CloseCode.FLOOD, FLOOD_REASON)
    assert core.close_due is None  # the first gift is still settling
    assert core.receive(gift("late"), 100.0) is Step.NOTHING  # the bucket would admit it
    assert core.gift_answered(first, b"gift_ok") == [b"gift_ok", refusal, refusal]
    assert core.close_due == (CloseCode.FLOOD, FLOOD_REASON)


def test_gifts_read_before_the_flood_are_not_served() -> None:
    """A gift waiting for a slot when the flood is found is dropped when it resumes."""
    core = ready(flood_strikes=0, flood_strikes_per_s=0.01)
    tickets = start_gifts(core, MAX_GIFTS_IN_FLIGHT)
    assert core.receive(gift("waits"), 0.0) is Step.WAIT
    refusal = ProtocolError(ErrorCode.BAD_REQUEST, "no")
    core.refused(refusal, 0.0)
    core.gift_answered(tickets[0], refusal)
    assert state_of(core) is State.CLOSED
    for ticket in tickets[1:]:
        core.gift_answered(ticket, None)
    assert core.resume(0.0) is Step.NOTHING


def test_a_refusal_waiting_for_gifts_is_counted_when_it_resumes() -> None:
    core = ready(flood_strikes=0, flood_strikes_per_s=0.01)
    (ticket,) = start_gifts(core, 1)
    assert core.receive(b"\x00", 0.0) is Step.WAIT
    assert state_of(core) is State.READY  # not counted yet: the gift's reply goes first
    core.gift_answered(ticket, b"gift_ok")
    assert core.resume(0.0) is Step.REFUSE
    assert state_of(core) is State.CLOSED
    assert core.close_due == (CloseCode.FLOOD, FLOOD_REASON)


# ---- reply order -----------------------------------------------------------------------


def test_gift_outcomes_are_released_in_request_order() -> None:
    core = ready()
    a, b, c = start_gifts(core, 3)
    assert (a, b, c) == (0, 1, 2)
    assert core.gifts_in_flight == 3
    assert core.gift_answered(c, b"c") == []
    assert core.gift_answered(b, b"b") == []
    assert core.gift_answered(a, b"a") == [b"a", b"b", b"c"]
    assert core.gifts_in_flight == 0


def test_any_other_request_waits_for_the_gifts_before_it() -> None:
    core = ready()
    (ticket,) = start_gifts(core, 1)
    assert core.receive(frame("balance", id="after"), 0.0) is Step.WAIT
    assert core.gift_answered(ticket, b"gift_ok") == [b"gift_ok"]
    assert core.resume(0.0) is Step.SERVE
    assert core.request is not None and core.request.id == "after"


@pytest.mark.parametrize(
    "message",
    [
        pytest.param(gift("elsewhere", room="dan"), id="gift-to-a-room-not-joined-here"),
        pytest.param(b"\x00", id="bad-frame"),
    ],
)
def test_gifts_that_do_not_go_straight_and_bad_frames_wait_too(message: str | bytes) -> None:
    core = ready()
    (ticket,) = start_gifts(core, 1)
    assert core.receive(message, 0.0) is Step.WAIT
    core.gift_answered(ticket, b"gift_ok")
    assert core.resume(0.0) in {Step.SERVE, Step.REFUSE}


def test_over_budget_gift_is_refused_in_order_not_started() -> None:
    core = ready(messages_per_s=0.01, messages_burst=2)  # the hello took one
    (ticket,) = start_gifts(core, 1)
    assert core.receive(gift("over"), 0.0) is Step.WAIT
    core.gift_answered(ticket, b"gift_ok")
    assert core.resume(0.0) is Step.REFUSE
    assert core.refusal is not None
    assert (core.refusal.code, core.refusal.request_id) == (ErrorCode.RATE_LIMITED, "over")


def test_at_most_max_gifts_in_flight() -> None:
    core = ready(messages_burst=1000)
    tickets = start_gifts(core, MAX_GIFTS_IN_FLIGHT)
    assert core.receive(gift("one-too-many"), 0.0) is Step.WAIT
    core.gift_answered(tickets[-1], b"last")
    for ticket in tickets[:-1]:
        core.gift_answered(ticket, b"ok")
    assert core.resume(0.0) is Step.START_GIFT
    assert core.ticket == MAX_GIFTS_IN_FLIGHT
    assert isinstance(core.request, SendGift) and core.request.id == "one-too-many"


@given(st.permutations(range(12)))
def test_any_order_of_outcomes_is_written_in_ticket_order(order: list[int]) -> None:
    core = ready(messages_burst=100)
    start_gifts(core, 12)
    replies = [f"reply {ticket}".encode() for ticket in range(12)]
    written: list[Any] = []
    for ticket in order:
        written += core.gift_answered(ticket, replies[ticket])
        assert written == replies[: len(written)]
    assert written == replies
    assert core.gifts_in_flight == 0
