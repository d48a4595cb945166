"""One load-test WebSocket connection, lean: websockets' Sans-I/O client protocol driven by an
asyncio Protocol, each message handed to a callback as soon as it is parsed.

A load-test worker reads tens of thousands of room frames a second. Through the asyncio
`ClientConnection` each one also goes through a message queue, a future and a wake-up of
the task reading it, and each gift sent through a lock and a context manager; here a frame
costs the parse (websockets' own, so framing, pings and the closing handshake stay the
library's) and one call. Handshake replies (`welcome`, `joined`) are awaited with `recv()`
before a handler is set; everything else goes to the handler, in order.
"""

from __future__ import annotations

import asyncio
import collections
import socket
from collections.abc import Callable
from typing import cast

from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed, InvalidState
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.uri import parse_uri

MAX_MESSAGE = 1 << 24  # a catch-up batch after a long outage can be large
CLOSE_TIMEOUT_S = 2.0

OnMessage = Callable[[bytes], None]


class Link(asyncio.Protocol):
    """A client connection. `await open_link(...)` returns it with the handshake done."""

    def __init__(self, url: str) -> None:
        loop = asyncio.get_running_loop()
        self.protocol = ClientProtocol(parse_uri(url), max_size=MAX_MESSAGE)
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.on_message: OnMessage | None = None
        self.on_close: Callable[[Link], None] | None = None
        self._inbox: collections.deque[bytes] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._fragments: list[bytes] = []
        self._close_timer: asyncio.TimerHandle | None = None

    # ---- what the load test calls ---------------------------------------------------------

    def handle(self, on_message: OnMessage, on_close: Callable[[Link], None]) -> None:
        """From now on every message goes to `on_message` (those already read first), and
        the end of the connection to `on_close`."""
        self.on_message = on_message
        self.on_close = on_close
        while self._inbox:
            on_message(self._inbox.popleft())
        if self.closed.done():
            on_close(self)

    async def recv(self) -> bytes:
        """The next message, before a handler is set (the hello and join replies)."""
        while not self._inbox:
            if self.closed.done():
                raise ConnectionClosed(self.protocol.close_rcvd, self.protocol.close_sent)
            self._waiter = asyncio.get_running_loop().create_future()
            await asyncio.wait([self._waiter, self.closed], return_when=asyncio.FIRST_COMPLETED)
        return self._inbox.popleft()

    def send_text(self, payload: bytes) -> None:
        """One text message, written now; ConnectionClosed once the connection is closing."""
        try:
            self.protocol.send_text(payload)
        except InvalidState as exc:
            raise ConnectionClosed(self.protocol.close_rcvd, self.protocol.close_sent) from exc
        self._write_out()

    @property
    def close_code(self) -> int | None:
        return self.protocol.close_code

    def pause_reading(self) -> None:
        """Stop reading, as a stalled app would: the server sees its backlog grow."""
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    async def close(self) -> None:
        """The closing handshake (1000), cut off after CLOSE_TIMEOUT_S."""
        if self.protocol.state is State.OPEN:
            self.protocol.send_close(1000)
            self._write_out()
        try:
            await asyncio.wait_for(asyncio.shield(self.closed), CLOSE_TIMEOUT_S)
        except TimeoutError:
            self.abort()

    def abort(self) -> None:
        """Drop the connection with no close frame, as a lost network would."""
        if self.transport is not None:
            self.transport.abort()

    # ---- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.protocol.send_request(self.protocol.connect())
        self._write_out()

    def data_received(self, data: bytes) -> None:
        self.protocol.receive_data(data)
        for event in self.protocol.events_received():
            if type(event) is Frame:
                self._frame(event)
            elif isinstance(event, Response):
                self._handshake_done()
        self._write_out()  # pongs, the close reply

    def eof_received(self) -> bool | None:
        self.protocol.receive_eof()
        self._write_out()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.protocol.receive_eof()  # idempotent; the state is CLOSED from here
        if self._close_timer is not None:
            self._close_timer.cancel()
        if not self.opened.done():
            failure = self.protocol.handshake_exc or exc
            self.opened.set_exception(failure or ConnectionError("closed during the handshake"))
        if not self.closed.done():
            self.closed.set_result(None)
        if self.on_close is not None:
            self.on_close(self)

    # ---- inside ---------------------------------------------------------------------------

    def _handshake_done(self) -> None:
        if self.opened.done():
            return
        if self.protocol.handshake_exc is not None:
            self.opened.set_exception(self.protocol.handshake_exc)
        else:
            self.opened.set_result(None)

    def _frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        data = bytes(frame.data)  # the parser hands over bytearrays: hashable bytes, as recv gives
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            if frame.fin:
                self._message(data)
            else:
                self._fragments = [data]
        elif opcode is Opcode.CONT:
            self._fragments.append(data)
            if frame.fin:
                self._message(b"".join(self._fragments))
                self._fragments = []
        # PING, PONG and CLOSE: the protocol has queued what they need

    def _message(self, data: bytes) -> None:
        on_message = self.on_message
        if on_message is not None:
            on_message(data)
            return
        self._inbox.append(data)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _write_out(self) -> None:
        transport = self.transport
        if transport is None:
            return
        for data in self.protocol.data_to_send():
            if data:
                transport.write(data)
            elif transport.can_write_eof():
                transport.write_eof()
        if self.protocol.close_expected() and self._close_timer is None:
            loop = asyncio.get_running_loop()
            self._close_timer = loop.call_later(CLOSE_TIMEOUT_S, self.abort)


async def open_link(
    url: str, *, sock: socket.socket | None = None, timeout_s: float = 30.0
) -> Link:
    """Connect to `url` (ws:// only: the load test speaks to its own servers) and complete
    the opening handshake; on `sock` when given (a small-window socket for a slow reader)."""
    uri = parse_uri(url)
    if uri.secure:
        raise ValueError("the load test's lean connections speak ws:// only")
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout_s):
        if sock is not None:
            _, link = await loop.create_connection(lambda: Link(url), sock=sock)
        else:
            _, link = await loop.create_connection(lambda: Link(url), uri.host, uri.port)
        try:
            await link.opened
        except BaseException:
            link.abort()
            raise
    return link
