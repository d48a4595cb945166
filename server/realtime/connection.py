"""The rules of one WebSocket connection, Sans-I/O: its states, the hello and token
deadlines, the rate buckets (messages, gifts, `since` replays), the strikes and the order of
its replies.

    AWAITING_HELLO --valid hello--> READY --connection lost--> CLOSED
    AWAITING_HELLO --bad token / other first message--> CLOSED (4401)
    AWAITING_HELLO --hello deadline passed--> CLOSED (4408)
    AWAITING_HELLO --valid hello past the user's connection cap--> CLOSED (4429)
    READY --token deadline (its exp plus the leeway) passed--> CLOSED (4401)
    AWAITING_HELLO / READY --too many strikes--> CLOSED (4429, once earlier replies are out)

`Connection` takes events (a frame arrived at `now`, the hello deadline passed, a request's
outcome is ready, ...) and answers with a `Step` for the caller to carry out; it never
touches a socket, an event loop or Redis, and time is passed in. The asyncio side
(`session.py`) reads frames, runs the request handlers and writes what it is told to. An
event the state does not accept is a bug in the caller and raises `IllegalEvent`.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from typing import NoReturn

from giftstream.protocol.codec import decode_frame
from giftstream.protocol.errors import CloseCode, ErrorCode, ProtocolError
from giftstream.protocol.messages import ClientMessage, Hello, RequestId, SendGift
from giftstream.server.config import Limits
from giftstream.server.realtime.ratelimit import TokenBucket

# Gifts one connection may have settling at once; past it, the next frame waits for them.
MAX_GIFTS_IN_FLIGHT = 32
# Longest token error sent as a close reason: a close frame holds 123 bytes of it.
MAX_CLOSE_REASON = 100
FLOOD_REASON = "too many bad or excess messages"
USER_CAP_REASON = "too many connections for this user"
EXPIRED_REASON = "token expired; reconnect with a fresh token and since"

# What a request came to: its encoded reply, the error that refuses it, or None when there
# is nothing (more) to write. Opaque here: only its place in the order matters.
Outcome = bytes | ProtocolError | None
# The refusals that are strikes: a client that keeps sending them is flooding.
_STRIKES = frozenset({ErrorCode.BAD_REQUEST, ErrorCode.RATE_LIMITED})


class State(Enum):
    AWAITING_HELLO = "awaiting_hello"
    READY = "ready"
    CLOSED = "closed"


class Step(Enum):
    """What the caller does next, after handing in a frame (or resuming one)."""

    NOTHING = "nothing"  # nothing to do: the connection is closed, nothing more is served
    REFUSE = "refuse"  # write `refusal` (its strike is already counted)
    AUTHENTICATE = "authenticate"  # check the `Hello` in `request`; `welcomed`/`token_refused`
    SERVE = "serve"  # run `request`, then `answered` (a refusal to `refused` first)
    START_GIFT = "start_gift"  # settle `request` while reading on; outcome to `gift_answered`
    WAIT = "wait"  # wait until every gift in flight is answered, then `resume`
    CLOSE = "close"  # close the socket with `close_with`


# Members bound once for the per-message path: on Python 3.11 `Step.SERVE` is a metaclass
# lookup of ~0.1 µs.
_AWAITING_HELLO, _READY, _CLOSED = State.AWAITING_HELLO, State.READY, State.CLOSED
_NOTHING, _REFUSE, _SERVE = Step.NOTHING, Step.REFUSE, Step.SERVE
_START_GIFT, _WAIT = Step.START_GIFT, Step.WAIT


class IllegalEvent(RuntimeError):
    """The caller fed an event the connection's state does not accept: a bug on our side,
    never the peer's doing (the peer's mistakes are refusals and close codes)."""


# The only moves a connection makes; any other is a bug and fails loudly.
_TRANSITIONS: dict[State, frozenset[State]] = {
    State.AWAITING_HELLO: frozenset({State.READY, State.CLOSED}),
    State.READY: frozenset({State.CLOSED}),
    State.CLOSED: frozenset({State.CLOSED}),
}

# The events each state accepts. A closed connection still takes the frames and outcomes
# already on their way (a refusal may be what closed it), and serves none of them.
_ACCEPTS: dict[State, frozenset[str]] = {
    State.AWAITING_HELLO: frozenset(
        {
            "receive",
            "hello_deadline_passed",
            "welcomed",
            "token_refused",
            "over_user_cap",
            "connection_lost",
        }
    ),
    State.READY: frozenset(
        {
            "receive",
            "token_deadline_passed",
            "resume",
            "answered",
            "admit_gift",
            "refused",
            "gift_answered",
            "connection_lost",
        }
    ),
    State.CLOSED: frozenset(
        {
            "receive",
            "resume",
            "answered",
            "refused",
            "gift_answered",
            "token_deadline_passed",
            "connection_lost",
        }
    ),
}


class Connection:
    """One connection's rules, fed by its session. Thousands live at once: slotted, and the
    per-message path allocates nothing but the refusals it makes and the list of outcomes
    `gift_answered` releases.

    Reply order: a gift to a room that is live here and joined (`goes_straight`) is started
    at once and settles while the connection reads on, up to `MAX_GIFTS_IN_FLIGHT`; each
    started gift holds a ticket, and outcomes are released for writing in ticket order,
    whatever order they come in. Any other request waits (`Step.WAIT`) until every gift
    before it is answered. A refusal is counted as soon as it is decided, so that a flood
    stops the gifts behind it as it stops the frames behind it.
    """

    __slots__ = (
        "_deferred",
        "_early",
        "_gifts",
        "_gifts_started",
        "_goes_straight",
        "_messages",
        "_next_answer",
        "_replays",
        "_serving",
        "_strikes",
        "close_with",
        "hello_deadline",
        "refusal",
        "request",
        "state",
        "ticket",
        "token_deadline",
    )

    def __init__(self, limits: Limits, now: float, goes_straight: Callable[[str], bool]) -> None:
        """`now` is the upgrade's time on the clock every later `now` comes from;
        `goes_straight(room)` says whether a gift to `room` may settle concurrently."""
        self.state = State.AWAITING_HELLO
        self.hello_deadline = now + limits.hello_timeout_s
        self.token_deadline = float("inf")  # when READY: when its token stops being good
        self.request: ClientMessage | None = None  # the request of the last step
        self.refusal: ProtocolError | None = None  # the error of the last `Step.REFUSE`
        self.ticket = -1  # the ticket of the last `Step.START_GIFT`
        self.close_with: tuple[CloseCode, str] | None = None
        self._messages = TokenBucket(limits.messages_per_s, limits.messages_burst, now)
        self._gifts = TokenBucket(limits.gifts_per_s, limits.gifts_burst, now)
        self._replays = TokenBucket(limits.replays_per_s, limits.replays_burst, now)
        self._strikes = TokenBucket(limits.flood_strikes_per_s, limits.flood_strikes, now)
        self._goes_straight = goes_straight
        self._serving = False  # a request (or the hello) is with the caller
        self._deferred: Step | None = None  # the step that waits for the gifts in flight
        self._gifts_started = 0  # tickets handed out
        self._next_answer = 0  # the ticket whose outcome is written next
        # outcomes that came before their turn; made when the first one does
        self._early: dict[int, Outcome] | None = None

    # ---- frames ---------------------------------------------------------------------------

    def receive(self, frame: str | bytes, now: float) -> Step:
        """A frame arrived at `now`. The message budget is taken first, so bad frames spend
        it too; a refusal comes after the decode, so that it echoes the request's id."""
        if self._serving or self._deferred is not None:
            self._illegal("receive", "while a request is with the caller")
        state = self.state
        if state is _READY:
            admitted = self._messages.take(now)
            try:
                message = decode_frame(frame)
            except ProtocolError as error:
                self.refusal = error
                return self._after_gifts(_REFUSE, now)
            self.request = message
            if not admitted:
                self.refusal = _over_message_budget(message.id)
                return self._after_gifts(_REFUSE, now)
            in_flight = self._gifts_started - self._next_answer
            if type(message) is SendGift and self._goes_straight(message.room):
                if in_flight >= MAX_GIFTS_IN_FLIGHT:
                    self._deferred = _START_GIFT
                    return _WAIT
                self.ticket = self._gifts_started
                self._gifts_started += 1
                return _START_GIFT
            if in_flight:
                self._deferred = _SERVE
                return _WAIT
            self._serving = True
            return _SERVE
        if state is _AWAITING_HELLO:
            return self._receive_hello(frame, now)
        return _NOTHING  # read after the flood was found: not served

    def _receive_hello(self, frame: str | bytes, now: float) -> Step:
        if not self._messages.take(now):
            return self._refuse(_over_message_budget(None), now)
        try:
            message = decode_frame(frame)
        except ProtocolError as error:
            if error.code is ErrorCode.UNAUTHORIZED:  # a hello without a usable token
                return self._close(CloseCode.BAD_TOKEN, error.message)
            return self._refuse(error, now)
        if not isinstance(message, Hello):
            return self._close(CloseCode.BAD_TOKEN, "the first message must be hello")
        self.request = message
        self._serving = True
        return Step.AUTHENTICATE

    def resume(self, now: float) -> Step:
        """Every gift in flight is answered: the step that waited for them, unless the
        connection closed meanwhile."""
        self._expect("resume")
        step = self._deferred
        if step is None:
            self._illegal("resume", "with nothing waiting")
        if self._gifts_started != self._next_answer:
            self._illegal("resume", "before every gift in flight is answered")
        self._deferred = None
        if self.state is _CLOSED:
            return _NOTHING
        if step is _START_GIFT:
            self.ticket = self._gifts_started
            self._gifts_started += 1
        elif step is _SERVE:
            self._serving = True
        else:
            assert self.refusal is not None
            self._count(self.refusal, now)
        return step

    def _after_gifts(self, step: Step, now: float) -> Step:
        """A refusal waits for the gifts in flight before it is counted and written."""
        if self._gifts_started != self._next_answer:
            self._deferred = step
            return _WAIT
        assert self.refusal is not None
        return self._refuse(self.refusal, now)

    # ---- hello ----------------------------------------------------------------------------

    def hello_deadline_passed(self) -> Step:
        """No valid hello came by `hello_deadline`."""
        self._expect("hello_deadline_passed")
        if self._serving:
            self._illegal("hello_deadline_passed", "while the hello is checked")
        return self._close(CloseCode.HELLO_TIMEOUT, "no hello in time")

    def welcomed(self, token_deadline: float = float("inf")) -> None:
        """The hello's token is good until `token_deadline` (on the clock of `now`):
        requests are served from now on; the caller calls `token_deadline_passed` then."""
        self._expect("welcomed")
        self._end_serving("welcomed")
        self.token_deadline = token_deadline
        self._enter(State.READY)

    def over_user_cap(self) -> Step:
        """The hello's token is good, but its user already holds as many connections as
        a user may."""
        self._expect("over_user_cap")
        self._end_serving("over_user_cap")
        return self._close(CloseCode.FLOOD, USER_CAP_REASON)

    def token_deadline_passed(self) -> Step:
        """`token_deadline` came: the connection is closed 4401 once the replies already
        started are out (`close_due`); NOTHING when it closed before."""
        self._expect("token_deadline_passed")
        if self.state is _CLOSED:
            return _NOTHING
        self._enter(State.CLOSED)
        self.close_with = (CloseCode.BAD_TOKEN, EXPIRED_REASON)
        return Step.CLOSE

    def token_refused(self, reason: str) -> Step:
        """The hello's token is bad, expired or missing."""
        self._expect("token_refused")
        self._end_serving("token_refused")
        return self._close(CloseCode.BAD_TOKEN, reason[:MAX_CLOSE_REASON])

    # ---- outcomes -------------------------------------------------------------------------

    def answered(self) -> None:
        """The request of the last `Step.SERVE` is answered (its refusal, if any, went to
        `refused`); the next frame may come."""
        if self.state is _AWAITING_HELLO or not self._serving:  # _ACCEPTS, inlined
            self._illegal("answered", "" if self._serving else "with no request being served")
        self._serving = False

    def refused(self, error: ProtocolError, now: float) -> None:
        """A request (a gift in flight, or the one being served) was refused at `now`,
        counted as soon as it is decided, so that a flood stops the gifts behind it."""
        if self.state is _AWAITING_HELLO:  # "refused" in _ACCEPTS, inlined
            self._illegal("refused")
        self._count(error, now)

    def admit_gift(self, now: float) -> None:
        """Take one gift from the gift budget; `ProtocolError(rate_limited)` when over."""
        if self.state is not _READY:  # "admit_gift" in _ACCEPTS, inlined
            self._illegal("admit_gift")
        if not self._gifts.take(now):
            raise ProtocolError(ErrorCode.RATE_LIMITED, "too many gifts; slow down")

    def admit_replay(self, now: float) -> None:
        """Take one `since` replay from its budget; `ProtocolError(rate_limited)` when over.
        A replay can be a room's whole history: a few in a burst, then one every
        1/`replays_per_s` seconds, so small requests cannot ask for unbounded output."""
        if self.state is not _READY:
            self._illegal("admit_replay")
        if not self._replays.take(now):
            raise ProtocolError(
                ErrorCode.RATE_LIMITED, "too many joins with since; join without since or wait"
            )

    def gift_answered(self, ticket: int, outcome: Outcome) -> list[Outcome]:
        """Gift `ticket` came to `outcome` (None: not served, or cancelled): every outcome
        whose turn has come, in order, for the caller to write."""
        if self.state is _AWAITING_HELLO:  # "gift_answered" in _ACCEPTS, inlined
            self._illegal("gift_answered")
        next_answer, early = self._next_answer, self._early
        if not next_answer <= ticket < self._gifts_started or (early and ticket in early):
            self._illegal("gift_answered", f"for ticket {ticket}, not in flight")
        if ticket != next_answer:
            if early is None:
                early = self._early = {}
            early[ticket] = outcome
            return []
        answers = [outcome]
        ticket += 1
        if early:
            while ticket in early:
                answers.append(early.pop(ticket))
                ticket += 1
        self._next_answer = ticket
        return answers

    @property
    def gifts_in_flight(self) -> int:
        """Gifts started whose outcome is not yet released for writing."""
        return self._gifts_started - self._next_answer

    @property
    def close_due(self) -> tuple[CloseCode, str] | None:
        """The flood or expiry close, once every reply before it is released; else None."""
        if self._gifts_started != self._next_answer:
            return None
        return self.close_with

    def connection_lost(self) -> None:
        """The socket is gone (or the session ends): nothing more is served."""
        self._serving = False
        self._deferred = None
        self._enter(State.CLOSED)

    # ---- rules ----------------------------------------------------------------------------

    def _refuse(self, error: ProtocolError, now: float) -> Step:
        self.refusal = error
        self._count(error, now)
        return _REFUSE

    def _count(self, error: ProtocolError, now: float) -> None:
        """Bad frames and rate-limited requests are strikes: past the budget, the connection
        is closed with 4429 once what was sent before is answered."""
        if error.code in _STRIKES and self.state is not _CLOSED:
            if not self._strikes.take(now):
                self._enter(State.CLOSED)
                self.close_with = (CloseCode.FLOOD, FLOOD_REASON)

    def _close(self, code: CloseCode, reason: str) -> Step:
        self._enter(State.CLOSED)
        self.close_with = (code, reason)
        return Step.CLOSE

    def _end_serving(self, event: str) -> None:
        if not self._serving:
            self._illegal(event, "with no request with the caller")
        self._serving = False

    def _enter(self, state: State) -> None:
        if state not in _TRANSITIONS[self.state]:
            raise IllegalEvent(f"connection cannot go from {self.state.name} to {state.name}")
        self.state = state

    def _expect(self, event: str) -> None:
        if event not in _ACCEPTS[self.state]:
            self._illegal(event)

    def _illegal(self, event: str, why: str = "") -> NoReturn:
        detail = f" {why}" if why else ""
        raise IllegalEvent(f"can't handle event {event} in state {self.state.name}{detail}")


def _over_message_budget(request_id: RequestId) -> ProtocolError:
    return ProtocolError(ErrorCode.RATE_LIMITED, "too many messages; slow down", request_id)
