"""The relay worker: the lease, the loop over the ledger, and `giftstream relay` running it.

Exactly once downstream rests on two things. Each message carries `Nats-Msg-Id` = the event
id, so JetStream drops a re-publish inside its duplicate window. And each carries the Redis
stream id in a header; the relay publishes strictly in order, so on start it reads the last
message JetStream holds and acks, without publishing again, every pending entry at or below
that id. A relay killed between publish and ack therefore never publishes twice, however
long it stayed down. Of a batch, only the prefix JetStream stored (jetstream.py) is acked;
the rest is published again (the last-message check acks what is already there).

The single-publisher argument needs one relay per ledger: a Redis lease
(server/ledger/lease.py, key `giftstream:relay:lease:<ledger key>`) is taken before publishing
and checked before every batch; a relay that cannot renew it stops publishing and waits to take
it again, and a second relay waits for it: a standby that takes over once the holder dies.

On a Redis Cluster every partition's ledger has its own lease (`giftstream:relay:lease:L`, in
L's slot) and `giftstream relay` runs one Relay per ledger in its one process, each lease
taken as the process's relay id. The processes split the leases live (share.py): each holds
at most its fair share, hands the surplus over between batches when another relay joins, and
takes a dead one's ledgers once its heartbeat and leases expire. They publish into the same
JetStream stream and subjects with `Nats-Msg-Id` = the event id, as on one Redis
(jetstream.py says what fences a shared stream).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from typing import Any

from nats.errors import Error as NatsError
from nats.js.errors import Error as JetStreamError
from prometheus_client import CollectorRegistry, Counter, Gauge
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError, ResponseError

from giftstream.server.config import redact_url
from giftstream.server.ledger.connect import NoPartitions, open_ledger_redis
from giftstream.server.ledger.entries import stream_id_key
from giftstream.server.ledger.lease import Lease, lease_holder, new_token
from giftstream.server.ledger.relay.config import CONSUMER, GROUP, RelayConfig, lease_key
from giftstream.server.ledger.relay.jetstream import JetStream
from giftstream.server.ledger.relay.lag import Lag, relay_lag
from giftstream.server.ledger.relay.share import Share
from giftstream.server.ledger.runtime import LAG_REFRESH_S, LagRefresh, start_worker
from giftstream.server.money import keys
from giftstream.server.money.same_connection import Replicas, replicated
from giftstream.server.redis_cluster import RedisClient

log = logging.getLogger(__name__)


class LeaseLost(Exception):
    """The relay no longer holds (or cannot be sure it holds) the lease: stop publishing."""


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
            "Ledger leases this relay holds (publishes): 1 or 0 on one Redis",
            registry=r,
        )
        self.live_relays = Gauge(
            "giftstream_relay_live_relays",
            "Relay processes alive by their heartbeats (a Redis Cluster's; 0 on one Redis)",
            registry=r,
        )
        self.fair_share = Gauge(
            "giftstream_relay_fair_share",
            "Ledger leases this relay may hold among the live relays (a Redis Cluster's)",
            registry=r,
        )
        self.handed_over = Counter(
            "giftstream_relay_leases_handed_over",
            "Leases released between batches to another relay's share (one joined)",
            registry=r,
        )
        self._held: set[str] = set()
        self._lags: dict[str, Lag] = {}

    def show_share(self, share: Share) -> None:
        self.live_relays.set(len(share.live))
        self.fair_share.set(share.quota)

    def show_lease(self, ledger_key: str, held: bool) -> None:
        """Whether this process holds `ledger_key`'s lease; the gauge counts them."""
        (self._held.add if held else self._held.discard)(ledger_key)
        self.lease_held.set(len(self._held))

    def show_lag(self, ledger_key: str, lag: Lag) -> None:
        """One ledger's lag; the gauges show the sum of entries and the oldest's age."""
        self._lags[ledger_key] = lag
        self.lag_entries.set(sum(each.entries for each in self._lags.values()))
        self.oldest_age.set(max(each.oldest_age_s for each in self._lags.values()))


REPLICA_WAIT_MS = 1000  # how long a batch waits for its ledger's replicas before a retry


class NotReplicated(RedisError):
    """The ledger's replicas did not ack the entries read in time: not published yet."""


class Relay:
    """Reads the ledger as consumer group `relay` and publishes to JetStream in order,
    while it holds the relay lease."""

    def __init__(
        self,
        redis: RedisClient,
        config: RelayConfig,
        metrics: RelayMetrics | None = None,
        *,
        jetstream: JetStream | None = None,
        lease_token: str | None = None,
        share: Share | None = None,
    ) -> None:
        self.redis = redis
        self.config = config
        self.metrics = metrics or RelayMetrics()
        self.share = share  # a cluster's: this process's share of the leases (None: no limit)
        self.lease = Lease(redis, lease_key(config.ledger_key), config.lease_ttl_ms, lease_token)
        self.jetstream = jetstream or JetStream(config)
        self._refresh_lag = LagRefresh(
            lambda: relay_lag(self.redis, self.config.ledger_key), self._show_lag
        )
        # a cluster's: publish only entries the ledger's replicas hold, so a failover never
        # loses an entry JetStream already has (the gift's retry would then be there twice)
        self._replicas = Replicas(redis) if isinstance(redis, RedisCluster) else None
        self._holding = False  # we took the lease and have not seen it go
        self._waiting_for: str | None = None  # the holder we last said we wait for

    async def run(self, stop: asyncio.Event) -> None:
        """Relay until `stop` is set, while holding the lease (waiting for it otherwise);
        NATS or Redis being away only delays, with backoff. The lease is released at the
        end, so a standby takes over at once."""
        await self._ensure_group()
        ended = asyncio.Event()
        renewer = asyncio.create_task(self._keep_lease(ended), name="relay-lease")
        try:
            await self._run(stop)
        finally:
            ended.set()  # the renewer's own way out: a cancel alone can be lost (_keep_lease)
            renewer.cancel()  # not to wait out its sleep or a renewal under way
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
            await self.jetstream.close()
            await self._let_go()

    async def _run(self, stop: asyncio.Event) -> None:
        backoff = 0.1
        while not stop.is_set():
            try:
                if self._holding and self.share and self.share.give_up(self.config.ledger_key):
                    await self._hand_over()
                    continue
                if not self.lease.held():
                    if self._holding:  # a renewal was refused, or none got through in time
                        await self._lost(
                            "it lapsed before a renewal got through, or another relay has it"
                        )
                    if not await self._take_lease():
                        await self._refresh_lag(LAG_REFRESH_S)
                        await _sleep_or_stop(stop, self._lease_poll_s(), 0)
                        continue
                if not self.jetstream.is_open:
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
                await self.jetstream.close()
                await self._refresh_lag(LAG_REFRESH_S)  # the backlog grows meanwhile: show it
                backoff = await _sleep_or_stop(stop, backoff, self.config.max_backoff_s)
                continue
            except NotReplicated as exc:
                self.metrics.errors.labels("replicas").inc()
                log.warning("not relaying yet (%s); retrying in %.1fs", exc, backoff)
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

    async def _hand_over(self) -> None:
        """Release the lease for a relay below its share. Called between batches only:
        everything this relay published is acknowledged by JetStream and acked in Redis, so
        the next holder starts right after it, and the ledger stays in order."""
        self._holding = False
        self.metrics.show_lease(self.config.ledger_key, False)
        await self.jetstream.close()
        released = await self.lease.release()
        if released:
            self.metrics.handed_over.inc()
        assert self.share is not None
        log.info(
            "handed the relay lease %s over (%s; this relay's share is %d of %d ledgers, "
            "%d relays alive)",
            self.lease.key,
            "released" if released else "it was no longer ours",
            self.share.quota,
            self.share.ledgers,
            len(self.share.live),
        )

    async def _lost(self, why: str) -> None:
        """Stop publishing: close NATS, so that whoever holds the lease next (we, again,
        perhaps) starts from the last message JetStream holds."""
        self._holding = False
        if self.share:
            self.share.drop(self.config.ledger_key)
        self.metrics.show_lease(self.config.ledger_key, False)
        log.error(
            "lost the relay lease %s (%s): stopped publishing; waiting to take it again",
            self.lease.key,
            why,
        )
        await self.jetstream.close()

    async def _take_lease(self) -> bool:
        """Take the lease if it is free; say so, or say (once per holder) who has it."""
        await self.jetstream.close()  # not holding: never publish on a connection from before
        if self.share and not self.share.reserve(self.config.ledger_key):
            self.metrics.show_lease(self.config.ledger_key, False)
            return False  # this relay holds its share: the ledger is another's to take
        try:
            taken = await self.lease.acquire()
        except BaseException:
            if self.share:
                self.share.drop(self.config.ledger_key)  # not to hold a place in the share
            raise
        if taken:
            self._holding = True
            self._waiting_for = None
            self.metrics.show_lease(self.config.ledger_key, True)
            log.info(
                "took the relay lease %s as %s (ttl %d ms): publishing",
                self.lease.key,
                self.lease.token,
                self.config.lease_ttl_ms,
            )
            return True
        self.metrics.show_lease(self.config.ledger_key, False)
        if self.share:
            self.share.drop(self.config.ledger_key)
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

    async def _keep_lease(self, ended: asyncio.Event) -> None:
        """Renew the lease every third of its TTL while we hold it, until run() ends (not
        when stop is set: the pass under way may still publish). A renewal refused (the
        lease is someone else's) or failing until the lease may have lapsed makes `held()`
        False, and the relay stops before its next publish. It ends on `ended`, not on
        run()'s cancel alone, which redis-py can swallow."""
        every = self.config.lease_ttl_ms / 3000
        while not ended.is_set():
            await asyncio.sleep(every)
            if not self.lease.held():
                continue
            try:  # bounded: a renewal hung on a dead socket must not stop the next ones
                # asyncio.timeout rather than wait_for: one wait_for less to lose the cancel
                async with asyncio.timeout(max(every, 0.1)):
                    renewed = await self.lease.renew()
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
        self.metrics.show_lease(self.config.ledger_key, False)
        if self.share:
            self.share.drop(self.config.ledger_key)
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
        await self._check_replicated()
        # the read may have blocked, and the wait for the replicas taken up to a second: the
        # lease is checked last, right before publishing (read, not published, still pending)
        self._check_lease()
        batch = [
            self.jetstream.message(stream_id, fields)
            for stream_id, fields in entries
            if fields and stream_id_key(stream_id) > self.jetstream.stored_upto
        ]
        stored, error = await self.jetstream.publish(batch) if batch else (0, None)
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

    async def _check_replicated(self) -> None:
        """NotReplicated unless the ledger's replicas hold what was just read (a cluster): the
        entries stay pending, and the next pass reads them first, in order."""
        if self._replicas is None:
            return
        node, replicas = await self._replicas.of(self.config.ledger_key)
        mark = keys.relay_mark(self.config.ledger_key)
        if not await replicated(node, mark, replicas, REPLICA_WAIT_MS):
            raise NotReplicated(f"{self.config.ledger_key}: its replicas did not ack in time")

    def _check_lease(self) -> None:
        if not self.lease.held():
            raise LeaseLost("it lapsed before a renewal got through, or another relay has it")

    async def _open(self) -> None:
        """Connect to JetStream and learn the last entry it holds."""
        await self.jetstream.open()
        log.info("relaying %s to JetStream stream %s", self.config.ledger_key, self.config.stream)

    async def _ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.config.ledger_key, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _show_lag(self, lag: Lag) -> None:
        self.metrics.show_lag(self.config.ledger_key, lag)


async def _sleep_or_stop(stop: asyncio.Event, delay: float, limit: float) -> float:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), delay)
    return min(delay * 2, limit)


async def _run_relays(relays: list[Relay], share: Share | None, stop: asyncio.Event) -> None:
    """Run every Relay of this process; on a cluster, beating its heartbeat meanwhile (seen
    alive before it takes any lease) and leaving the heartbeats when they have stopped."""
    if share is None:
        await asyncio.gather(*(relay.run(stop) for relay in relays))
        return
    await share.beat()
    log.info(
        "relay %s: sharing %d ledgers with the other live relays", share.relay_id, share.ledgers
    )
    ended = asyncio.Event()
    beating = asyncio.create_task(share.run(ended), name="relay-heartbeat")
    try:
        await asyncio.gather(*(relay.run(stop) for relay in relays))
    finally:
        ended.set()
        await beating
        await share.leave()


async def run_relay(redis_url: str, config: RelayConfig, metrics_port: int | None) -> int:
    """`giftstream relay`: relay until SIGTERM or SIGINT every ledger whose lease this process
    holds (one Redis: the one ledger; a cluster: each partition's, one Relay each).
    Exit code: 0 stopped by a signal, 1 Redis unreachable, 2 the metrics port taken."""
    metrics = RelayMetrics()
    stop = start_worker(metrics.registry, metrics_port)
    if stop is None:
        return 2
    where = redact_url(redis_url)
    try:
        client, keyspace = await open_ledger_redis(redis_url, config.ledger_key)
    except (RedisError, OSError, NoPartitions) as exc:
        log.error("cannot reach Redis at %s: %s", where, exc)
        return 1
    try:
        await client.ping()
        ledgers = keyspace.ledgers()
        log.info(
            "relay ready: %s (%s) -> %s stream %s",
            where,
            f"ledger {ledgers[0]}" if len(ledgers) == 1 else f"{len(ledgers)} ledgers",
            redact_url(config.nats_url),
            config.stream,
        )
        relay_id = new_token()  # every lease this process takes, and its heartbeat
        share = None
        if len(ledgers) > 1:
            share = Share(
                client,
                keyspace.relays(),
                relay_id,
                len(ledgers),
                config.lease_ttl_ms,
                metrics.show_share,
            )
        relays = [
            Relay(
                client,
                dataclasses.replace(config, ledger_key=ledger, shared_stream=share is not None),
                metrics,
                lease_token=relay_id,
                share=share,
            )
            for ledger in ledgers
        ]
        await _run_relays(relays, share, stop)
    except (RedisError, OSError) as exc:
        log.error("cannot reach Redis at %s: %s", where, exc)
        return 1
    finally:
        await client.aclose()
    return 0
