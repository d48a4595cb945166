"""Writing frames to connections without ever awaiting one, and closing those that lag.

Every server-to-client frame goes through here, replies included, so the order a client
sees is the order frames were written, and no viewer can stall a room (DESIGN.md §3).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import struct
from collections.abc import Iterable

from websockets.asyncio.server import ServerConnection
from websockets.protocol import State

from giftstream.protocol.errors import CloseCode
from giftstream.server.metrics import Metrics

log = logging.getLogger(__name__)


def text_frame(payload: bytes) -> bytes:
    """A whole unmasked, uncompressed WebSocket text frame (RFC 6455 §5.2), as a server sends
    it: built once per room tick and written as-is to every viewer."""
    size = len(payload)
    if size < 126:
        header = bytes((0x81, size))
    elif size < 1 << 16:
        header = struct.pack("!BBH", 0x81, 126, size)
    else:
        header = struct.pack("!BBQ", 0x81, 127, size)
    return header + payload


async def close_or_abort(
    conn: ServerConnection, code: CloseCode, reason: str, timeout_s: float
) -> None:
    """Close with `code`; a peer that has not finished the close within `timeout_s` has its
    TCP connection aborted, which frees its write buffer.

    websockets' `close()` first waits for the write buffer to drain below its low-water mark
    and only then starts its own close timeout: a peer that never reads holds it (and every
    byte buffered for it) for ever.
    """
    try:
        async with asyncio.timeout(timeout_s):
            await conn.close(code, reason)
    except TimeoutError:
        conn.transport.abort()


class Fanout:
    """Sends pre-encoded text frames, each only if it fits: a connection whose unsent bytes
    would pass `max_backlog` with it is not written to but closed 4008.

    The bound is checked before the write, so no connection ever holds more than
    `max_backlog` unsent bytes here (plus its close frame), whatever it asks for; one that is
    closed for it is aborted after `close_timeout_s` if it does not read the close.

    Frames go straight to each connection's transport: websockets keeps no state about
    outgoing data frames when nothing is fragmented and compression is off (the gateway
    turns it off), and its own writes (pings, pongs, close) are whole frames too, so
    whole frames written here interleave safely with them.
    """

    def __init__(self, max_backlog: int, metrics: Metrics, close_timeout_s: float = 5.0) -> None:
        self.max_backlog = max_backlog
        self.close_timeout_s = close_timeout_s
        self.metrics = metrics
        self._closing: dict[ServerConnection, asyncio.Task[None]] = {}

    def deliver(self, connections: Iterable[ServerConnection], payload: bytes) -> None:
        """Frame `payload` once and send it to every connection."""
        self.send(connections, text_frame(payload))

    def send(self, connections: Iterable[ServerConnection], frame: bytes) -> None:
        """Write built frame(s) to every open connection they fit in; close the others."""
        bound = self.max_backlog - len(frame)
        closing = self._closing
        slow: list[ServerConnection] = []
        sent = 0
        for conn in connections:
            if conn.protocol.state is not State.OPEN or conn in closing:
                continue
            transport = conn.transport
            if transport.get_write_buffer_size() > bound:
                slow.append(conn)
                continue
            transport.write(frame)
            sent += 1
        self.metrics.broadcast_deliveries.inc(sent)
        for conn in slow:
            self.close_slow(conn)

    def write(self, conn: ServerConnection, *payloads: bytes) -> None:
        """Frames to one connection, in order with everything else it is sent: all of them
        (a `joined` and its replay) or, when they would pass the bound together, none."""
        if len(payloads) == 1:
            self.deliver((conn,), payloads[0])
        else:
            self.send((conn,), b"".join(text_frame(payload) for payload in payloads))

    def is_closing(self, conn: ServerConnection) -> bool:
        """Whether `conn` is being closed for its backlog: nothing more is written to it."""
        return conn in self._closing

    async def wait_closed(self, conn: ServerConnection) -> None:
        """Wait for the 4008 close of `conn`, if one is under way: a session that returned
        before it would have websockets close with 1000 instead."""
        task = self._closing.get(conn)
        if task is not None:
            await asyncio.shield(task)

    def close_slow(self, conn: ServerConnection) -> None:
        """Close a connection that does not read: 4008, once; it may rejoin with `since`."""
        if conn in self._closing or conn.protocol.state is not State.OPEN:
            return
        self.metrics.slow_consumer_closes.inc()
        log.info("closing slow consumer %s", conn.remote_address)
        task = asyncio.get_running_loop().create_task(
            close_or_abort(
                conn,
                CloseCode.SLOW_CONSUMER,
                "slow consumer: rejoin with since",
                self.close_timeout_s,
            )
        )
        self._closing[conn] = task
        task.add_done_callback(functools.partial(self._closed, conn))

    def _closed(self, conn: ServerConnection, task: asyncio.Task[None]) -> None:
        self._closing.pop(conn, None)
