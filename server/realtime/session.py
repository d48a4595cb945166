"""One WebSocket connection: its state machine, its limits, and one handler per request.

    AWAITING_HELLO --valid hello--> READY --close/error--> CLOSED
    AWAITING_HELLO --bad token / other first message--> CLOSED (4401)
    AWAITING_HELLO --10 s pass--> CLOSED (4408)

Every reply and event is written through the fan-out, never awaited, so a client's replies
and its rooms' events reach it in the order they were produced.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from giftstream.protocol.codec import decode_frame, encode_error, encode_reply
from giftstream.protocol.errors import CloseCode, ErrorCode, ProtocolError
from giftstream.protocol.events import (
    BalanceReply,
    Ended,
    GiftEvent,
    GiftOk,
    Left,
    Live,
    Pong,
    Watching,
    Welcome,
)
from giftstream.protocol.messages import (
    ClientMessage,
    EndLive,
    GetBalance,
    GoLive,
    Hello,
    Join,
    Leave,
    Ping,
    SendGift,
    Watch,
)
from giftstream.server.config import Limits
from giftstream.server.metrics import Metrics
from giftstream.server.money.catalog import Catalog, Gift
from giftstream.server.money.wallet import SettledGift, Wallet
from giftstream.server.realtime.auth import AuthError, Identity, verify_token
from giftstream.server.realtime.fanout import Fanout
from giftstream.server.realtime.hub import Hub, Room
from giftstream.server.realtime.ops import OpsFeed
from giftstream.server.realtime.ratelimit import TokenBucket

log = logging.getLogger(__name__)

# Gifts one connection may have settling at once; past it, the next frame waits for them.
MAX_GIFTS_IN_FLIGHT = 32
# What a request comes to: its encoded reply, the error that refuses it, or None when its
# handler wrote the reply itself.
Outcome = bytes | ProtocolError | None


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(slots=True)
class Services:
    """What a session needs from the server; built once by the app."""

    limits: Limits
    jwt_secret: str
    catalog: Catalog
    wallet: Wallet
    hub: Hub
    ops: OpsFeed
    fanout: Fanout
    metrics: Metrics
    draining: bool = False
    connections: int = 0
    # Gift tasks of every session, still settling or waiting to write their reply.
    gifts_in_flight: set[asyncio.Task[None]] = field(default_factory=set)


class State(Enum):
    AWAITING_HELLO = "awaiting_hello"
    READY = "ready"
    CLOSED = "closed"


# The only moves a connection makes; any other is a bug and fails loudly.
_TRANSITIONS: dict[State, frozenset[State]] = {
    State.AWAITING_HELLO: frozenset({State.READY, State.CLOSED}),
    State.READY: frozenset({State.CLOSED}),
    State.CLOSED: frozenset({State.CLOSED}),
}


class Session:
    """Serves one connection from upgrade to close. Thousands live at once: slotted, and the
    request handlers are looked up on the class, not bound per connection."""

    __slots__ = (
        "_close_with",
        "_gifts",
        "_gifts_in_flight",
        "_last_gift",
        "_messages",
        "_strikes",
        "conn",
        "identity",
        "s",
        "state",
    )

    def __init__(self, conn: ServerConnection, services: Services) -> None:
        self.conn = conn
        self.s = services
        self.state = State.AWAITING_HELLO
        self.identity: Identity | None = None
        self._close_with: tuple[CloseCode, str] | None = None  # set when a flood ends us
        clock = time.monotonic()
        limits = services.limits
        self._messages = TokenBucket(limits.messages_per_s, limits.messages_burst, clock)
        self._gifts = TokenBucket(limits.gifts_per_s, limits.gifts_burst, clock)
        self._strikes = TokenBucket(limits.flood_strikes_per_s, limits.flood_strikes, clock)
        self._last_gift: asyncio.Task[None] | None = None  # the newest gift still settling
        self._gifts_in_flight = 0

    async def run(self) -> None:
        metrics = self.s.metrics
        metrics.connections.inc()
        self.s.connections += 1
        try:
            if await self._authenticate():
                async for frame in self.conn:
                    await self._serve(frame)
                    if self.state is State.CLOSED:
                        break
            if self._close_with is not None:
                await self._gifts_answered()  # their replies go before the close frame
                await self.conn.close(*self._close_with)
        except ConnectionClosed:
            pass
        finally:
            self._enter(State.CLOSED)
            self.s.hub.leave_all(self.conn)
            self.s.ops.unwatch(self.conn)
            metrics.connections.dec()
            self.s.connections -= 1

    # ---- hello ----------------------------------------------------------------------------

    async def _authenticate(self) -> bool:
        """Wait for a valid hello; on success send `welcome` and enter READY."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.s.limits.hello_timeout_s
        while self.state is State.AWAITING_HELLO:
            try:
                async with asyncio.timeout_at(deadline):
                    frame = await self.conn.recv()
            except TimeoutError:
                await self._close(CloseCode.HELLO_TIMEOUT, "no hello in time")
                return False
            if not self._admit():
                continue
            try:
                message = decode_frame(frame)
            except ProtocolError as error:
                if error.code is ErrorCode.UNAUTHORIZED:  # a hello without a usable token
                    await self._close(CloseCode.BAD_TOKEN, error.message)
                    return False
                self._refuse(error)
                continue
            if not isinstance(message, Hello):
                await self._close(CloseCode.BAD_TOKEN, "the first message must be hello")
                return False
            try:
                self.identity = verify_token(self.s.jwt_secret, message.token)
            except AuthError as error:
                await self._close(CloseCode.BAD_TOKEN, str(error)[:100])
                return False
            coins, diamonds = await self.s.wallet.balance(self.identity.user)
            self._enter(State.READY)
            welcome = Welcome(
                user=self.identity.user,
                name=self.identity.name,
                coins=coins,
                diamonds=diamonds,
                ts=now_ms(),
            )
            self._write(encode_reply(welcome, message.id))
        return self.state is State.READY

    # ---- requests -------------------------------------------------------------------------

    async def _serve(self, frame: str | bytes) -> None:
        # A gift in flight may have found the connection flooding: nothing more is served.
        if self._closed:
            return
        # The budget is taken first, so bad frames spend it too; the refusal comes after the
        # decode, so that it echoes the request's id like every other error reply.
        admitted = self._messages.take(time.monotonic())
        try:
            message: ClientMessage = decode_frame(frame)
        except ProtocolError as error:
            await self._gifts_answered()  # replies stay in request order
            if not self._closed:
                self._refuse(error)
            return
        if admitted and type(message) is SendGift and self._joined_live(message.room):
            if self._gifts_in_flight >= MAX_GIFTS_IN_FLIGHT:
                await self._gifts_answered()
            self._start_gift(message)
            return
        await self._gifts_answered()
        if not self._closed:
            self._deliver(await self._outcome(message, admitted))

    async def _outcome(self, message: ClientMessage, admitted: bool) -> Outcome:
        """Run the request's handler; what it came to is written by `_deliver`. A refusal is
        counted here, as soon as it is decided (see "gifts in flight")."""
        request_id = message.id
        try:
            if not admitted:
                raise _over_message_budget()
            reply = await _HANDLERS[type(message)](self, message)
            return None if reply is None else encode_reply(reply, request_id)
        except ProtocolError as error:
            refusal = error.with_request_id(request_id) if request_id is not None else error
        except ConnectionClosed:
            raise
        except Exception:
            log.exception("request failed on %s", self.conn.remote_address)
            refusal = ProtocolError(ErrorCode.INTERNAL, "internal error", request_id)
        self._count_refusal(refusal)
        return refusal

    def _deliver(self, outcome: Outcome) -> None:
        if isinstance(outcome, ProtocolError):
            self._write(encode_error(outcome))
        elif outcome is not None:
            self._write(outcome)

    # ---- gifts in flight ------------------------------------------------------------------
    # A gift to a room live here and joined is settled while the connection reads on: gifts
    # sent in a burst share Redis round trips instead of waiting one each. They still reach
    # Redis in the order they came (their path to the batcher does not suspend, and tasks
    # start in order), and their replies are written in that order: each waits for the one
    # before.
    # Any other request waits until every gift before it is answered. A refusal is counted
    # (strikes included) as soon as it is decided, so that a flood stops the gifts behind it
    # as it stopped the frames behind it when gifts were served one at a time.

    def _joined_live(self, room_id: str) -> bool:
        """Whether a gift to `room_id` goes straight to the script (the room is live here and
        joined). Any other takes the one-at-a-time path: its answer may need a Redis read
        first (a retry after the room ended), which must not overtake the gifts before it,
        nor hold one pooled Redis connection per gift of a burst."""
        hub = self.s.hub
        return room_id in hub.rooms and hub.is_member(self.conn, room_id)

    def _start_gift(self, message: SendGift) -> None:
        before = self._last_gift
        self._gifts_in_flight += 1
        task = asyncio.get_running_loop().create_task(self._gift(message, before))
        self._last_gift = task
        in_flight = self.s.gifts_in_flight  # shutdown answers them before it closes sockets
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)

    async def _gift(self, message: SendGift, before: asyncio.Task[None] | None) -> None:
        try:
            outcome: Outcome = None  # found flooding meanwhile: not served, like later frames
            if not self._closed:
                outcome = await self._outcome(message, admitted=True)
            if before is not None and not before.done():
                await asyncio.wait((before,))
            self._deliver(outcome)
            if self._close_with is not None and self._last_gift is asyncio.current_task():
                # the reader is waiting for a frame that may never come: close from here
                await self.conn.close(*self._close_with)
        except ConnectionClosed:
            pass
        finally:
            self._gifts_in_flight -= 1

    async def _gifts_answered(self) -> None:
        """Wait until every gift this connection sent so far has been answered."""
        last = self._last_gift
        if last is not None and not last.done():
            await asyncio.wait((last,))

    def _admit(self) -> bool:
        """Take one message from the rate budget before hello; over budget is refused."""
        if self._messages.take(time.monotonic()):
            return True
        self._refuse(_over_message_budget())
        return False

    def _refuse(self, error: ProtocolError) -> None:
        """Answer with the error, and count it."""
        self._write(encode_error(error))
        self._count_refusal(error)

    def _count_refusal(self, error: ProtocolError) -> None:
        """Bad frames and rate-limited requests are strikes: too many, and the connection is
        closed with 4429 once what was sent before is answered."""
        self.s.metrics.errors.labels(error.code.value).inc()
        if error.code in (ErrorCode.BAD_REQUEST, ErrorCode.RATE_LIMITED):
            if not self._strikes.take(time.monotonic()):
                self._enter(State.CLOSED)
                self._close_with = (CloseCode.FLOOD, "too many bad or excess messages")

    def _write(self, frame: bytes) -> None:
        self.s.fanout.write(self.conn, frame)

    def _enter(self, state: State) -> None:
        if state not in _TRANSITIONS[self.state]:
            raise RuntimeError(f"connection cannot go from {self.state.name} to {state.name}")
        self.state = state

    async def _close(self, code: CloseCode, reason: str) -> None:
        self._enter(State.CLOSED)
        await self.conn.close(code, reason)

    @property
    def _closed(self) -> bool:
        """Read afresh after every await: a gift task may close the connection meanwhile."""
        return self.state is State.CLOSED

    @property
    def user(self) -> Identity:
        assert self.identity is not None, "requests are served only after hello"
        return self.identity

    async def on_hello_again(self, message: Hello) -> Any:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "already authenticated")

    async def on_ping(self, message: Ping) -> Pong:
        return Pong(ts=now_ms())

    async def on_balance(self, message: GetBalance) -> BalanceReply:
        coins, diamonds = await self.s.wallet.balance(self.user.user)
        return BalanceReply(coins=coins, diamonds=diamonds)

    async def on_join(self, message: Join) -> None:
        hub = self.s.hub
        room = hub.rooms.get(message.room) or await hub.live_room(message.room)
        joined, missed = hub.join(self.conn, room, message.since)
        # written here, before any await, so no room flush can slip between them
        self._write(encode_reply(joined, message.id))
        if missed is not None:
            self._write(missed)

    async def on_leave(self, message: Leave) -> Left:
        if not self.s.hub.leave(self.conn, message.room):
            raise ProtocolError(ErrorCode.NOT_JOINED, f"you have not joined room {message.room}")
        return Left(room=message.room)

    async def on_go_live(self, message: GoLive) -> Live:
        if not self.user.can_go_live:
            raise ProtocolError(ErrorCode.FORBIDDEN, "only creators can go live")
        room = await self.s.hub.go_live(self.user.user, message.title, now_ms())
        return Live(room=room.id)

    async def on_end_live(self, message: EndLive) -> Ended:
        if not self.user.can_go_live:
            raise ProtocolError(ErrorCode.FORBIDDEN, "only creators can end a live")
        room = await self.s.hub.end_live(self.user.user)
        return Ended(room=room.id)

    async def on_watch(self, message: Watch) -> Watching:
        if not self.user.can_watch:
            raise ProtocolError(ErrorCode.FORBIDDEN, "only ops users can watch the ops feed")
        self.s.ops.watch(self.conn, message.rooms)
        return Watching(rooms=message.rooms)

    async def on_gift(self, message: SendGift) -> GiftOk:
        if not self._gifts.take(time.monotonic()):
            raise ProtocolError(ErrorCode.RATE_LIMITED, "too many gifts; slow down")
        gift = self.s.catalog.gifts.get(message.gift)
        if gift is None:
            raise ProtocolError(ErrorCode.UNKNOWN_GIFT, f"no gift {message.gift} in the catalog")
        try:
            room = self._giftable_room(message.room) or await self.s.hub.live_room(message.room)
        except ProtocolError:
            # A retry of a key settled before the room ended, or on a connection that has
            # not joined yet, still gets its first `gift_ok` (one Redis read, refusals only).
            settled = await self.s.wallet.settled_gift(
                sender=self.user.user,
                key=message.key,
                room=message.room,
                gift=message.gift,
                count=message.count,
            )
            if settled is None:
                raise
        else:
            if self.s.draining:
                raise ProtocolError(ErrorCode.OVERLOADED, "server is shutting down; retry")
            settled = await self._settle(room, gift, message)
        return GiftOk(
            key=message.key, event=settled.event, coins=settled.coins, combo=settled.combo
        )

    def _giftable_room(self, room_id: str) -> Room | None:
        """The live room the sender may gift in; None when it is not live here; the
        refusal when the sender has not joined it or is its creator."""
        room = self.s.hub.rooms.get(room_id)
        if room is None:
            return None
        if not self.s.hub.is_member(self.conn, room.id):
            raise ProtocolError(ErrorCode.NOT_JOINED, f"join room {room.id} before gifting")
        if room.creator == self.user.user:
            raise ProtocolError(ErrorCode.FORBIDDEN, "creators cannot gift their own room")
        return room

    async def _settle(self, room: Room, gift: Gift, message: SendGift) -> SettledGift:
        """Debit and credit in one script; the room's event is queued as Redis answers, even
        if this connection drops meanwhile, so a gift is never settled unseen."""
        sender = self.user
        hub, ops = self.s.hub, self.s.ops

        def publish(settled: SettledGift) -> None:
            if settled.replayed:
                return
            ops.record_gift(gift.coins * message.count)
            if hub.rooms.get(room.id) is room:
                hub.publish(
                    room,
                    lambda seq: GiftEvent(
                        room=room.id,
                        seq=seq,
                        event=settled.event,
                        sender_id=sender.user,
                        sender_name=sender.name,
                        gift_id=gift.id,
                        gift_name=gift.name,
                        gift_coins=gift.coins,
                        animation=gift.animation,
                        count=message.count,
                        combo=settled.combo,
                        ts=settled.ts,
                    ).as_dict(),
                )

        return await self.s.wallet.send_gift(
            sender=sender.user,
            adult=sender.adult,
            creator=room.creator,
            room=room.id,
            gift=gift,
            count=message.count,
            key=message.key,
            now_ms=now_ms(),
            on_settled=publish,
        )


def _over_message_budget() -> ProtocolError:
    return ProtocolError(ErrorCode.RATE_LIMITED, "too many messages; slow down")


# Each request type's handler, shared by every session.
_HANDLERS: dict[type[Any], Callable[[Session, Any], Awaitable[Any]]] = {
    Join: Session.on_join,
    Leave: Session.on_leave,
    SendGift: Session.on_gift,
    GetBalance: Session.on_balance,
    GoLive: Session.on_go_live,
    EndLive: Session.on_end_live,
    Watch: Session.on_watch,
    Ping: Session.on_ping,
    Hello: Session.on_hello_again,
}
