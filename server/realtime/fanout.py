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


class Fanout:
    """Sends pre-encoded text frames; a connection past `max_backlog` unsent bytes gets 4008.

    Frames go straight to each connection's transport: websockets keeps no state about
    outgoing data frames when nothing is fragmented and compression is off (the gateway
    turns it off), and its own writes (pings, pongs, close) are whole frames too, so
    whole frames written here interleave safely with them.
    """

    def __init__(self, max_backlog: int, metrics: Metrics) -> None:
        self.max_backlog = max_backlog
        self.metrics = metrics
        self._closing: set[ServerConnection] = set()
        self._close_tasks: set[asyncio.Task[None]] = set()

    def deliver(self, connections: Iterable[ServerConnection], payload: bytes) -> None:
        """Frame `payload` once and send it to every connection."""
        self.send(connections, text_frame(payload))

    def send(self, connections: Iterable[ServerConnection], frame: bytes) -> None:
        """Write a built frame to every open connection now, then close any that lag."""
        bound = self.max_backlog
        slow: list[ServerConnection] = []
        sent = 0
        for conn in connections:
            if conn.protocol.state is not State.OPEN:
                continue
            transport = conn.transport
            transport.write(frame)
            sent += 1
            if transport.get_write_buffer_size() > bound:
                slow.append(conn)
        self.metrics.broadcast_deliveries.inc(sent)
        for conn in slow:
            self.close_slow(conn)

    def write(self, conn: ServerConnection, payload: bytes) -> None:
        """One frame to one connection, in order with everything else it is sent."""
        self.deliver((conn,), payload)

    def close_slow(self, conn: ServerConnection) -> None:
        """Close a connection that does not read: 4008, once; it may rejoin with `since`."""
        if conn in self._closing or conn.protocol.state is not State.OPEN:
            return
        self._closing.add(conn)
        self.metrics.slow_consumer_closes.inc()
        log.info("closing slow consumer %s", conn.remote_address)
        task = asyncio.get_running_loop().create_task(
            conn.close(CloseCode.SLOW_CONSUMER, "slow consumer: rejoin with since")
        )
        self._close_tasks.add(task)
        task.add_done_callback(functools.partial(self._closed, conn))

    def _closed(self, conn: ServerConnection, task: asyncio.Task[None]) -> None:
        self._close_tasks.discard(task)
        self._closing.discard(conn)
