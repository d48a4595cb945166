"""Test clients that speak to a real server over real sockets: WebSocket and signed HTTP."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
from types import TracebackType
from typing import Any

import aiohttp
import orjson
from websockets.asyncio.client import ClientConnection, connect

from server.auth import Role, mint_token

Frame = dict[str, Any]
ROOM_EVENT_TYPES = frozenset({"gift", "viewers", "room_ended"})


class TokenMaker:
    def __init__(self, secret: str) -> None:
        self.secret = secret

    def __call__(
        self, user: str, role: str = "viewer", *, adult: bool = True, name: str | None = None,
        ttl_s: int = 3600,
    ) -> str:  # fmt: skip
        return mint_token(self.secret, user, name=name, role=Role(role), adult=adult, ttl_s=ttl_s)


class WsClient:
    """One client connection; keeps every frame it reads so tests can look back."""

    _ids = itertools.count(1)

    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn
        self.unread: list[Frame] = []  # frames read while waiting for something else
        self.room_events: list[Frame] = []  # every room event seen, batches unpacked

    @classmethod
    async def open(cls, url: str, **kwargs: Any) -> WsClient:
        return cls(await connect(url, **kwargs))

    @classmethod
    async def login(cls, url: str, token: str) -> tuple[WsClient, Frame]:
        client = await cls.open(url)
        welcome = await client.request({"type": "hello", "token": token})
        assert welcome["type"] == "welcome", welcome
        return client, welcome

    async def close(self) -> None:
        await self.conn.close()

    async def send(self, message: Frame | str | bytes) -> None:
        if isinstance(message, dict):
            await self.conn.send(orjson.dumps(message).decode())
        else:
            await self.conn.send(message)

    async def _read(self, timeout: float) -> Frame:
        raw = await asyncio.wait_for(self.conn.recv(), timeout)
        frame: Frame = orjson.loads(raw)
        if frame.get("type") == "batch":
            self.room_events.extend(frame["events"])
        elif frame.get("type") in ROOM_EVENT_TYPES:
            self.room_events.append(frame)
        return frame

    async def next(self, timeout: float = 5.0) -> Frame:
        """The next frame, unread ones first."""
        if self.unread:
            return self.unread.pop(0)
        return await self._read(timeout)

    async def expect(self, kind: str, timeout: float = 5.0, **fields: Any) -> Frame:
        """The first frame of type `kind` (matching `fields`); others stay unread."""
        for i, frame in enumerate(self.unread):
            if frame.get("type") == kind and all(frame.get(k) == v for k, v in fields.items()):
                return self.unread.pop(i)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            frame = await self._read(max(deadline - loop.time(), 0.001))
            if frame.get("type") == kind and all(frame.get(k) == v for k, v in fields.items()):
                return frame
            self.unread.append(frame)

    async def request(self, message: Frame, timeout: float = 5.0) -> Frame:
        """Send with a fresh id and return the reply that echoes it."""
        request_id = f"r{next(self._ids)}"
        await self.send({**message, "id": request_id})
        for i, frame in enumerate(self.unread):
            if frame.get("id") == request_id:
                return self.unread.pop(i)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            frame = await self._read(max(deadline - loop.time(), 0.001))
            if frame.get("id") == request_id:
                frame.pop("id")
                return frame
            self.unread.append(frame)

    async def wait_for_room_events(
        self, count: int, timeout: float = 5.0, kind: str | None = None
    ) -> list[Frame]:
        """Read until `count` room events (of `kind`, if given) have been seen."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout

        def seen() -> list[Frame]:
            return [e for e in self.room_events if kind is None or e["type"] == kind]

        while len(seen()) < count:
            frame = await self._read(max(deadline - loop.time(), 0.001))
            if frame.get("type") not in ROOM_EVENT_TYPES | {"batch"}:
                self.unread.append(frame)
        return seen()

    async def closed_with(self, timeout: float = 5.0) -> int | None:
        """Read until the server closes; the close code it sent."""
        try:
            async with asyncio.timeout(timeout):
                async for _ in self.conn:
                    pass
        except Exception:  # noqa: BLE001 - ConnectionClosedError carries the code too
            pass
        await self.conn.wait_closed()
        return self.conn.close_code


def sign(secret: str, payload: bytes) -> str:
    return hmac.new(secret.encode(), payload, hashlib.sha256).hexdigest()


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
        signed = path.encode() if method == "GET" else data
        headers = {"X-Giftstream-Signature": signature or sign(self.secret, signed)}
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
        receipt = receipt or f"rc-{user}-{next(WsClient._ids)}"
        status, body = await self.call(
            "POST", "/v1/purchases", {"receipt": receipt, "user": user, "package": package}
        )
        assert status == 200, body
        return body
