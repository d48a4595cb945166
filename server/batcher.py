"""Concurrent Lua script calls share round trips to Redis.

A call joins the queue. At the end of the event loop's current turn (so every call made
in that turn is there), if fewer than `max_inflight` pipelines are on the wire, one leaves
with everything queued (at most `max_batch` calls); otherwise the calls ride with the next
one, sent as soon as a pipeline comes back. Under light load a call goes out alone at
once; under heavy load hundreds of gifts cost a handful of round trips and syscalls
instead of one each. Each script still runs
atomically in Redis: a pipeline only batches the network, never the scripts' effects.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

log = logging.getLogger(__name__)

_Call = tuple[AsyncScript, Sequence[str], Sequence[Any], "asyncio.Future[Any]"]


class ScriptBatcher:
    """Runs `AsyncScript` calls through shared pipelines; see the module docstring."""

    def __init__(self, redis: aioredis.Redis, *, max_batch: int = 256, max_inflight: int = 4):
        self.redis = redis
        self.max_batch = max_batch
        self.max_inflight = max_inflight
        self._queue: deque[_Call] = deque()
        self._inflight = 0
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def call(self, script: AsyncScript, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """The script's reply, or the error Redis raised for it."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((script, keys, args, future))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._maybe_send)
        return await future

    def _maybe_send(self) -> None:
        self._scheduled = False
        while self._queue and self._inflight < self.max_inflight:
            batch = [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
            self._inflight += 1
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[_Call]) -> None:
        try:
            results = await self._pipeline(batch)
            for (script, keys, args, future), result in zip(batch, results, strict=True):
                if isinstance(result, NoScriptError):  # Redis restarted or flushed its scripts
                    result = await _settle(script(keys=keys, args=args))
                _resolve(future, result)
        except BaseException as exc:  # the connection failed: every call of it fails alike
            for *_, future in batch:
                _resolve(future, exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            self._inflight -= 1
            self._maybe_send()

    async def _pipeline(self, batch: list[_Call]) -> list[Any]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for script, keys, args, _ in batch:
                pipe.evalsha(script.sha, len(keys), *keys, *args)  # sha: computed locally
            return await pipe.execute(raise_on_error=False)


async def _settle(call: Any) -> Any:
    try:
        return await call
    except Exception as exc:  # handed to the caller, not raised here
        return exc


def _resolve(future: asyncio.Future[Any], result: Any) -> None:
    if future.done():  # the caller gave up (cancelled); the script ran regardless
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
