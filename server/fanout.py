"""Writing frames to connections without ever awaiting one, and closing those that lag.

Every server-to-client frame goes through here, replies included, so the order a client
sees is the order frames were written, and no viewer can stall a room (DESIGN.md §3).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Collection

from websockets.asyncio.server import ServerConnection, broadcast
from websockets.protocol import State

from protocol.errors import CloseCode
from server.metrics import Metrics

log = logging.getLogger(__name__)


class Fanout:
    """Sends pre-encoded text frames; a connection past `max_backlog` unsent bytes gets 4008."""

    def __init__(self, max_backlog: int, metrics: Metrics) -> None:
        self.max_backlog = max_backlog
        self.metrics = metrics
        self._closing: set[ServerConnection] = set()
        self._close_tasks: set[asyncio.Task[None]] = set()

    def deliver(self, connections: Collection[ServerConnection], frame: bytes) -> None:
        """Write the same bytes to every open connection now, then close any that lag."""
        if not connections:
            return
        broadcast(connections, frame, text=True)
        self.metrics.broadcast_deliveries.inc(len(connections))
        bound = self.max_backlog
        for conn in connections:
            transport = conn.transport
            if transport is not None and transport.get_write_buffer_size() > bound:
                self.close_slow(conn)

    def write(self, conn: ServerConnection, frame: bytes) -> None:
        """One frame to one connection, in order with everything else it is sent."""
        self.deliver((conn,), frame)

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
