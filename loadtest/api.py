"""The server's signed internal API as the load test uses it: the catalog, purchases for the
gifters, wallets for the money check. Each request is signed when it is sent, as
protocol/signing.py says: its time, method, path and raw body."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from types import TracebackType
from typing import Any, TypeVar

import aiohttp
import orjson

from giftstream.protocol.signing import SIGNATURE_HEADER, sign_request

T = TypeVar("T")
CONCURRENCY = 32  # requests in flight: enough to fund thousands of gifters in seconds


class ApiError(RuntimeError):
    """The internal API refused or could not be reached; the message says which call."""


class Api:
    def __init__(self, base_url: str, secret: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.secret = secret
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Api:
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.session is not None:
            await self.session.close()

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        """One signed request; the JSON answer, or ApiError naming the status and code."""
        assert self.session is not None, "use `async with Api(...)`"
        data = b"" if body is None else orjson.dumps(body)
        signature = sign_request(self.secret, method, path, data, int(time.time()))
        headers = {SIGNATURE_HEADER: signature}
        if data:
            headers["Content-Type"] = "application/json"
        try:
            async with self.session.request(
                method, self.base_url + path, data=data or None, headers=headers
            ) as response:
                raw = await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise ApiError(f"{method} {self.base_url}{path}: {exc or type(exc).__name__}") from exc
        try:
            answer = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            answer = raw[:200].decode(errors="replace")
        if status != 200:
            code = answer.get("error") if isinstance(answer, dict) else answer
            hint = " (is --webhook-secret the server's?)" if status == 401 else ""
            raise ApiError(f"{method} {path}: HTTP {status} {code}{hint}")
        return answer

    async def catalog(self) -> dict[str, Any]:
        answer = await self.call("GET", "/v1/catalog")
        if not isinstance(answer, dict):
            raise ApiError("GET /v1/catalog: not a JSON object")
        return answer

    async def purchase(self, receipt: str, user: str, package: str) -> dict[str, Any]:
        body = {"receipt": receipt, "user": user, "package": package}
        answer: dict[str, Any] = await self.call("POST", "/v1/purchases", body)
        return answer

    async def wallet(self, user: str) -> dict[str, Any]:
        answer: dict[str, Any] = await self.call("GET", f"/v1/wallets/{user}")
        return answer


async def bounded(
    work: Callable[[T], Awaitable[Any]], items: Iterable[T], limit: int = CONCURRENCY
) -> list[Any]:
    """`work(item)` for every item, at most `limit` at once, results in order."""
    gate = asyncio.Semaphore(limit)

    async def one(item: T) -> Any:
        async with gate:
            return await work(item)

    return await asyncio.gather(*(one(item) for item in items))
