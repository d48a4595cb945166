"""A script and a `WAIT` on ONE connection to a Redis Cluster shard's master, through redis-py.

`WAIT n timeout` counts the replicas that hold every write made *on its own connection*, so
it says something about a script only when both went down the same socket. redis-py's cluster
pipeline does send one node's commands in order on one connection (checked on a real cluster,
issue 14: [EVALSHA of a write, WAIT 1] answers 1, and 0 with the replica stopped), but when a
command fails it resends only that one, on whatever connection the retry takes: a WAIT resent
alone on a fresh connection acks nothing it was meant to, and a script redirected by MOVED runs
elsewhere while the WAIT still answers for the old node. So the two go through the client's
own node object (`ClusterNode.execute_pipeline`: one connection, in order, no retry), on the
node the client's own slot map names; any error is the caller's to handle (crediting holds
back for a round; a gift's caller gets the error as from any script call).

How many replicas to wait for: Redis lists a replica in CLUSTER SLOTS only once it has
received data (repl offset > 0), so the client's topology says 0 on a fresh cluster.
`Replicas` takes the larger of that and the master's own count (INFO replication's
connected_slaves, which counts a replica still in its first sync; ROLE does not), and never
lowers what it saw for a node: a replica that is cut off is the very case a WAIT must not
wave through (with `cluster-replica-validity-factor 0` it may still be promoted, without
what it missed).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import Any

from redis.asyncio.cluster import ClusterNode, PipelineCommand, RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import (
    ConnectionError,
    MovedError,
    NoScriptError,
    RedisError,
    TimeoutError,
    TryAgainError,
)

REPLICAS_REFRESH_S = 5.0  # how often a master's own count of replicas is asked again


class Replicas:
    """How many replicas a WAIT on a key's master must hear from; see the module docstring."""

    def __init__(self, redis: RedisCluster, refresh_s: float = REPLICAS_REFRESH_S) -> None:
        self._redis = redis
        self._refresh_s = refresh_s
        self._seen: dict[str, int] = {}
        self._asked: dict[str, float] = {}

    async def of(self, key: str) -> tuple[ClusterNode, int]:
        """The master that holds `key` now (the client's slot map) and its replica count."""
        node = self._redis.get_node_from_key(key)
        assert node is not None  # a master always (replica=False); raises when uncovered
        slot_nodes = self._redis.nodes_manager.slots_cache.get(self._redis.keyslot(key), [])
        seen = max(self._seen.get(node.name, 0), len(slot_nodes) - 1)
        now = time.monotonic()
        if now - self._asked.get(node.name, -self._refresh_s) >= self._refresh_s:
            self._asked[node.name] = now
            info = await node.execute_command("INFO", "replication")
            if info.get("role") == "master":  # its replicas, in sync or still syncing
                seen = max(seen, int(info.get("connected_slaves", 0)))
        self._seen[node.name] = seen
        return node, seen


async def script_then_wait(
    node: ClusterNode,
    script: AsyncScript,
    keys: Sequence[str],
    args: Sequence[Any],
    replicas: int,
    timeout_ms: int,
    mark_key: str | None = None,
) -> tuple[Any, int]:
    """(the script's reply, how many replicas acked it): both sent on one connection to
    `node`. With `mark_key` (a key of the script's slot) an INCR of it goes between them, so
    the WAIT covers what the script found already written even when it wrote nothing itself
    (a replayed key: the first settlement must be on the replicas before it is answered).
    NOSCRIPT (a node that forgot the script) loads it there and sends all again (the script
    did not run); any other error is raised (MovedError: the slot left `node`)."""
    for _ in range(2):
        commands = [PipelineCommand(0, "EVALSHA", script.sha, len(keys), *keys, *args)]
        if mark_key is not None:
            commands.append(PipelineCommand(1, "INCR", mark_key))
        commands.append(PipelineCommand(len(commands), "WAIT", replicas, timeout_ms))
        await node.execute_pipeline(commands)
        reply, acked = commands[0].result, commands[-1].result
        if isinstance(reply, NoScriptError):
            script.sha = _text(await node.execute_command("SCRIPT LOAD", script.script))
            continue
        for result in (reply, *(c.result for c in commands[1:])):
            if isinstance(result, Exception):
                raise result
        return reply, int(_text(acked))
    raise NoScriptError(f"script {script.sha} not loaded on {node.name}")


FAILOVER_ERRORS = (MovedError, TryAgainError, ConnectionError, TimeoutError)


async def script_through_failover(
    redis: RedisCluster,
    replicas: Replicas,
    script: AsyncScript,
    keys: Sequence[str],
    args: Sequence[Any],
    timeout_ms: int,
    *,
    mark_key: str | None = None,
    attempts: int = 3,
) -> tuple[Any, int, int]:
    """`script_then_wait` on the master of `keys[0]` now: (reply, replicas acked, replicas
    asked). A failover meanwhile (the slot moved, its master died, maybe after the script ran)
    lets the client renew its slot map and asks again, `attempts` times in all, then raises
    the last error: for idempotent scripts only (a gift key, a claim: asked again, the first
    result comes back)."""
    for attempt in range(attempts):
        node, wanted = await replicas.of(keys[0])
        try:
            reply, acked = await script_then_wait(
                node, script, keys, args, wanted, timeout_ms, mark_key
            )
        except FAILOVER_ERRORS:
            if attempt == attempts - 1:
                raise
            with contextlib.suppress(RedisError):
                await redis.exists(keys[0])  # the client follows it, renewing its map
            continue
        return reply, acked, wanted
    raise AssertionError("unreachable: the last attempt returns or raises")


async def replicated(node: ClusterNode, mark_key: str, replicas: int, timeout_ms: int) -> bool:
    """Whether `node`'s replicas hold everything it had written before now: a master's writes
    reach its replicas in one ordered stream, so a WAIT covering a mark written now (on the
    same connection) covers all that came before it (what a reader read before the mark)."""
    commands = [
        PipelineCommand(0, "INCR", mark_key),
        PipelineCommand(1, "WAIT", replicas, timeout_ms),
    ]
    await node.execute_pipeline(commands)
    for command in commands:
        if isinstance(command.result, Exception):
            raise command.result
    return int(_text(commands[1].result)) >= replicas


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
