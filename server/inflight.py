"""Money movements in progress: started as tasks nobody can cancel halfway, and awaited
by shutdown so that SIGTERM never cuts a gift between its debit and its reply."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class InFlight:
    """Runs each money movement as its own task; a cancelled caller does not cancel it."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    async def run(self, movement: Coroutine[Any, Any, T]) -> T:
        task = asyncio.get_running_loop().create_task(movement)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(task)

    def __len__(self) -> int:
        return len(self._tasks)

    async def drain(self, timeout_s: float) -> int:
        """Wait for every movement in progress; returns how many were still running after
        `timeout_s` (they keep running, and their keys answer any retry)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)
        return len(self._tasks)
