"""Money script calls, pipelined on one connection of their own so concurrent calls share
round trips (DESIGN.md §3).

Every call made in one turn of the event loop leaves in one write at the end of that turn,
and replies are matched to calls in order as they arrive: under load hundreds of gifts cost
one syscall each way instead of one each, and nothing waits for a batch to fill. Each script
still runs atomically in Redis; pipelining only batches the network, never the effects.

redis-py's pipeline object costs tens of microseconds per command in Python (packing through
its encoder, a timeout context per reply); the money path is the hot path, so here commands
are packed by hand and replies parsed by hiredis, which redis-py itself uses underneath. The
connection settings (host or socket, password, database, TLS) come from the redis-py client,
so both talk to the same Redis.

A caller that is cancelled does not stop its script: the call is on the wire or queued for
it, its reply is still read, and `on_reply` still runs (metrics count what Redis did).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_TIMEOUT_S = 5.0  # redis-py's own default socket timeout


@dataclass(slots=True)
class _Call:
    """One script call: its packed EVALSHA, what to do with the reply, who waits for it."""

    script: AsyncScript
    keys: Sequence[str]
    args: Sequence[Any]
    packed: bytes
    on_reply: Callable[[Any], Any]
    future: asyncio.Future[Any]
    sent_at: float = 0.0


def pack(*parts: str | int | bytes) -> bytes:
    """One command in RESP. Only str, bytes and true ints: a bool or a float never reaches a
    script as an argument by accident."""
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        if type(part) is str:
            data = part.encode()
        elif type(part) is int:
            data = b"%d" % part
        elif type(part) is bytes:
            data = part
        else:
            raise TypeError(f"a script argument must be str, int or bytes, not {part!r}")
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class _Endpoint:
    """Where and how to connect, read from a redis-py client's pool."""

    def __init__(self, redis: aioredis.Redis) -> None:
        pool = redis.connection_pool
        kwargs = pool.connection_kwargs
        self.path: str | None = None
        self.host, self.port = kwargs.get("host", "localhost"), int(kwargs.get("port", 6379))
        if issubclass(pool.connection_class, UnixDomainSocketConnection):
            self.path = kwargs["path"]
        self.ssl: ssl.SSLContext | None = None
        if issubclass(pool.connection_class, SSLConnection):
            self.ssl = ssl.create_default_context(cafile=kwargs.get("ssl_ca_certs"))
            if kwargs.get("ssl_cert_reqs") in ("none", ssl.CERT_NONE):
                self.ssl.check_hostname = False
                self.ssl.verify_mode = ssl.CERT_NONE
        self.setup: list[bytes] = []  # sent first on every new connection
        password, username = kwargs.get("password"), kwargs.get("username")
        if password is not None:
            auth = ("AUTH", username, password) if username else ("AUTH", password)
            self.setup.append(pack(*auth))
        if kwargs.get("db"):
            self.setup.append(pack("SELECT", int(kwargs["db"])))
        timeout = kwargs.get("socket_timeout")
        self.timeout_s = float(timeout) if timeout else DEFAULT_TIMEOUT_S

    async def connect(self, protocol: Callable[[], _Pipe]) -> _Pipe:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.timeout_s):
            if self.path is not None:
                _, pipe = await loop.create_unix_connection(protocol, self.path)
            else:
                _, pipe = await loop.create_connection(protocol, self.host, self.port, ssl=self.ssl)
        return pipe


class _Pipe(asyncio.Protocol):
    """One connection: writes packed calls, hands each reply to the oldest call waiting."""

    def __init__(self, on_lost: Callable[[_Pipe, BaseException], None]) -> None:
        self._on_lost = on_lost
        self._reader = hiredis.Reader(protocolError=InvalidResponse, replyError=ResponseError)
        self.waiting: deque[_Call | None] = deque()  # None: a setup command's reply
        self.transport: asyncio.Transport | None = None
        self.handle: Callable[[_Call, Any], None] = lambda call, reply: None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def write(self, data: bytes, calls: Sequence[_Call | None]) -> None:
        assert self.transport is not None
        self.waiting.extend(calls)
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            call = self.waiting.popleft()
            if call is None:
                if isinstance(reply, ResponseError):  # AUTH or SELECT refused
                    self.abort(RedisConnectionError(f"Redis refused the connection: {reply}"))
                    return
                continue
            self.handle(call, reply)

    def abort(self, error: BaseException) -> None:
        if self.transport is not None:
            self.transport.abort()
        self.connection_lost(error)

    def connection_lost(self, exc: Exception | BaseException | None) -> None:
        on_lost, self._on_lost = self._on_lost, lambda pipe, error: None  # once
        on_lost(self, exc or RedisConnectionError("Redis closed the connection"))


class ScriptBatcher:
    """Pipelines `AsyncScript` calls on a connection of its own; see the module docstring."""

    def __init__(self, redis: aioredis.Redis, *, eager_batch: int = 32) -> None:
        self._endpoint = _Endpoint(redis)
        self._pipe: _Pipe | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._queue: list[_Call] = []  # made this turn, not yet written
        self._flush_scheduled = False
        self._watchdog: asyncio.TimerHandle | None = None
        self._outstanding = 0  # calls whose reply is not handled yet
        self._idle: asyncio.Event | None = None
        # The loop of the first call; its connection lives there. Kept because Python 3.11's
        # get_running_loop() makes a getpid() syscall on every call (1.4% of a busy server).
        self._loop: asyncio.AbstractEventLoop | None = None
        self.writes = 0  # writes to Redis so far: how many round trips the calls shared
        # A turn that queues this many calls sends them at once rather than at its end, so
        # Redis works on a burst of gifts while the server is still parsing the rest of it.
        self.eager_batch = eager_batch

    def submit(
        self,
        script: AsyncScript,
        keys: Sequence[str],
        args: Sequence[Any],
        on_reply: Callable[[Any], T],
    ) -> asyncio.Future[T]:
        """Queue a call; the future gets `on_reply(reply)`, or the error Redis or `on_reply`
        raised. `on_reply` runs even when the future was cancelled. An argument that is not
        str, int or bytes raises TypeError here, to this caller alone, and nothing is queued:
        packed later, it would strand every call of the turn."""
        packed = pack("EVALSHA", script.sha, len(keys), *keys, *args)
        loop = self._loop
        if loop is None or loop.is_closed():
            loop = self._bind_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.append(_Call(script, keys, args, packed, on_reply, future))
        self._outstanding += 1
        if len(self._queue) >= self.eager_batch and self._pipe is not None:
            self._write_queued()  # Redis starts on these while this turn parses the rest
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return future

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        self._loop = asyncio.get_running_loop()
        return self._loop

    async def call(self, script: AsyncScript, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """The script's raw reply, or the error Redis raised for it."""
        return await self.submit(script, keys, args, _same)

    @property
    def in_flight(self) -> int:
        """Calls submitted whose reply has not been handled yet."""
        return self._outstanding

    async def drain(self, timeout_s: float | None = None) -> int:
        """Wait until every call submitted so far has its reply (or its error), for at most
        `timeout_s`; returns how many were still waiting (they still finish later)."""
        try:
            async with asyncio.timeout(timeout_s):
                while self._outstanding:
                    self._idle = self._idle or asyncio.Event()
                    await self._idle.wait()
        except TimeoutError:
            pass
        return self._outstanding

    # ---- sending ------------------------------------------------------------------------

    def _flush(self) -> None:
        """The end of a turn of the loop: what the turn queued leaves now."""
        self._flush_scheduled = False
        self._write_queued()

    def _write_queued(self) -> None:
        if not self._queue:
            return
        if self._pipe is None:
            if self._connecting is None:
                self._connecting = asyncio.get_running_loop().create_task(self._connect())
            return  # written once connected
        calls, self._queue = self._queue, []
        self.writes += 1
        now = time.perf_counter()
        for call in calls:
            call.sent_at = now
        self._pipe.write(b"".join(c.packed for c in calls), calls)
        self._arm_watchdog()

    async def _connect(self) -> None:
        try:
            pipe = await self._endpoint.connect(lambda: _Pipe(self._lost))
            pipe.handle = self._handle
            if self._endpoint.setup:
                pipe.write(b"".join(self._endpoint.setup), [None] * len(self._endpoint.setup))
            self._pipe = pipe
        except Exception as exc:  # refused, timed out, TLS: the calls waiting fail, not hang
            calls, self._queue = self._queue, []
            error = RedisConnectionError(f"cannot reach Redis for money scripts: {exc}")
            for call in calls:
                self._finish(call, error)
        finally:
            self._connecting = None
        self._flush()

    def _resend_as_eval(self, call: _Call) -> None:
        """Redis lost the script (restart, SCRIPT FLUSH): send its source; Redis caches it."""
        assert self._pipe is not None
        source = call.script.script
        if not isinstance(source, str | bytes):
            source = bytes(source)
        self._pipe.write(pack("EVAL", source, len(call.keys), *call.keys, *call.args), [call])

    # ---- receiving ----------------------------------------------------------------------

    def _handle(self, call: _Call, reply: Any) -> None:
        if isinstance(reply, ResponseError) and str(reply).startswith("NOSCRIPT"):
            self._resend_as_eval(call)
            return
        self._finish(call, reply)

    def _finish(self, call: _Call, reply: Any) -> None:
        future = call.future
        try:
            if isinstance(reply, BaseException):
                raise reply
            result = call.on_reply(reply)
        except Exception as error:  # handed to the caller
            if not future.done():
                future.set_exception(error)
        else:
            if not future.done():
                future.set_result(result)
        self._outstanding -= 1
        if not self._outstanding and self._idle is not None:
            self._idle.set()
            self._idle = None

    def _lost(self, pipe: _Pipe, error: BaseException) -> None:
        """The connection is gone: every call on it fails alike; the next call reconnects."""
        if self._pipe is pipe:
            self._pipe = None
        if not isinstance(error, RedisConnectionError | RedisTimeoutError):
            error = RedisConnectionError(f"Redis connection lost: {error}")
        while pipe.waiting:
            call = pipe.waiting.popleft()
            if call is not None:
                self._finish(call, error)
        if self._queue and not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _arm_watchdog(self) -> None:
        """One timer, not one per call: a Redis that stops answering fails the calls waiting
        on it after the socket timeout, as redis-py would, instead of hanging them."""
        if self._watchdog is None:
            loop = asyncio.get_running_loop()
            self._watchdog = loop.call_later(self._endpoint.timeout_s / 2, self._check_stalled)

    def _check_stalled(self) -> None:
        self._watchdog = None
        pipe = self._pipe
        if pipe is None:
            return
        oldest = next((c for c in pipe.waiting if c is not None), None)
        if oldest is None:
            return
        if time.perf_counter() - oldest.sent_at > self._endpoint.timeout_s:
            log.warning(
                "Redis did not answer money scripts for %.1fs; reconnecting",
                self._endpoint.timeout_s,
            )
            pipe.abort(RedisTimeoutError("Redis did not answer in time"))
            return
        self._arm_watchdog()


def _same(reply: Any) -> Any:
    return reply
