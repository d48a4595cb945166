"""The public port: WebSocket upgrades at /ws (origin allow-list, connection caps, size and
keepalive limits) and the web pages beside it (server/realtime/pages.py). Each accepted
connection becomes a `Session`."""

from __future__ import annotations

import asyncio
import logging
from http import HTTPStatus
from types import TracebackType
from typing import ClassVar

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response
from websockets.typing import Origin

from giftstream.protocol.events import PROTOCOL_VERSION
from giftstream.server.realtime.caps import (
    UPGRADE_STATUS,
    CapReason,
    ConnectionCaps,
    address_key,
)
from giftstream.server.realtime.pages import Pages
from giftstream.server.realtime.session import NodeParts, NodeState, Session

log = logging.getLogger(__name__)

WS_PATH = "/ws"
GATEWAY_HEADER = "X-Giftstream-Gateway"  # the answering process's gateway id
# Frames up to this size are read and answered `bad_request` when over the protocol's 4 KiB;
# larger ones are refused by the WebSocket layer itself (close 1009) without being buffered.
READ_LIMIT_BYTES = 64 * 1024
_REFUSED_BODY = {
    CapReason.SERVER_FULL: "server full; retry later\n",
    CapReason.IP_CAP: "too many connections from your address\n",
}


class CountedConnection(ServerConnection):
    """A `ServerConnection` that counts its socket against the caps from accept to close:
    one that never sends its upgrade, or never says hello, holds its place all the same."""

    caps: ClassVar[ConnectionCaps]  # set on the gateway's own subclass
    peer_ip = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self.peer_ip = address_key(str(peer[0])) if isinstance(peer, tuple) and peer else ""
        self.caps.socket_opened(self.peer_ip)

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            super().connection_lost(exc)
        finally:  # asyncio calls it once for each socket it made: every count is freed
            self.caps.socket_closed(self.peer_ip)


def counted_connections(caps: ConnectionCaps) -> type[CountedConnection]:
    """The connection class of one gateway, counting against its node's caps."""

    class GatewayConnection(CountedConnection):
        pass

    GatewayConnection.caps = caps
    return GatewayConnection


class Gateway:
    """Owns the listening socket; `async with` starts it, `stop_accepting` and `close` end it."""

    def __init__(
        self,
        parts: NodeParts,
        node: NodeState,
        host: str,
        port: int,
        allowed_origins: tuple[str, ...] | None,
        *,
        gateway_id: str = "",
        reuse_port: bool = False,
    ) -> None:
        self.parts = parts
        self.gateway_id = gateway_id
        self.reuse_port = reuse_port  # `--workers N`: N processes listen on this one port
        self.node = node
        self.host = host
        self.requested_port = port
        # Native apps and servers send no Origin; only browsers do, so a missing one passes.
        self.origins: list[Origin | None] | None = (
            [*(Origin(o) for o in allowed_origins), None] if allowed_origins is not None else None
        )
        self.server: Server | None = None
        self.pages = Pages()

    async def __aenter__(self) -> Gateway:
        limits = self.parts.limits
        self.server = await serve(
            self._handle,
            self.host,
            self.requested_port,
            origins=self.origins,
            process_request=self._route,
            process_response=self._name_gateway,
            max_size=READ_LIMIT_BYTES,
            compression=None,  # frames are encoded once and sent as-is to every viewer
            ping_interval=limits.ping_interval_s,
            ping_timeout=limits.ping_timeout_s,
            close_timeout=limits.close_timeout_s,
            server_header="giftstream",
            create_connection=counted_connections(self.parts.caps),
            reuse_port=self.reuse_port or None,  # passed on to loop.create_server
        )
        caps = self.parts.caps
        log.info(
            "connection caps: %d sockets, %s per address, %s per user",
            caps.max_total,
            caps.max_per_ip or "no cap",
            caps.max_per_user or "no cap",
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    def stop_accepting(self) -> None:
        """Stop listening; open connections carry on until `close`."""
        if self.server is not None:
            self.server.server.close()

    async def close(self) -> None:
        """Close every connection with 1001 (going away) and wait for their handlers."""
        if self.server is not None:
            self.server.close(close_connections=True)
            await self.server.wait_closed()

    async def _handle(self, conn: ServerConnection) -> None:
        await Session(conn, self.parts, self.node).run()

    def _route(self, conn: ServerConnection, request: Request) -> Response | None:
        """Let upgrades to /ws through; answer the plain pages; 404 for the rest."""
        path = request.path.split("?", 1)[0]
        if path == WS_PATH:
            return self._over_cap(conn)
        page = self.pages.answer(path, request)
        if page is not None:
            return page
        if path == "/healthz":
            return conn.respond(HTTPStatus.OK, "ok\n")
        return conn.respond(
            HTTPStatus.NOT_FOUND,
            f"not found; pages: / (viewer), /ops; WebSocket endpoint {WS_PATH}, "
            f"protocol {PROTOCOL_VERSION}\n",
        )

    def _name_gateway(self, conn: ServerConnection, request: Request, response: Response) -> None:
        """Every answer (upgrade or page) names the process that gave it: behind one port
        served by several (`--workers`), which one a client reached."""
        if self.gateway_id:
            response.headers[GATEWAY_HEADER] = self.gateway_id

    def _over_cap(self, conn: ServerConnection) -> Response | None:
        """503 past the node's cap, 429 past the address's; None lets the upgrade go on."""
        assert isinstance(conn, CountedConnection)
        refusal = self.parts.caps.upgrade_refusal(conn.peer_ip)
        if refusal is None:
            return None
        self.parts.metrics.connections_refused.labels(refusal.value).inc()
        return conn.respond(UPGRADE_STATUS[refusal], _REFUSED_BODY[refusal])
