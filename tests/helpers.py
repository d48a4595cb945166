"""Test clients that speak to a real server over real sockets: WebSocket and signed HTTP."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar

import aiohttp
import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from giftstream.protocol.signing import SIGNATURE_HEADER, sign_request
from giftstream.server.realtime.auth import Role, mint_token
from giftstream.server.realtime.registry import GATEWAYS_KEY

# Keys a running server rewrites on its own clock, whatever the requests (its heartbeat): a
# snapshot that shows a request changed nothing leaves them out.
CLOCK_KEYS = frozenset({GATEWAYS_KEY})

Frame = dict[str, Any]
T = TypeVar("T")
ROOM_EVENT_TYPES = frozenset({"gift", "viewers", "room_ended", "leaders"})


class TokenMaker:
    def __init__(self, secret: str) -> None:
        self.secret = secret

    def __call__(
        self,
        user: str,
        role: str = "viewer",
        *,
        adult: bool = True,
        name: str | None = None,
        ttl_s: int = 3600,
    ) -> str:
        return mint_token(self.secret, user, name=name, role=Role(role), adult=adult, ttl_s=ttl_s)


class WsClient:
    """One client connection. A reader task files every frame as it arrives: room events
    (batches unpacked) into `room_events`, everything else into `unread`, so that several
    requests may wait on one connection at once."""

    _ids = itertools.count(1)

    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn
        self.unread: list[Frame] = []
        self.room_events: list[Frame] = []
        self._arrived = asyncio.Condition()
        self._reader = asyncio.get_running_loop().create_task(self._read_all())

    @classmethod
    async def open(cls, url: str, **kwargs: Any) -> WsClient:
        return cls(await connect(url, **kwargs))

    @classmethod
    async def login(cls, url: str, token: str) -> tuple[WsClient, Frame]:
        client = await cls.open(url)
        welcome = await client.request({"type": "hello", "token": token})
        assert welcome["type"] == "welcome", welcome
        return client, welcome

    async def _read_all(self) -> None:
        try:
            async for raw in self.conn:
                frame: Frame = orjson.loads(raw)
                kind = frame.get("type")
                if kind == "batch":
                    self.room_events.extend(frame["events"])
                elif kind in ROOM_EVENT_TYPES:
                    self.room_events.append(frame)
                else:
                    self.unread.append(frame)
                async with self._arrived:
                    self._arrived.notify_all()
        except ConnectionClosed:
            pass
        finally:
            async with self._arrived:
                self._arrived.notify_all()

    async def _wait_for(self, pick: Callable[[], T | None], timeout: float, what: str) -> T:
        try:
            async with asyncio.timeout(timeout), self._arrived:
                while True:
                    found = pick()
                    if found is not None:
                        return found
                    if self._reader.done():
                        raise AssertionError(f"connection closed while waiting for {what}")
                    await self._arrived.wait()
        except TimeoutError:
            raise AssertionError(f"no {what} within {timeout}s; unread: {self.unread}") from None

    def _take(self, match: Callable[[Frame], bool]) -> Frame | None:
        for i, frame in enumerate(self.unread):
            if match(frame):
                return self.unread.pop(i)
        return None

    async def close(self) -> None:
        await self.conn.close()
        await self._reader

    async def send(self, message: Frame | str | bytes) -> None:
        if isinstance(message, dict):
            await self.conn.send(orjson.dumps(message).decode())
        else:
            await self.conn.send(message)

    async def next(self, timeout: float = 5.0) -> Frame:
        """The oldest frame not yet taken (room events aside)."""
        return await self._wait_for(lambda: self._take(lambda f: True), timeout, "frame")

    async def expect(self, kind: str, timeout: float = 5.0, **fields: Any) -> Frame:
        """The first frame of type `kind` (matching `fields`); others stay unread."""

        def match(frame: Frame) -> bool:
            return frame.get("type") == kind and all(frame.get(k) == v for k, v in fields.items())

        return await self._wait_for(lambda: self._take(match), timeout, f"{kind} {fields}")

    async def request(self, message: Frame, timeout: float = 5.0) -> Frame:
        """Send with a fresh id and return the reply that echoes it (without the id)."""
        request_id = f"r{next(self._ids)}"
        await self.send({**message, "id": request_id})
        reply = await self._wait_for(
            lambda: self._take(lambda f: f.get("id") == request_id), timeout, f"reply to {message}"
        )
        reply.pop("id")
        return reply

    async def wait_for_room_events(
        self, count: int, timeout: float = 5.0, kind: str | None = None
    ) -> list[Frame]:
        """Every room event seen (of `kind`, if given), once there are at least `count`."""

        def seen() -> list[Frame] | None:
            events = [e for e in self.room_events if kind is None or e["type"] == kind]
            return events if len(events) >= count else None

        return await self._wait_for(seen, timeout, f"{count} {kind or 'room'} events")

    async def wait_until(self, pick: Callable[[], T | None], timeout: float, what: str) -> T:
        """Wait until `pick()` (which may look at `room_events` and `unread`) is not None."""
        return await self._wait_for(pick, timeout, what)

    async def closed_with(self, timeout: float = 5.0) -> int | None:
        """Wait until the server closes; the close code it sent."""
        await asyncio.wait_for(asyncio.shield(self._reader), timeout)
        return self.conn.close_code


class AdminClient:
    """Signed requests to the internal HTTP API, as the payments backend sends them."""

    def __init__(self, base_url: str, secret: str) -> None:
        self.base_url = base_url
        self.secret = secret
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AdminClient:
        self.session = aiohttp.ClientSession()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self.session is not None
        await self.session.close()

    async def call(
        self, method: str, path: str, body: Any = None, *, signature: str | None = None
    ) -> tuple[int, Any]:
        assert self.session is not None
        data = b"" if body is None else (body if isinstance(body, bytes) else orjson.dumps(body))
        now_s = int(time.time())
        headers = {
            SIGNATURE_HEADER: signature or sign_request(self.secret, method, path, data, now_s)
        }
        if data:
            headers["Content-Type"] = "application/json"
        async with self.session.request(
            method, self.base_url + path, data=data or None, headers=headers
        ) as response:
            text = await response.read()
            try:
                payload = orjson.loads(text) if text else None
            except orjson.JSONDecodeError:
                payload = text.decode(errors="replace")
            return response.status, payload

    async def buy(self, user: str, package: str = "coins_700", receipt: str | None = None) -> Any:
        receipt = receipt or f"receipt-{user}-{next(WsClient._ids)}"
        status, body = await self.call(
            "POST", "/v1/purchases", {"receipt": receipt, "user": user, "package": package}
        )
        assert status == 200, body
        return body
