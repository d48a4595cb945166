"""Consumer groups on the ledger: LedgerConsumer, its metrics, and `giftstream consume`.

Delivery is at least once. An entry is acked only after its handler returned; a consumer that
dies first leaves it pending, and another (or itself, restarted) reclaims it once it has been
idle `claim_idle_ms`. So a handler may see an entry twice, in any order relative to others,
and must be idempotent by the entry's event id: exactly once in effect, not in delivery.
An entry that fails `max_deliveries` times, or does not parse, is moved to the dead-letter
stream (LEDGER:dead) and acked, so one poison entry never holds the others back.

On a Redis Cluster each partition's ledger has its own group (same name) and dead letters
(LEDGER:dead, in the ledger's slot); `giftstream consume` runs one LedgerConsumer per ledger
in its one process, each reading its ledger alone: an XREADGROUP of several streams must
name keys of one slot, and the ledgers sit on every shard.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from types import MappingProxyType, TracebackType
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError, ResponseError

from giftstream.server import scripts
from giftstream.server.config import redact_url
from giftstream.server.ledger.checkpoint import CheckpointFolder
from giftstream.server.ledger.connect import NoPartitions, open_ledger_redis
from giftstream.server.ledger.dead_letters import dead_letter_stream
from giftstream.server.ledger.earnings import EarningsConsumer
from giftstream.server.ledger.entries import LedgerEntry, LedgerError, parse_entry
from giftstream.server.ledger.runtime import LAG_REFRESH_S, LagRefresh, start_worker
from giftstream.server.money import keys
from giftstream.server.redis_cluster import RedisClient

log = logging.getLogger(__name__)

Handler = Callable[[LedgerEntry], Awaitable[None]]
# (redis, the key space, the ledger stream consumed) -> handler
HandlerFactory = Callable[[RedisClient, keys.KeySpace, str], Handler]


def _earnings(redis: RedisClient, keyspace: keys.KeySpace, ledger_key: str) -> Handler:
    return EarningsConsumer(redis, ledger_key, keyspace=keyspace)


def _checkpoint(redis: RedisClient, keyspace: keys.KeySpace, ledger_key: str) -> Handler:
    return CheckpointFolder(redis, ledger_key, keyspace=keyspace)  # keys follow the stream's


# `giftstream consume --handler NAME`: the handlers a consumer process can run.
HANDLERS: Mapping[str, HandlerFactory] = MappingProxyType(
    {"earnings": _earnings, "checkpoint": _checkpoint}
)

DEFAULT_BATCH = 100
DEFAULT_BLOCK_MS = 1000
DEFAULT_CLAIM_IDLE_MS = 30_000  # longer than any handler takes: a live consumer keeps its own
DEFAULT_MAX_DELIVERIES = 5
MAX_REASON = 2000  # characters of an exception's text kept in a dead letter


class ConsumerMetrics:
    """A consumer process's own registry, served by `run_consumer(metrics_port=…)`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r, by_group = self.registry, ["group"]
        self.acked = Counter(
            "giftstream_consumer_acked", "Entries handled and acked", by_group, registry=r
        )
        self.failures = Counter(
            "giftstream_consumer_failures",
            "Handler failures, left pending for a retry",
            by_group,
            registry=r,
        )
        self.dead_lettered = Counter(
            "giftstream_consumer_dead_lettered",
            "Entries moved to the dead-letter stream, by cause (malformed, failed, undelivered)",
            ["group", "cause"],
            registry=r,
        )
        self.reclaimed = Counter(
            "giftstream_consumer_reclaimed",
            "Stale pending entries claimed from a consumer",
            by_group,
            registry=r,
        )
        self.deleted = Counter(
            "giftstream_consumer_deleted",
            "Pending entries found deleted from the stream",
            by_group,
            registry=r,
        )
        self.lag = Gauge(
            "giftstream_consumer_lag_entries",
            "Entries not yet acked by the group (pending plus unread)",
            by_group,
            registry=r,
        )
        self._lags: dict[tuple[str, str], int] = {}

    def show_lag(self, group: str, ledger_key: str, lag: int) -> None:
        """One ledger's lag; the gauge shows the group's sum over the ledgers."""
        self._lags[(group, ledger_key)] = lag
        self.lag.labels(group).set(sum(n for (g, _), n in self._lags.items() if g == group))


class LedgerConsumer:
    """One consumer of one group on the ledger stream, run as one asyncio task by
    `async with` (or start/stop), or driven by `run(stop)` or `run_once()`.

    Each pass reclaims entries pending longer than `claim_idle_ms` (a dead consumer's, or
    our own failed ones), then reads up to `batch` new ones (blocking up to `block_ms` when
    there was nothing to reclaim), hands each to `handler`, and acks those it handled. A
    handler that raises, or runs past `claim_idle_ms` (it is cancelled), leaves its entry
    pending for a retry."""

    def __init__(
        self,
        redis: RedisClient,
        group: str,
        consumer: str,
        handler: Handler,
        *,
        ledger_key: str = keys.LEDGER,
        dead_letter_key: str | None = None,
        batch: int = DEFAULT_BATCH,
        block_ms: int = DEFAULT_BLOCK_MS,
        claim_idle_ms: int = DEFAULT_CLAIM_IDLE_MS,
        max_deliveries: int = DEFAULT_MAX_DELIVERIES,
        metrics: ConsumerMetrics | None = None,
    ) -> None:
        for name, value, low in (
            ("batch", batch, 1),
            ("block_ms", block_ms, 1),
            ("claim_idle_ms", claim_idle_ms, 1),
            ("max_deliveries", max_deliveries, 1),
        ):
            if type(value) is not int or value < low:
                raise ValueError(f"{name} must be an integer of at least {low}, not {value!r}")
        if not group or not consumer:
            raise ValueError("group and consumer need names")
        self.redis = redis
        self.group = group
        self.consumer = consumer
        self.handler = handler
        self.ledger_key = ledger_key
        self.dead_letter_key = dead_letter_key or dead_letter_stream(ledger_key)
        self.batch = batch
        self.block_ms = block_ms
        self.claim_idle_ms = claim_idle_ms
        self.max_deliveries = max_deliveries
        self.metrics = metrics
        self._bury: AsyncScript = scripts.register(redis, "dead_letter")
        self._group_ready = False
        self._claim_cursor = "0-0"  # XAUTOCLAIM's, kept across passes
        self._stop: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._refresh_lag = LagRefresh(
            lambda: group_lag(self.redis, self.ledger_key, self.group), self._show_lag
        )

    # ---- lifecycle ----------------------------------------------------------------------

    async def __aenter__(self) -> LedgerConsumer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Create the group if needed, then run in a task until stop()."""
        if self._task is not None:
            raise RuntimeError(f"consumer {self.consumer} of {self.group} is already running")
        await self.ensure_group()
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self.run(self._stop), name=f"consumer-{self.group}")

    async def stop(self) -> None:
        """Finish the pass under way (at most `block_ms` of waiting plus its handlers) and
        return; what it did not ack is reclaimed later, by us or another consumer."""
        task, stop, self._task = self._task, self._stop, None
        if task is None or stop is None:
            return
        stop.set()
        await task

    async def ensure_group(self) -> None:
        """XGROUP CREATE … 0 MKSTREAM: a new group reads the ledger from its first entry."""
        try:
            await self.redis.xgroup_create(self.ledger_key, self.group, id="0", mkstream=True)
            log.info("created consumer group %s on %s", self.group, self.ledger_key)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop` is set. Redis being away only delays, with backoff; a group
        deleted under us is created again (from the stream's first entry)."""
        backoff = 0.1
        while not stop.is_set():
            try:
                taken = await self.run_once()
                backoff = 0.1
                await self._refresh_lag(LAG_REFRESH_S if taken else 0.0)  # idle: every pass
            except (RedisError, OSError) as exc:
                if "NOGROUP" in str(exc):
                    self._group_ready = False
                log.warning(
                    "consumer %s/%s: Redis error (%s); retrying in %.1fs",
                    self.group,
                    self.consumer,
                    exc,
                    backoff,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), backoff)
                backoff = min(backoff * 2, 5.0)

    def _show_lag(self, lag: int) -> None:
        if self.metrics is not None:
            self.metrics.show_lag(self.group, self.ledger_key, lag)

    # ---- one pass -----------------------------------------------------------------------

    async def run_once(self) -> int:
        """One pass: reclaim stale pending entries, then read new ones; returns how many
        entries it took (whatever became of them: acked, left pending or dead-lettered)."""
        if not self._group_ready:
            await self.ensure_group()
        taken = await self._reclaim()
        reply: Any = await self.redis.xreadgroup(
            self.group,
            self.consumer,
            {self.ledger_key: ">"},
            count=self.batch,
            block=None if taken else self.block_ms,
        )
        entries = reply[0][1] if reply else []
        await self._handle([(keys.text(i), f) for i, f in entries], {})
        return taken + len(entries)

    async def _reclaim(self) -> int:
        """XAUTOCLAIM entries idle past claim_idle_ms, a page at a time, until a batch is
        taken or the pending list has been walked to its end."""
        taken = 0
        while taken < self.batch:
            reply: Any = await self.redis.xautoclaim(
                self.ledger_key,
                self.group,
                self.consumer,
                min_idle_time=self.claim_idle_ms,
                start_id=self._claim_cursor,
                count=self.batch - taken,
            )
            self._claim_cursor = keys.text(reply[0])
            claimed = [(keys.text(i), f) for i, f in reply[1]]
            gone = [keys.text(i) for i in (reply[2] if len(reply) > 2 else [])]
            gone += [i for i, f in claimed if not f]  # Redis 6.2 returns those as nil entries
            if gone:  # Redis 7 has already dropped them from the pending list
                await self.redis.xack(self.ledger_key, self.group, *gone)
                log.error(
                    "group %s: pending entries %s were deleted from the ledger before "
                    "they were handled",
                    self.group,
                    gone,
                )
                if self.metrics is not None:
                    self.metrics.deleted.labels(self.group).inc(len(gone))
            live = [(i, f) for i, f in claimed if f]
            if live:
                if self.metrics is not None:
                    self.metrics.reclaimed.labels(self.group).inc(len(live))
                await self._handle(live, await self._deliveries([i for i, _ in live]))
            taken += len(claimed)
            if self._claim_cursor == "0-0":
                break
        return taken

    async def _deliveries(self, stream_ids: list[str]) -> dict[str, int]:
        """How often each entry has been delivered (XPENDING's times_delivered)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream_id in stream_ids:
                pipe.xpending_range(self.ledger_key, self.group, stream_id, stream_id, 1)
            replies = await pipe.execute()
        counts: dict[str, int] = {}
        for stream_id, reply in zip(stream_ids, replies, strict=True):
            if reply:
                counts[stream_id] = int(reply[0]["times_delivered"])
        return counts

    async def _handle(self, entries: list[tuple[str, Any]], deliveries: dict[str, int]) -> None:
        """Hand each entry to the handler; ack the batch's successes in one XACK."""
        done: list[str] = []
        for stream_id, fields in entries:
            delivered = deliveries.get(stream_id, 1)
            if delivered > self.max_deliveries:
                # delivered this often without an ack or a failure we saw: its consumers
                # died (or hung) handling it. Stop feeding it to them.
                reason = (
                    f"delivered {delivered} times without an ack: its consumers died or "
                    "hung while handling it"
                )
                await self._dead_letter(stream_id, fields, reason, delivered, "undelivered")
                continue
            try:
                entry = parse_entry(stream_id, fields)
            except LedgerError as exc:
                await self._dead_letter(stream_id, fields, str(exc), delivered, "malformed")
                continue
            try:
                # past claim_idle_ms another consumer may take the entry over anyway; a
                # handler that hangs must not stall this consumer with it
                async with asyncio.timeout(self.claim_idle_ms / 1000):
                    await self.handler(entry)
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"[:MAX_REASON]
                if delivered >= self.max_deliveries:
                    await self._dead_letter(stream_id, fields, reason, delivered, "failed")
                else:
                    log.warning(
                        "group %s: entry %s (event %s) failed on delivery %d of %d, "
                        "retried after %d ms: %s",
                        self.group,
                        stream_id,
                        entry.event,
                        delivered,
                        self.max_deliveries,
                        self.claim_idle_ms,
                        reason,
                    )
                    if self.metrics is not None:
                        self.metrics.failures.labels(self.group).inc()
                continue
            done.append(stream_id)
        if done:
            await self.redis.xack(self.ledger_key, self.group, *done)
            if self.metrics is not None:
                self.metrics.acked.labels(self.group).inc(len(done))

    async def _dead_letter(
        self, stream_id: str, fields: Any, reason: str, delivered: int, cause: str
    ) -> None:
        raw = fields.get(b"data", fields.get("data"))
        if raw is None:  # keep whatever the entry held instead
            raw = orjson.dumps({keys.text(k): keys.text(v) for k, v in fields.items()})
        buried = await self._bury(
            keys=[self.ledger_key, self.dead_letter_key],
            args=[self.group, stream_id, raw, reason, delivered, self.consumer],
        )
        if buried is None:
            return  # another consumer buried or acked it first
        log.error(
            "group %s: entry %s moved to %s after %d deliveries (%s): %s",
            self.group,
            stream_id,
            self.dead_letter_key,
            delivered,
            cause,
            reason,
        )
        if self.metrics is not None:
            self.metrics.dead_lettered.labels(self.group, cause).inc()


UNREAD_COUNT_CAP = 10_000  # when Redis cannot say how many are unread, count at most this many


async def group_lag(redis: RedisClient, ledger_key: str, group: str) -> int:
    """Entries the group has not acked: pending plus not yet read (0 without the group).

    When entries were deleted behind the group, Redis cannot say how many are unread; they
    are then counted by reading them, at most UNREAD_COUNT_CAP: the gauge is refreshed every
    second while a consumer is behind, on the Redis that also settles gifts, so that read
    must stay small. Past the cap the figure is a floor."""
    try:
        groups = await redis.xinfo_groups(ledger_key)
    except ResponseError:
        return 0
    for info in groups:
        if keys.text(info["name"]) == group:
            unread = info.get("lag")
            if unread is None:  # Redis cannot tell (entries deleted): count what follows
                after = "(" + keys.text(info["last-delivered-id"])
                unread = len(
                    await redis.xrange(ledger_key, min=after, count=UNREAD_COUNT_CAP) or []
                )
            return int(info["pending"]) + int(unread)
    return 0


# ---- `giftstream consume` -------------------------------------------------------------


async def run_consumer(
    redis_url: str,
    group: str,
    consumer: str,
    handler_name: str = "earnings",
    *,
    ledger_key: str = keys.LEDGER,
    dead_letter_key: str | None = None,
    batch: int = DEFAULT_BATCH,
    block_ms: int = DEFAULT_BLOCK_MS,
    claim_idle_ms: int = DEFAULT_CLAIM_IDLE_MS,
    max_deliveries: int = DEFAULT_MAX_DELIVERIES,
    metrics_port: int | None = None,
) -> int:
    """`giftstream consume --group NAME`: run one consumer with a handler from HANDLERS, on
    every ledger (one Redis's, or each partition's of a cluster), until SIGTERM or SIGINT.
    Exit code: 0 stopped by a signal, 1 Redis unreachable at start, 2 a bad argument
    (unknown handler, bad number, one dead-letter stream for several ledgers)."""
    factory = HANDLERS.get(handler_name)
    if factory is None:
        log.error("unknown handler %r; one of: %s", handler_name, ", ".join(sorted(HANDLERS)))
        return 2
    if handler_name == "checkpoint" and group != "checkpoint":
        log.warning("the checkpoint handler runs in group %r, not 'checkpoint'", group)
    try:
        client, keyspace = await open_ledger_redis(redis_url, ledger_key)
    except (RedisError, OSError, NoPartitions) as exc:
        log.error("cannot reach Redis at %s: %s", redact_url(redis_url), exc)
        return 1
    metrics = ConsumerMetrics()
    try:
        ledgers = keyspace.ledgers()
        if dead_letter_key is not None and len(ledgers) > 1:
            log.error(
                "--dead-letter-key names one stream; on a Redis Cluster each of the %d "
                "ledgers keeps its own (LEDGER:dead, in its slot)",
                len(ledgers),
            )
            return 2
        try:
            consumers = [
                LedgerConsumer(
                    client,
                    group,
                    consumer,
                    factory(client, keyspace, ledger),
                    ledger_key=ledger,
                    dead_letter_key=dead_letter_key,
                    batch=batch,
                    block_ms=block_ms,
                    claim_idle_ms=claim_idle_ms,
                    max_deliveries=max_deliveries,
                    metrics=metrics,
                )
                for ledger in ledgers
            ]
        except ValueError as exc:
            log.error("%s", exc)
            return 2
        try:
            for each in consumers:
                await each.ensure_group()
        except (RedisError, OSError) as exc:
            log.error("cannot reach Redis at %s: %s", redact_url(redis_url), exc)
            return 1
        stop = start_worker(metrics.registry, metrics_port)
        if stop is None:
            return 2
        log.info(
            "consumer ready: group %s, consumer %s, handler %s, %s",
            group,
            consumer,
            handler_name,
            f"ledger {ledgers[0]}" if len(ledgers) == 1 else f"{len(ledgers)} partitions' ledgers",
        )
        started = time.monotonic()
        await asyncio.gather(*(each.run(stop) for each in consumers))
        log.info("consumer %s/%s stopped after %.1fs", group, consumer, time.monotonic() - started)
        return 0
    finally:
        await client.aclose()
