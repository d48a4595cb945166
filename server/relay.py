"""The JetStream relay: every ledger entry, in order, published to a NATS JetStream stream
once, and acked in Redis only after JetStream has stored it.

Exactly once downstream rests on two things. Each message carries `Nats-Msg-Id` = the event
id, so JetStream drops a re-publish inside its duplicate window. And each carries the Redis
stream id in a header; the relay publishes strictly in order, so on start it reads the last
message JetStream holds and acks, without publishing again, every pending entry at or below
that id. A relay killed between publish and ack therefore never publishes twice, however
long it stayed down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import nats
import orjson
import redis.asyncio as aioredis
from nats.errors import Error as NatsError
from nats.js import JetStreamContext, api
from nats.js.errors import Error as JetStreamError
from nats.js.errors import NotFoundError
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from redis.exceptions import RedisError, ResponseError

from server import keys
from server.ledger import stream_id_key

log = logging.getLogger(__name__)

GROUP = "relay"  # the relay's consumer group on the ledger stream
CONSUMER = "relay"  # one relay at a time: it re-reads its own pending entries on start
STREAM_ID_HEADER = "Giftstream-Stream-Id"
DEFAULT_STREAM = "GIFTSTREAM_LEDGER"
DEFAULT_SUBJECT_PREFIX = "giftstream.ledger"
LAG_REFRESH_S = 1.0  # the lag gauges are set at least this often: idle, busy or retrying


@dataclass(frozen=True, slots=True)
class RelayConfig:
    nats_url: str
    ledger_key: str = keys.LEDGER
    stream: str = DEFAULT_STREAM
    subject_prefix: str = DEFAULT_SUBJECT_PREFIX
    batch: int = 256
    block_ms: int = 1000
    duplicate_window_s: float = 24 * 3600.0  # second line of defence; see the module doc
    max_backoff_s: float = 5.0


@dataclass(frozen=True, slots=True)
class Lag:
    """What the relay has not yet handed to JetStream."""

    entries: int  # in the stream and not yet acked by the relay
    oldest_age_s: float  # age of the oldest of them (0 when there are none)
    last_delivered: str | None  # the relay group's last-delivered id (None: no group yet)

    def as_dict(self) -> dict[str, Any]:
        return {"entries": self.entries, "oldest_age_s": round(self.oldest_age_s, 3),
                "last_delivered": self.last_delivered}  # fmt: skip


async def relay_lag(redis: aioredis.Redis, ledger_key: str = keys.LEDGER) -> Lag:
    """Entries not yet relayed and the age of the oldest, from the stream and the group."""
    now_ms = time.time() * 1000
    # The group's counts and its pending summary in one MULTI, so both describe one moment:
    # read apart, a relay acking its batch in between leaves XINFO saying "pending 3" and
    # XPENDING saying "nothing pending, oldest None".
    async with redis.pipeline(transaction=True) as pipe:
        pipe.xinfo_groups(ledger_key)
        pipe.xpending(ledger_key, GROUP)
        groups, summary = await pipe.execute(raise_on_error=False)
    if isinstance(groups, ResponseError):  # no stream yet
        return Lag(0, 0.0, None)
    group = next((g for g in groups if _text(g["name"]) == GROUP), None)
    if group is None:  # the relay never ran: everything is waiting (XPENDING said NOGROUP)
        length = int(await redis.xlen(ledger_key))
        first = await redis.xrange(ledger_key, count=1)
        oldest = _age_s(_text(first[0][0]), now_ms) if first else 0.0
        return Lag(length, oldest, None)
    last_delivered = _text(group["last-delivered-id"])
    pending = int(group["pending"])
    lag = group.get("lag")
    if lag is None:  # Redis cannot tell (entries deleted); count what follows
        lag = len(await redis.xrange(ledger_key, min="(" + last_delivered, count=100_000) or [])
    if isinstance(summary, Exception):
        raise summary
    oldest = 0.0
    if pending and summary["min"] is not None:  # None only if pending is 0 in this snapshot
        oldest = _age_s(_text(summary["min"]), now_ms)
    elif lag:
        after = await redis.xrange(ledger_key, min="(" + last_delivered, count=1)
        oldest = _age_s(_text(after[0][0]), now_ms) if after else 0.0
    return Lag(pending + int(lag), oldest, last_delivered)


class RelayMetrics:
    """The relay's own registry, served by `giftstream relay --metrics-port`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.published = Counter("giftstream_relay_published", "Entries stored by JetStream",
                                 registry=r)  # fmt: skip
        self.skipped = Counter(
            "giftstream_relay_already_published",
            "Pending entries found already in JetStream after a restart, acked without publishing",
            registry=r,
        )
        self.errors = Counter("giftstream_relay_errors", "Failed attempts, by cause", ["cause"],
                              registry=r)  # fmt: skip
        self.lag_entries = Gauge("giftstream_relay_lag_entries", "Ledger entries not yet relayed",
                                 registry=r)  # fmt: skip
        self.oldest_age = Gauge("giftstream_relay_oldest_age_seconds",
                                "Age of the oldest entry not yet relayed", registry=r)  # fmt: skip


class Relay:
    """Reads the ledger as consumer group `relay` and publishes to JetStream in order."""

    def __init__(
        self,
        redis: aioredis.Redis,
        config: RelayConfig,
        metrics: RelayMetrics | None = None,
        *,
        connect: Callable[[str], Awaitable[Any]] | None = None,
    ) -> None:
        self.redis = redis
        self.config = config
        self.metrics = metrics or RelayMetrics()
        self._connect = connect or _connect_nats
        self._nc: Any = None
        self._js: JetStreamContext | None = None
        self._last_relayed: tuple[int, int] = (0, 0)
        self._lag_set_at = float("-inf")

    async def run(self, stop: asyncio.Event) -> None:
        """Relay until `stop` is set; NATS or Redis being away only delays, with backoff."""
        await self._ensure_group()
        backoff = 0.1
        while not stop.is_set():
            try:
                if self._js is None:
                    await self._open()
                moved = await self.relay_once()
                backoff = 0.1
            except (NatsError, JetStreamError, OSError, TimeoutError) as exc:
                self.metrics.errors.labels("nats").inc()
                log.warning("JetStream unavailable (%s); retrying in %.1fs", exc, backoff)
                await self._close_nats()
                await self._refresh_lag(LAG_REFRESH_S)  # the backlog grows meanwhile: show it
                backoff = await _sleep_or_stop(stop, backoff, self.config.max_backoff_s)
                continue
            except RedisError as exc:
                self.metrics.errors.labels("redis").inc()
                log.warning("Redis unavailable (%s); retrying in %.1fs", exc, backoff)
                backoff = await _sleep_or_stop(stop, backoff, self.config.max_backoff_s)
                continue
            await self._refresh_lag(LAG_REFRESH_S if moved else 0.0)  # idle: every pass
        await self._close_nats()

    async def relay_once(self) -> int:
        """Publish our pending entries (a restart's leftovers), then new ones; returns how
        many moved. New entries are awaited for at most `block_ms`."""
        moved = await self._relay_batch("0")  # our own pending entries first
        if moved == 0:
            moved = await self._relay_batch(">")
        return moved

    async def _relay_batch(self, start: str) -> int:
        block = self.config.block_ms if start == ">" else None
        reply: Any = await self.redis.xreadgroup(
            GROUP, CONSUMER, {self.config.ledger_key: start}, count=self.config.batch, block=block
        )
        entries = reply[0][1] if reply else []
        for raw_id, fields in entries:
            stream_id = _text(raw_id)
            if not fields:  # deleted while pending: only a trim that ignored our group does it
                self.metrics.errors.labels("deleted").inc()
                log.error("ledger entry %s was deleted before it was relayed", stream_id)
            elif stream_id_key(stream_id) > self._last_relayed:
                await self._publish(stream_id, fields)
            else:
                self.metrics.skipped.inc()
            await self.redis.xack(self.config.ledger_key, GROUP, stream_id)
        return len(entries)

    async def _publish(self, stream_id: str, fields: dict[Any, Any]) -> None:
        assert self._js is not None
        data = fields.get(b"data") or fields.get("data")
        payload = data if isinstance(data, bytes) else str(data or "").encode()
        try:
            event = orjson.loads(payload)
            kind, msg_id = str(event["kind"]), str(event["event"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            # never dropped: relayed as it is, for a consumer downstream to look at
            kind, msg_id = "invalid", f"invalid-{stream_id}"
        await self._js.publish(
            f"{self.config.subject_prefix}.{kind}",
            payload,
            headers={"Nats-Msg-Id": msg_id, STREAM_ID_HEADER: stream_id},
        )
        self._last_relayed = stream_id_key(stream_id)
        self.metrics.published.inc()

    async def _open(self) -> None:
        """Connect, make sure the stream exists, and learn the last entry it holds."""
        self._nc = await self._connect(self.config.nats_url)
        self._js = self._nc.jetstream()
        jsm = self._nc.jsm()
        name = self.config.stream
        try:
            info = await jsm.stream_info(name)
        except NotFoundError:
            info = await jsm.add_stream(
                api.StreamConfig(
                    name=name,
                    subjects=[f"{self.config.subject_prefix}.>"],
                    storage=api.StorageType.FILE,
                    duplicate_window=self.config.duplicate_window_s,
                )
            )
            log.info("created JetStream stream %s", name)
        if info.state.messages:  # an emptied stream (purged, aged out) keeps a last_seq
            try:
                last = await jsm.get_msg(name, seq=info.state.last_seq)
            except NotFoundError:  # that very message deleted since
                last = None
            stream_id = (last.headers or {}).get(STREAM_ID_HEADER) if last else None
            if stream_id:
                self._last_relayed = max(self._last_relayed, stream_id_key(stream_id))
            else:
                log.warning("the last message of JetStream stream %s is gone or has no %s "
                            "header: only the duplicate window guards against publishing an "
                            "entry twice", name, STREAM_ID_HEADER)  # fmt: skip
        log.info("relaying %s to JetStream stream %s", self.config.ledger_key, name)

    async def _close_nats(self) -> None:
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()

    async def _ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.config.ledger_key, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _refresh_lag(self, every_s: float) -> None:
        """Set the lag gauges, unless they were set less than `every_s` ago; Redis being
        away leaves them as they were."""
        now = time.monotonic()
        if now - self._lag_set_at < every_s:
            return
        try:
            lag = await relay_lag(self.redis, self.config.ledger_key)
        except (RedisError, OSError):
            return
        self._lag_set_at = now
        self.metrics.lag_entries.set(lag.entries)
        self.metrics.oldest_age.set(lag.oldest_age_s)


async def _connect_nats(url: str) -> Any:
    # No endless reconnecting inside nats-py: the relay's own loop retries, with backoff,
    # counting errors, keeping its lag gauges current and seeing a stop. In nats-py 2.x
    # max_reconnect_attempts=0 means "no limit" even for the first connect (a refused
    # connection is retried inside nats.connect for ever); 1 gives up after two attempts.
    return await nats.connect(url, connect_timeout=2, allow_reconnect=False,
                              max_reconnect_attempts=1, reconnect_time_wait=0.1)  # fmt: skip


async def _sleep_or_stop(stop: asyncio.Event, delay: float, limit: float) -> float:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), delay)
    return min(delay * 2, limit)


def _age_s(stream_id: str, now_ms: float) -> float:
    return max(0.0, (now_ms - stream_id_key(stream_id)[0]) / 1000)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def run_relay(redis_url: str, config: RelayConfig, metrics_port: int | None) -> int:
    """`giftstream relay`: relay until SIGTERM or SIGINT. Exit code: 0 stopped by a signal,
    1 Redis unreachable, 2 the metrics port taken."""
    metrics = RelayMetrics()
    if metrics_port is not None:
        try:
            start_http_server(metrics_port, addr="127.0.0.1", registry=metrics.registry)
        except OSError as exc:
            log.error("cannot serve metrics on 127.0.0.1:%d: %s", metrics_port, exc)
            return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.ping()
        log.info("relay ready: %s -> %s stream %s", redis_url, config.nats_url, config.stream)
        await Relay(client, config, metrics).run(stop)
    except (RedisError, OSError) as exc:
        log.error("cannot reach Redis at %s: %s", redis_url, exc)
        return 1
    finally:
        await client.aclose()
    return 0


async def print_status(redis_url: str, ledger_key: str) -> int:
    """`giftstream relay --status`: the relay's lag, as JSON on one line."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        lag = await relay_lag(client, ledger_key)
    except (RedisError, OSError) as exc:
        log.error("cannot reach Redis at %s: %s", redis_url, exc)
        return 1
    finally:
        await client.aclose()
    print(orjson.dumps(lag.as_dict()).decode())
    return 0
