"""The JetStream relay: every ledger entry, in order, published to a NATS JetStream stream
once, and acked in Redis only after JetStream has stored it.

Exactly once downstream rests on two things. Each message carries `Nats-Msg-Id` = the event
id, so JetStream drops a re-publish inside its duplicate window. And each carries the Redis
stream id in a header; the relay publishes strictly in order, so on start it reads the last
message JetStream holds and acks, without publishing again, every pending entry at or below
that id. A relay killed between publish and ack therefore never publishes twice, however
long it stayed down.

Strictly in order, and still a batch at a time: the relay writes a whole batch to its one
NATS connection in order and then waits for the acknowledgements, so JetStream receives and
stores them in that order; every message after a batch's first carries
`Nats-Expected-Last-Msg-Id` = the message before it, so if JetStream refuses one, it refuses
every later one of the batch too, and what it stored is always a prefix of the batch. Only
that prefix is acked; the rest is published again (the last-message check acks what is
already there).

The single-publisher argument needs one relay per ledger: a Redis lease
(server/ledger/lease.py, key `giftstream:relay:lease:<ledger key>`) is taken before publishing and
checked before every batch; a relay that cannot renew it stops publishing and waits to take
it again, and a second relay waits for it: a standby that takes over once the holder dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import nats
import orjson
import redis.asyncio as aioredis
from nats.errors import Error as NatsError
from nats.js import JetStreamContext, api
from nats.js.errors import APIError, NoStreamResponseError, NotFoundError
from nats.js.errors import Error as JetStreamError
from prometheus_client import CollectorRegistry, Counter, Gauge
from redis.exceptions import RedisError, ResponseError

from giftstream.server.ledger.audit import stream_id_key
from giftstream.server.ledger.lease import Holder, Lease, lease_holder
from giftstream.server.ledger.runtime import LAG_REFRESH_S, LagRefresh, redact_url, start_worker
from giftstream.server.money import keys

log = logging.getLogger(__name__)

GROUP = "relay"  # the relay's consumer group on the ledger stream
CONSUMER = "relay"  # one relay at a time (the lease): it re-reads its own pending entries
STREAM_ID_HEADER = "Giftstream-Stream-Id"
DEFAULT_STREAM = "GIFTSTREAM_LEDGER"
DEFAULT_SUBJECT_PREFIX = "giftstream.ledger"
DEFAULT_LEASE_TTL_MS = 10_000


def lease_key(ledger_key: str = keys.LEDGER) -> str:
    """The Redis key of the lease that lets one relay at a time publish `ledger_key`."""
    return f"{keys.PREFIX}relay:lease:{ledger_key}"


class LeaseLost(Exception):
    """The relay no longer holds (or cannot be sure it holds) the lease: stop publishing."""


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
    lease_ttl_ms: int = DEFAULT_LEASE_TTL_MS  # renewed every third of it
    publish_timeout_s: float = 5.0  # for JetStream to acknowledge a whole batch


@dataclass(frozen=True, slots=True)
class Lag:
    """What the relay has not yet handed to JetStream."""

    entries: int  # in the stream and not yet acked by the relay
    oldest_age_s: float  # age of the oldest of them (0 when there are none)
    last_delivered: str | None  # the relay group's last-delivered id (None: no group yet)

    def as_dict(self) -> dict[str, Any]:
        return {
            "entries": self.entries,
            "oldest_age_s": round(self.oldest_age_s, 3),
            "last_delivered": self.last_delivered,
        }


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
    group = next((g for g in groups if keys.text(g["name"]) == GROUP), None)
    if group is None:  # the relay never ran: everything is waiting (XPENDING said NOGROUP)
        length = int(await redis.xlen(ledger_key))
        first = await redis.xrange(ledger_key, count=1)
        oldest = _age_s(keys.text(first[0][0]), now_ms) if first else 0.0
        return Lag(length, oldest, None)
    last_delivered = keys.text(group["last-delivered-id"])
    pending = int(group["pending"])
    lag = group.get("lag")
    if lag is None:  # Redis cannot tell (entries deleted); count what follows
        lag = len(await redis.xrange(ledger_key, min="(" + last_delivered, count=100_000) or [])
    if isinstance(summary, Exception):
        raise summary
    oldest = 0.0
    if pending and summary["min"] is not None:  # None only if pending is 0 in this snapshot
        oldest = _age_s(keys.text(summary["min"]), now_ms)
    elif lag:
        after = await redis.xrange(ledger_key, min="(" + last_delivered, count=1)
        oldest = _age_s(keys.text(after[0][0]), now_ms) if after else 0.0
    return Lag(pending + int(lag), oldest, last_delivered)


class RelayMetrics:
    """The relay's own registry, served by `giftstream relay --metrics-port`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.published = Counter(
            "giftstream_relay_published", "Entries stored by JetStream", registry=r
        )
        self.skipped = Counter(
            "giftstream_relay_already_published",
            "Pending entries found already in JetStream after a restart, acked without publishing",
            registry=r,
        )
        self.errors = Counter(
            "giftstream_relay_errors", "Failed attempts, by cause", ["cause"], registry=r
        )
        self.lag_entries = Gauge(
            "giftstream_relay_lag_entries", "Ledger entries not yet relayed", registry=r
        )
        self.oldest_age = Gauge(
            "giftstream_relay_oldest_age_seconds",
            "Age of the oldest entry not yet relayed",
            registry=r,
        )
        self.lease_held = Gauge(
            "giftstream_relay_lease_held",
            "1 while this relay holds the lease and may publish",
            registry=r,
        )


@dataclass(frozen=True, slots=True)
class _Message:
    stream_id: str
    subject: str
    payload: bytes
    msg_id: str


class Relay:
    """Reads the ledger as consumer group `relay` and publishes to JetStream in order,
    while it holds the relay lease."""

    def __init__(
        self,
        redis: aioredis.Redis,
        config: RelayConfig,
        metrics: RelayMetrics | None = None,
        *,
        connect: Callable[[str], Awaitable[Any]] | None = None,
        lease_token: str | None = None,
    ) -> None:
        self.redis = redis
        self.config = config
        self.metrics = metrics or RelayMetrics()
        self.lease = Lease(redis, lease_key(config.ledger_key), config.lease_ttl_ms, lease_token)
        self._connect = connect or _connect_nats
        self._nc: Any = None
        self._js: JetStreamContext | None = None
        self._inbox = ""
        self._acks: dict[str, asyncio.Future[Any]] = {}
        self._tokens = itertools.count()
        # The last entry JetStream holds, as learned when the connection opened. A pending
        # entry at or below it is acked without publishing. Never raised by our own
        # publishes: an entry another relay read during a lease handover can be pending
        # below them, and it must still be published (see _relay_batch).
        self._stored_upto: tuple[int, int] = (0, 0)
        # JetStream's last sequence, as we know it: the first message of each batch expects
        # it, so a relay that slept through losing its lease cannot add a stale batch after
        # the new holder's messages (None: not known, e.g. after a duplicate; not fenced).
        self._last_seq: int | None = None
        self._refresh_lag = LagRefresh(
            lambda: relay_lag(self.redis, self.config.ledger_key), self._show_lag
        )
        self._holding = False  # we took the lease and have not seen it go
        self._waiting_for: str | None = None  # the holder we last said we wait for

    async def run(self, stop: asyncio.Event) -> None:
        """Relay until `stop` is set, while holding the lease (waiting for it otherwise);
        NATS or Redis being away only delays, with backoff. The lease is released at the
        end, so a standby takes over at once."""
        await self._ensure_group()
        renewer = asyncio.create_task(self._keep_lease(), name="relay-lease")
        try:
            await self._run(stop)
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
            await self._close_nats()
            await self._let_go()

    async def _run(self, stop: asyncio.Event) -> None:
        backoff = 0.1
        while not stop.is_set():
            try:
                if not self.lease.held():
                    if self._holding:  # a renewal was refused, or none got through in time
                        await self._lost(
                            "it lapsed before a renewal got through, or another relay has it"
                        )
                    if not await self._take_lease():
                        await self._refresh_lag(LAG_REFRESH_S)
                        await _sleep_or_stop(stop, self._lease_poll_s(), 0)
                        continue
                if self._js is None:
                    await self._open()
                moved = await self.relay_once()
                backoff = 0.1
            except LeaseLost as exc:
                await self._lost(str(exc))
                continue
            except (NatsError, JetStreamError, OSError, TimeoutError) as exc:
                self.metrics.errors.labels("nats").inc()
                log.warning(
                    "JetStream unavailable or refused a message (%s); retrying in %.1fs",
                    exc,
                    backoff,
                )
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

    # ---- the lease ----------------------------------------------------------------------

    def _lease_poll_s(self) -> float:
        return min(self.config.lease_ttl_ms / 3000, 1.0)

    async def _lost(self, why: str) -> None:
        """Stop publishing: close NATS, so that whoever holds the lease next (we, again,
        perhaps) starts from the last message JetStream holds."""
        self._holding = False
        self.metrics.lease_held.set(0)
        log.error(
            "lost the relay lease %s (%s): stopped publishing; waiting to take it again",
            self.lease.key,
            why,
        )
        await self._close_nats()

    async def _take_lease(self) -> bool:
        """Take the lease if it is free; say so, or say (once per holder) who has it."""
        await self._close_nats()  # not holding: never publish on a connection from before
        if await self.lease.acquire():
            self._holding = True
            self._waiting_for = None
            self.metrics.lease_held.set(1)
            log.info(
                "took the relay lease %s as %s (ttl %d ms): publishing",
                self.lease.key,
                self.lease.token,
                self.config.lease_ttl_ms,
            )
            return True
        self.metrics.lease_held.set(0)
        holder = await lease_holder(self.redis, self.lease.key)
        who = holder.token if holder else "nobody (just released)"
        if who != self._waiting_for:
            self._waiting_for = who
            log.warning(
                "another relay holds the lease, waiting: %s held by %s, %s ms left",
                self.lease.key,
                who,
                holder.ttl_ms if holder else 0,
            )
        return False

    async def _keep_lease(self) -> None:
        """Renew the lease every third of its TTL while we hold it, until run() ends (not
        when stop is set: the pass under way may still publish). A renewal refused (the
        lease is someone else's) or failing until the lease may have lapsed makes `held()`
        False, and the relay stops before its next publish."""
        every = self.config.lease_ttl_ms / 3000
        while True:
            await asyncio.sleep(every)
            if not self.lease.held():
                continue
            try:  # bounded: a renewal hung on a dead socket must not stop the next ones
                renewed = await asyncio.wait_for(self.lease.renew(), max(every, 0.1))
                if not renewed:
                    log.error(
                        "relay lease %s is no longer ours (expired, or taken by "
                        "another relay): stopping publishing",
                        self.lease.key,
                    )
            except (RedisError, OSError, TimeoutError) as exc:
                log.warning(
                    "cannot renew the relay lease (%r); it lapses in %.1fs unless a "
                    "renewal gets through",
                    exc,
                    self.lease.remaining_s(),
                )

    async def _let_go(self) -> None:
        """Release the lease on a clean stop, so a standby takes over without waiting."""
        self.metrics.lease_held.set(0)
        try:
            released = await self.lease.release()
        except (RedisError, OSError) as exc:
            log.warning(
                "could not release the relay lease %s (%s): a standby takes over when it expires",
                self.lease.key,
                exc,
            )
            return
        if released:
            log.info("released the relay lease %s", self.lease.key)
        elif self._holding:
            log.warning("the relay lease %s was no longer ours at stop", self.lease.key)

    # ---- relaying -----------------------------------------------------------------------

    async def relay_once(self) -> int:
        """Publish our pending entries (a restart's leftovers), then new ones; returns how
        many moved. New entries are awaited for at most `block_ms`. Raises LeaseLost,
        without publishing, if the lease is not held."""
        moved = await self._relay_batch("0")  # our own pending entries first
        if moved == 0:
            moved = await self._relay_batch(">")
        return moved

    async def _relay_batch(self, start: str) -> int:
        block = self.config.block_ms if start == ">" else None
        self._check_lease()  # a lapsed holder must not even read: its reads hide entries
        reply: Any = await self.redis.xreadgroup(
            GROUP, CONSUMER, {self.config.ledger_key: start}, count=self.config.batch, block=block
        )
        entries = [(keys.text(raw_id), fields) for raw_id, fields in (reply[0][1] if reply else [])]
        if not entries:
            return 0
        self._check_lease()  # the read may have blocked: read, not published, still pending
        batch = [
            self._message(stream_id, fields)
            for stream_id, fields in entries
            if fields and stream_id_key(stream_id) > self._stored_upto
        ]
        stored, error = await self._publish_all(batch) if batch else (0, None)
        # ack every entry before the first message JetStream did not store
        first_unstored = stream_id_key(batch[stored].stream_id) if stored < len(batch) else None
        done = [
            (i, f)
            for i, f in entries
            if first_unstored is None or stream_id_key(i) < first_unstored
        ]
        if stored:
            self.metrics.published.inc(stored)
        for stream_id, fields in done:
            if not fields:  # deleted while pending: only a trim that ignored our group does it
                self.metrics.errors.labels("deleted").inc()
                log.error("ledger entry %s was deleted before it was relayed", stream_id)
        skipped = len(done) - stored - sum(1 for _, f in done if not f)
        self.metrics.skipped.inc(skipped)
        if done:
            await self.redis.xack(self.config.ledger_key, GROUP, *(i for i, _ in done))
        if error is not None:
            raise error
        return len(entries)

    def _check_lease(self) -> None:
        if not self.lease.held():
            raise LeaseLost("it lapsed before a renewal got through, or another relay has it")

    def _message(self, stream_id: str, fields: dict[Any, Any]) -> _Message:
        data = fields.get(b"data") or fields.get("data")
        payload = data if isinstance(data, bytes) else str(data or "").encode()
        try:
            event = orjson.loads(payload)
            kind, msg_id = str(event["kind"]), str(event["event"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            # never dropped: relayed as it is, for a consumer downstream to look at
            kind, msg_id = "invalid", f"invalid-{stream_id}"
        return _Message(stream_id, f"{self.config.subject_prefix}.{kind}", payload, msg_id)

    async def _publish_all(self, batch: list[_Message]) -> tuple[int, Exception | None]:
        """Publish `batch` in order on the one connection, then wait for the acks. Returns
        how many JetStream stored (always a prefix: each message after the first expects
        the one before it as the stream's last) and the error that stopped the rest.

        nats-py's own publish_async is not used: in nats-py 2.16 an error reply (a refused
        expectation, say) raises inside its reply callback and leaves the future unresolved
        for ever."""
        assert self._nc is not None
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Any]] = []
        try:
            previous: str | None = None
            for message in batch:
                token = str(next(self._tokens))
                futures.append(self._acks.setdefault(token, loop.create_future()))
                headers = {"Nats-Msg-Id": message.msg_id, STREAM_ID_HEADER: message.stream_id}
                if previous is not None:
                    headers[api.Header.EXPECTED_LAST_MSG_ID] = previous
                elif self._last_seq is not None:
                    headers[api.Header.EXPECTED_LAST_SEQUENCE] = str(self._last_seq)
                previous = message.msg_id
                await self._nc.publish(
                    message.subject,
                    message.payload,
                    reply=f"{self._inbox}.{token}",
                    headers=headers,
                )
            await asyncio.wait(futures, timeout=self.config.publish_timeout_s)
        finally:
            for future in futures:
                future.cancel()  # a no-op on those answered
            self._acks.clear()
        stored = 0
        for future in futures:
            ack = _pub_ack(future)
            if isinstance(ack, Exception):
                self._last_seq = None  # the reconnect that follows learns it again
                return stored, ack
            # a duplicate's ack names the first copy's sequence, not the stream's last
            self._last_seq = None if ack.get("duplicate") else int(ack["seq"])
            stored += 1
        return stored, None

    async def _on_pub_ack(self, msg: Any) -> None:
        future = self._acks.pop(msg.subject.rsplit(".", 1)[-1], None)
        if future is not None and not future.done():
            future.set_result(msg)

    async def _open(self) -> None:
        """Connect, make sure the stream exists, and learn the last entry it holds."""
        self._nc = await self._connect(self.config.nats_url)
        self._js = self._nc.jetstream()
        self._inbox = self._nc.new_inbox()
        await self._nc.subscribe(self._inbox + ".*", cb=self._on_pub_ack)
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
        self._last_seq = info.state.last_seq or 0
        if info.state.messages:  # an emptied stream (purged, aged out) keeps a last_seq
            try:
                last = await jsm.get_msg(name, seq=info.state.last_seq)
            except NotFoundError:  # that very message deleted since
                last = None
            stream_id = (last.headers or {}).get(STREAM_ID_HEADER) if last else None
            if stream_id:
                self._stored_upto = stream_id_key(stream_id)
            else:
                log.warning(
                    "the last message of JetStream stream %s is gone or has no %s "
                    "header: only the duplicate window guards against publishing an "
                    "entry twice",
                    name,
                    STREAM_ID_HEADER,
                )
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

    def _show_lag(self, lag: Lag) -> None:
        self.metrics.lag_entries.set(lag.entries)
        self.metrics.oldest_age.set(lag.oldest_age_s)


def _pub_ack(future: asyncio.Future[Any]) -> dict[str, Any] | Exception:
    """JetStream's acknowledgement in `future` (stream, seq, duplicate), or why there is
    none."""
    if future.cancelled():
        return TimeoutError("JetStream did not acknowledge in time")
    msg = future.result()
    if msg.headers and msg.headers.get(api.Header.STATUS) == "503":
        return NoStreamResponseError()  # no stream listens on the subject
    try:
        reply = orjson.loads(msg.data)
    except orjson.JSONDecodeError:
        return APIError(description=f"not a JetStream acknowledgement: {msg.data[:200]!r}")
    if "error" not in reply:
        return dict(reply)
    try:
        APIError.from_error(reply["error"])  # raises the error's own class
    except APIError as exc:
        return exc
    return APIError(**reply["error"])


async def _connect_nats(url: str) -> Any:
    # No endless reconnecting inside nats-py: the relay's own loop retries, with backoff,
    # counting errors, keeping its lag gauges current and seeing a stop. In nats-py 2.x
    # max_reconnect_attempts=0 means "no limit" even for the first connect (a refused
    # connection is retried inside nats.connect for ever); 1 gives up after two attempts.
    return await nats.connect(
        url,
        connect_timeout=2,
        allow_reconnect=False,
        max_reconnect_attempts=1,
        reconnect_time_wait=0.1,
    )


async def _sleep_or_stop(stop: asyncio.Event, delay: float, limit: float) -> float:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), delay)
    return min(delay * 2, limit)


def _age_s(stream_id: str, now_ms: float) -> float:
    return max(0.0, (now_ms - stream_id_key(stream_id)[0]) / 1000)


async def run_relay(redis_url: str, config: RelayConfig, metrics_port: int | None) -> int:
    """`giftstream relay`: relay until SIGTERM or SIGINT, while holding the relay lease.
    Exit code: 0 stopped by a signal, 1 Redis unreachable, 2 the metrics port taken."""
    metrics = RelayMetrics()
    stop = start_worker(metrics.registry, metrics_port)
    if stop is None:
        return 2
    client = aioredis.Redis.from_url(redis_url)
    where = redact_url(redis_url)
    try:
        await client.ping()
        log.info(
            "relay ready: %s -> %s stream %s", where, redact_url(config.nats_url), config.stream
        )
        await Relay(client, config, metrics).run(stop)
    except (RedisError, OSError) as exc:
        log.error("cannot reach Redis at %s: %s", where, exc)
        return 1
    finally:
        await client.aclose()
    return 0


async def relay_status(redis: aioredis.Redis, ledger_key: str = keys.LEDGER) -> dict[str, Any]:
    """The relay's lag, and who holds the relay lease (None: no relay runs, or one is
    waiting to take it) with its TTL left."""
    lag = await relay_lag(redis, ledger_key)
    holder: Holder | None = await lease_holder(redis, lease_key(ledger_key))
    return {**lag.as_dict(), "lease": holder.as_dict() if holder else None}


async def print_status(redis_url: str, ledger_key: str) -> int:
    """`giftstream relay --status`: relay_status as JSON on one line."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        status = await relay_status(client, ledger_key)
    except (RedisError, OSError) as exc:
        log.error("cannot reach Redis at %s: %s", redact_url(redis_url), exc)
        return 1
    finally:
        await client.aclose()
    print(orjson.dumps(status).decode())
    return 0
