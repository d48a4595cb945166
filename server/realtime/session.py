"""One WebSocket connection's asyncio side: reads frames, feeds them to its `Connection`
(the rules: states, hello deadline, limits, strikes, reply order) and carries out what it
answers, with one handler per request.

Every reply and event is written through the fan-out, never awaited, so a client's replies
and its rooms' events reach it in the order they were produced.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from giftstream.protocol.codec import (
    encode_error,
    encode_reply,
    gift_json,
    sender_json,
    text_json,
)
from giftstream.protocol.errors import CloseCode, ErrorCode, ProtocolError
from giftstream.protocol.events import (
    BalanceReply,
    CatalogGift,
    CatalogReply,
    Ended,
    GiftEvent,
    GiftOk,
    Leader,
    LeaderboardReply,
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
    GetCatalog,
    GetLeaderboard,
    GoLive,
    Hello,
    Join,
    Leave,
    Ping,
    RequestId,
    SendGift,
    Watch,
)
from giftstream.server.config import Limits
from giftstream.server.metrics import Metrics
from giftstream.server.money.boards import board_of
from giftstream.server.money.catalog import Catalog, Gift
from giftstream.server.money.refusal import Refusal
from giftstream.server.money.wallet import GiftRoom, SettledGift, Wallet
from giftstream.server.realtime.auth import AuthError, Identity, TokenRules, verify_token
from giftstream.server.realtime.broker import Event, MakeEvent
from giftstream.server.realtime.caps import CapReason, ConnectionCaps
from giftstream.server.realtime.connection import Connection, Outcome, State, Step
from giftstream.server.realtime.fanout import Fanout, close_or_abort
from giftstream.server.realtime.hub import Hub, Room
from giftstream.server.realtime.ops import OpsFeed
from giftstream.server.realtime.ratelimit import SharedBuckets
from giftstream.server.realtime.refusals import protocol_error

log = logging.getLogger(__name__)

# Members bound once for the per-message path (see connection.py).
_READY, _CLOSED = State.READY, State.CLOSED
_REFUSE, _SERVE, _START_GIFT, _WAIT = Step.REFUSE, Step.SERVE, Step.START_GIFT, Step.WAIT


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class NodeParts:
    """The node's parts and settings every session uses; built once by the app."""

    limits: Limits
    tokens: TokenRules
    caps: ConnectionCaps
    catalog: Catalog
    wallet: Wallet
    hub: Hub
    ops: OpsFeed
    fanout: Fanout
    metrics: Metrics


@dataclass(slots=True)
class NodeState:
    """What the node's sessions change as they run, and shutdown reads."""

    draining: bool = False  # shutting down: gifts are refused `overloaded`
    connections: int = 0
    # Gift tasks of every session, still settling or waiting to write their reply.
    gift_tasks: set[asyncio.Task[None]] = field(default_factory=set)
    # each user's gift budget over all their connections here (Limits.user_gifts_per_s)
    user_gifts: SharedBuckets = field(default_factory=lambda: SharedBuckets(20.0, 40))


class Session:
    """Serves one connection from upgrade to close. Thousands live at once: slotted, and the
    request handlers are looked up on the class, not bound per connection."""

    __slots__ = (
        "_all_answered",
        "_closer",
        "_expiry",
        "_sender_json",
        "conn",
        "core",
        "identity",
        "node",
        "parts",
    )

    def __init__(self, conn: ServerConnection, parts: NodeParts, node: NodeState) -> None:
        self.conn = conn
        self.parts = parts
        self.node = node
        # the predicate holds the hub and the socket, not the session: no reference cycle
        goes_straight = functools.partial(_joined_live, parts.hub, conn)
        self.core = Connection(parts.limits, time.monotonic(), goes_straight)
        self.identity: Identity | None = None
        # set while the reader waits for every gift in flight to be answered
        self._all_answered: asyncio.Future[None] | None = None
        self._expiry: asyncio.TimerHandle | None = None  # fires at the token's deadline
        self._closer: asyncio.Task[None] | None = None  # the close it started
        self._sender_json = b""  # this user as a gift event's `sender`, encoded once

    async def run(self) -> None:
        parts, node, core = self.parts, self.node, self.core
        parts.metrics.connections.inc()
        node.connections += 1
        fanout = parts.fanout
        _cap_send_buffer(self.conn, parts.limits.send_buffer_bytes)
        try:
            if await self._authenticate():
                async for frame in self.conn:
                    await self._serve(frame)
                    if core.state is _CLOSED or fanout.is_closing(self.conn):
                        break  # closing: nothing more is served (or written)
            if core.close_with is not None:
                await self._gifts_answered()  # their replies go before the close frame
                await self._close(core.close_with)
            await fanout.wait_closed(self.conn)
        except ConnectionClosed:
            pass
        finally:
            if self._expiry is not None:
                self._expiry.cancel()
            if self.identity is not None:
                parts.caps.user_left(self.identity.user)
                if self.identity.can_go_live:
                    parts.hub.creator_gone(self.identity.user)
            core.connection_lost()
            parts.hub.leave_all(self.conn)
            parts.ops.unwatch(self.conn)
            parts.metrics.connections.dec()
            node.connections -= 1

    # ---- hello ----------------------------------------------------------------------------

    async def _authenticate(self) -> bool:
        """Wait for a valid hello; on success send `welcome` (the core is then READY)."""
        core = self.core
        while core.state is State.AWAITING_HELLO:
            try:
                async with asyncio.timeout(core.hello_deadline - time.monotonic()):
                    frame = await self.conn.recv()
            except TimeoutError:
                core.hello_deadline_passed()
                return False
            step = core.receive(frame, time.monotonic())
            if step is Step.REFUSE:
                assert core.refusal is not None
                self._refuse(core.refusal)
                continue
            if step is not Step.AUTHENTICATE:
                return False  # closed: not a hello, or one without a usable token
            hello = core.request
            assert isinstance(hello, Hello)
            try:
                identity = verify_token(self.parts.tokens, hello.token)
            except AuthError as error:
                core.token_refused(str(error))
                return False
            if not self.parts.caps.admit_user(identity.user):
                self.parts.metrics.connections_refused.labels(CapReason.USER_CAP.value).inc()
                core.over_user_cap()
                return False
            self.identity = identity  # counted against its user until the session ends
            self._sender_json = sender_json(identity.user, identity.name)
            if identity.can_go_live:  # their room's creator_seen is kept fresh meanwhile
                self.parts.hub.creator_connected(identity.user)
            coins, diamonds = await self.parts.wallet.balance(identity.user)
            self._expire_at(identity.valid_until)
            welcome = Welcome(
                user=identity.user,
                name=identity.name,
                coins=coins,
                diamonds=diamonds,
                ts=now_ms(),
            )
            self._write(encode_reply(welcome, hello.id))
        return core.state is State.READY

    def _expire_at(self, valid_until: float) -> None:
        """Welcome the core with its token's deadline (moved from Unix time to the core's
        clock) and arm the timer that closes the connection 4401 then."""
        left = valid_until - time.time()
        self.core.welcomed(time.monotonic() + left)
        if left < 1e9:  # a token that never expires in practice needs no timer
            loop = asyncio.get_running_loop()
            self._expiry = loop.call_later(max(0.0, left), self._token_expired)

    def _token_expired(self) -> None:
        self._expiry = None
        core = self.core
        if core.token_deadline_passed() is Step.CLOSE:
            close = core.close_due  # None: the last gift in flight closes once answered
            if close is not None:
                self._closer = asyncio.get_running_loop().create_task(self.conn.close(*close))

    # ---- requests -------------------------------------------------------------------------

    async def _serve(self, frame: str | bytes) -> None:
        core = self.core
        step = core.receive(frame, time.monotonic())
        if step is _WAIT:
            await self._gifts_answered()  # replies stay in request order
            step = core.resume(time.monotonic())
        if step is _SERVE:
            message = core.request
            assert message is not None
            outcome = await self._outcome(message)
            core.answered()
            self._deliver(outcome)
        elif step is _START_GIFT:
            self._start_gift(core.request, core.ticket)
        elif step is _REFUSE:
            assert core.refusal is not None
            self._refuse(core.refusal)

    async def _outcome(self, message: ClientMessage) -> Outcome:
        """Run the request's handler: its encoded reply, None when the handler wrote it, or
        the refusal (counted here, strikes included, as soon as it is decided)."""
        request_id = message.id
        try:
            reply = await _HANDLERS[type(message)](self, message)
            return None if reply is None else encode_reply(reply, request_id)
        except ProtocolError as error:
            refusal = error.with_request_id(request_id) if request_id is not None else error
        except Refusal as money_refusal:  # unmapped: no WebSocket request causes it, a bug
            refusal = protocol_error(money_refusal, request_id) or self._failed(request_id)
        except ConnectionClosed:
            raise
        except Exception:
            refusal = self._failed(request_id)
        self._count_refusal(refusal)
        self.core.refused(refusal, time.monotonic())
        return refusal

    def _failed(self, request_id: RequestId) -> ProtocolError:
        """A request that failed on our side (called while its exception is handled): logged
        with its traceback, answered `internal`."""
        log.exception("request failed on %s", self.conn.remote_address)
        return ProtocolError(ErrorCode.INTERNAL, "internal error", request_id)

    def _deliver(self, outcome: Outcome) -> None:
        if isinstance(outcome, ProtocolError):
            self._write(encode_error(outcome))
        elif outcome is not None:
            self._write(outcome)

    def _refuse(self, error: ProtocolError) -> None:
        """Answer with the error the core refused a frame with, and count it."""
        self._count_refusal(error)
        self._write(encode_error(error))

    def _count_refusal(self, error: ProtocolError) -> None:
        """Every error reply, in the metrics and in the ops feed's refusals by code."""
        code = error.code.value
        self.parts.metrics.errors.labels(code).inc()
        self.parts.ops.record_refusal(code)

    def _write(self, *frames: bytes) -> None:
        self.parts.fanout.write(self.conn, *frames)

    async def _close(self, close_with: tuple[CloseCode, str]) -> None:
        """Close with the core's code; a peer that does not read the close is cut off."""
        code, reason = close_with
        await close_or_abort(self.conn, code, reason, self.parts.limits.close_timeout_s)

    # ---- gifts in flight ------------------------------------------------------------------
    # A gift to a room live here and joined is settled while the connection reads on: gifts
    # sent in a burst share Redis round trips instead of waiting one each. They still reach
    # Redis in the order they came (their path to the batcher does not suspend, and tasks
    # start in order); the core releases their outcomes for writing in that order.

    def _start_gift(self, message: ClientMessage | None, ticket: int) -> None:
        """Nothing cancels a gift task (shutdown waits for them): one cancelled before its
        first step would never answer its ticket, and the gifts behind it would wait."""
        assert isinstance(message, SendGift)
        task = asyncio.get_running_loop().create_task(self._gift(message, ticket))
        in_flight = self.node.gift_tasks  # shutdown answers them before it closes sockets
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)

    async def _gift(self, message: SendGift, ticket: int) -> None:
        core = self.core
        outcome: Outcome = None  # found flooding meanwhile: not served, like later frames
        try:
            if core.state is _READY:
                outcome = await self._outcome(message)
        except ConnectionClosed:
            pass
        finally:
            try:  # cancelled or not, the gifts behind this one get their turn
                for answer in core.gift_answered(ticket, outcome):
                    self._deliver(answer)
            finally:  # even past a bug above: the reader must not wait for ever
                waiter = self._all_answered
                if waiter is not None and not core.gifts_in_flight and not waiter.done():
                    waiter.set_result(None)
        if core.close_with is not None:  # the cheap test first: this runs per gift
            close = core.close_due
            if close is not None:
                # the reader may be waiting for a frame that never comes: close from here
                with contextlib.suppress(ConnectionClosed):
                    await self._close(close)

    async def _gifts_answered(self) -> None:
        """Wait until every gift this connection sent so far has been answered."""
        if self.core.gifts_in_flight:
            waiter = asyncio.get_running_loop().create_future()
            self._all_answered = waiter
            try:
                await waiter
            finally:
                self._all_answered = None

    @property
    def user(self) -> Identity:
        assert self.identity is not None, "requests are served only after hello"
        return self.identity

    async def on_hello_again(self, message: Hello) -> Any:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "already authenticated")

    async def on_ping(self, message: Ping) -> Pong:
        return Pong(ts=now_ms())

    async def on_balance(self, message: GetBalance) -> BalanceReply:
        coins, diamonds = await self.parts.wallet.balance(self.user.user)
        return BalanceReply(coins=coins, diamonds=diamonds)

    async def on_catalog(self, message: GetCatalog) -> CatalogReply:
        return _catalog_reply(self.parts.catalog)

    async def on_leaderboard(self, message: GetLeaderboard) -> LeaderboardReply:
        """A board's top 10 (boards.py): any authenticated user, any room ever opened."""
        board, room = board_of(message.board, message.room)
        entries = await self.parts.wallet.boards.top(board, room)  # a Refusal maps in _outcome
        return LeaderboardReply(
            board=board.value,
            room=room,
            entries=tuple(Leader(e.user, e.name, e.coins, e.rank) for e in entries),
        )

    async def on_join(self, message: Join) -> None:
        hub = self.parts.hub
        if message.since is not None:
            self.core.admit_replay(time.monotonic())
        room = hub.rooms.get(message.room) or await hub.live_room(message.room)
        await hub.catch_up(room, message.since)
        joined, missed = hub.join(self.conn, room, message.since, user=self.user.user)
        # written here, before any await, so no room flush can slip between them; together
        # or not at all: a replay that would pass the backlog bound closes the socket 4008
        reply = encode_reply(joined, message.id)
        if missed is None:
            self._write(reply)
        else:
            self._write(reply, missed)

    async def on_leave(self, message: Leave) -> Left:
        if not self.parts.hub.leave(self.conn, message.room):
            raise ProtocolError(ErrorCode.NOT_JOINED, f"you have not joined room {message.room}")
        return Left(room=message.room)

    async def on_go_live(self, message: GoLive) -> Live:
        if not self.user.can_go_live:
            raise ProtocolError(ErrorCode.FORBIDDEN, "only creators can go live")
        user = self.user
        room = await self.parts.hub.go_live(user.user, message.title, now_ms(), user.name)
        return Live(room=room.id)

    async def on_end_live(self, message: EndLive) -> Ended:
        if not self.user.can_go_live:
            raise ProtocolError(ErrorCode.FORBIDDEN, "only creators can end a live")
        await self.parts.hub.end_live(self.user.user)
        return Ended(room=self.user.user)

    async def on_watch(self, message: Watch) -> Watching:
        if not self.user.can_watch:
            raise ProtocolError(ErrorCode.FORBIDDEN, "only ops users can watch the ops feed")
        self.parts.ops.watch(self.conn, message.rooms)
        await self.parts.hub.follow_live(message.rooms)
        live = await self.parts.hub.live_rooms(message.rooms)
        return Watching(rooms=message.rooms, live=live)

    async def on_gift(self, message: SendGift) -> GiftOk:
        now = time.monotonic()
        self.core.admit_gift(now)
        if not self.node.user_gifts.take(self.user.user, now):
            # refused or not, a gift costs Redis a script: the budget is the user's, so more
            # sockets do not buy more of it
            raise ProtocolError(ErrorCode.RATE_LIMITED, "too many gifts from your account")
        gift = self.parts.catalog.gifts.get(message.gift)
        if gift is None:
            raise ProtocolError(ErrorCode.UNKNOWN_GIFT, f"no gift {message.gift} in the catalog")
        try:
            room = self._giftable_room(message.room)
            if room is None:  # not followed here, so not joined here
                raise await self.parts.hub.refusal_elsewhere(message.room)
        except ProtocolError:
            # A retry of a key settled before the room ended, or on a connection that has
            # not joined yet, still gets its first `gift_ok` (one Redis read, refusals only).
            settled = await self.parts.wallet.settled_gift(
                sender=self.user.user,
                key=message.key,
                room=message.room,
                gift=message.gift,
                count=message.count,
            )
            if settled is None:
                raise
            live = self.parts.hub.rooms.get(message.room)
            if live is not None:  # joined elsewhere first: unseen if its gateway died
                self._publish_gift(live, gift, message.count, settled)
        else:
            if self.node.draining:
                raise ProtocolError(ErrorCode.OVERLOADED, "server is shutting down; retry")
            settled = await self._settle(room, gift, message)
        return GiftOk(
            key=message.key, event=settled.event, coins=settled.coins, combo=settled.combo
        )

    def _publish_gift(self, room: Room, gift: Gift, count: int, settled: SettledGift) -> None:
        """The room's event (and the ops feed's count) for a settled gift, once per event: a
        fresh settlement, or a replay of its key whose first publication never happened (its
        reply was lost with it). Runs as Redis answers, whoever waits for the reply."""
        if not settled.replayed:
            self.parts.ops.record_gift(gift.coins * count)
        hub = self.parts.hub
        if hub.first_publication(room, settled.event, settled.ts, replayed=settled.replayed):
            if settled.replayed:
                self.parts.ops.record_gift(gift.coins * count)
            hub.publish(room, _gift_event(room, self.user, gift, count, settled))

    def _giftable_room(self, room_id: str) -> Room | None:
        """The live room the sender may gift in; None when it is not live here; the
        refusal when the sender has not joined it or is its creator."""
        room = self.parts.hub.rooms.get(room_id)
        if room is None:
            return None
        if not self.parts.hub.is_member(self.conn, room.id):
            raise ProtocolError(ErrorCode.NOT_JOINED, f"join room {room.id} before gifting")
        if room.creator == self.user.user:
            raise ProtocolError(ErrorCode.FORBIDDEN, "creators cannot gift their own room")
        return room

    async def _settle(self, room: Room, gift: Gift, message: SendGift) -> SettledGift:
        """Debit and credit in one script, which refuses a room no longer live (ended on any
        gateway). With a shared broker the script also appends the gift's event to the room's
        log; else the event is queued as Redis answers, even if this connection drops
        meanwhile. Either way a gift is never settled unseen."""
        sender = self.user
        in_room = GiftRoom(
            record=self.parts.hub.keyspace.room(room.id),
            log=self.parts.hub.broker.gift_log(room.id),
            room_json=room.json,
            sender_json=self._sender_json,
            gift_json=_gift_json(gift),
            log_size=self.parts.limits.history_size,
            name_json=text_json(sender.name),
        )

        def publish(settled: SettledGift) -> None:
            self._publish_gift(room, gift, message.count, settled)

        return await self.parts.wallet.send_gift(
            sender=sender.user,
            adult=sender.adult,
            creator=room.creator,
            room=room.id,
            gift=gift,
            count=message.count,
            key=message.key,
            on_settled=publish,
            in_room=in_room,
        )


def _catalog_reply(catalog: Catalog) -> CatalogReply:
    """The catalog as the `catalog` reply (asked once per page load: built when asked)."""
    return CatalogReply(
        gifts=tuple(
            CatalogGift(id=gift.id, name=gift.name, coins=gift.coins, animation=gift.animation)
            for gift in catalog.gifts.values()
        )
    )


@functools.lru_cache(maxsize=1024)
def _gift_json(gift: Gift) -> bytes:
    """A catalog gift as a gift event's `gift`, encoded once."""
    return gift_json(gift.id, gift.name, gift.coins, gift.animation)


def _gift_event(
    room: Room, sender: Identity, gift: Gift, count: int, settled: SettledGift
) -> MakeEvent:
    def make(seq: int) -> Event:
        return GiftEvent(
            room=room.id,
            seq=seq,
            event=settled.event,
            sender_id=sender.user,
            sender_name=sender.name,
            gift_id=gift.id,
            gift_name=gift.name,
            gift_coins=gift.coins,
            animation=gift.animation,
            count=count,
            combo=settled.combo,
            ts=settled.ts,
        ).as_dict()

    return make


def _cap_send_buffer(conn: ServerConnection, size: int) -> None:
    """Fix the kernel's send buffer of the socket: what a peer that never reads makes this
    host hold is then the backlog bound plus this, not megabytes of autotuned buffer."""
    sock = conn.transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


def _joined_live(hub: Hub, conn: ServerConnection, room_id: str) -> bool:
    """Whether a gift to `room_id` goes straight to the script (the room is live here and
    joined). Any other takes the one-at-a-time path: its answer may need a Redis read
    first (a retry after the room ended), which must not overtake the gifts before it,
    nor hold one pooled Redis connection per gift of a burst."""
    return room_id in hub.rooms and hub.is_member(conn, room_id)


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
    GetCatalog: Session.on_catalog,
    Hello: Session.on_hello_again,
    GetLeaderboard: Session.on_leaderboard,
}
