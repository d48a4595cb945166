"""Wiring and lifecycle: builds every part from the settings, starts them in order, and on
shutdown stops accepting, lets money movements finish, flushes rooms and closes with 1001."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import uuid
from collections.abc import Callable
from contextlib import AsyncExitStack
from types import TracebackType

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from giftstream.server.config import Settings, redact_url
from giftstream.server.embedded_redis import EmbeddedRedis, EmbeddedRedisError
from giftstream.server.metrics import Metrics
from giftstream.server.money import keys
from giftstream.server.money.admin import AdminServer, build_admin_app
from giftstream.server.money.catalog import Catalog
from giftstream.server.money.crediting import Crediting
from giftstream.server.money.wallet import Wallet
from giftstream.server.realtime.auth import TokenRules
from giftstream.server.realtime.broker import Broker, MemoryBroker
from giftstream.server.realtime.caps import ConnectionCaps
from giftstream.server.realtime.fanout import Fanout
from giftstream.server.realtime.gateway import WS_PATH, Gateway
from giftstream.server.realtime.hub import Hub, RoomTimes
from giftstream.server.realtime.ops import OpsFeed
from giftstream.server.realtime.opslog import OpsLog
from giftstream.server.realtime.ratelimit import SharedBuckets
from giftstream.server.realtime.redis_broker import RedisBroker
from giftstream.server.realtime.registry import Counters, GatewayRegistry, new_gateway_id
from giftstream.server.realtime.session import NodeParts, NodeState
from giftstream.server.redis_check import (
    assess,
    durable_ack_refusal,
    has_waitaof,
    read_cluster_settings,
    read_settings,
)
from giftstream.server.redis_cluster import (
    PartitionsMismatch,
    RedisClient,
    claim_partitions,
    cluster_client,
    is_cluster,
)

log = logging.getLogger(__name__)

# Objects allocated between young collections (CPython's default is 700); see `tune_gc`.
GC_YOUNG_THRESHOLD = 10_000


class StartupError(RuntimeError):
    """The server cannot start; the message is the one line the operator sees."""


class App:
    """One giftstream node. `async with App(...)` starts it; leaving the block shuts it down."""

    def __init__(self, settings: Settings, catalog: Catalog) -> None:
        self.settings = settings
        self.catalog = catalog
        self.metrics = Metrics()
        self.gateway_id = new_gateway_id()  # this process among the gateways sharing Redis
        self.embedded_redis: EmbeddedRedis | None = None
        self.redis_url = settings.redis_url
        self._stack = AsyncExitStack()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()  # the tick loops end on it (see Hub.run)
        # this process among the gateways sharing a Redis (its presence fields)
        self.gateway_id = uuid.uuid4().hex[:12]

    # ---- start --------------------------------------------------------------------------

    async def __aenter__(self) -> App:
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            self._stop_embedded_redis()
            raise
        return self

    async def _start(self) -> None:
        settings = self.settings
        if self.redis_url is None:
            self.redis_url = await asyncio.to_thread(self._start_embedded_redis)
        self.redis = await self._connect()
        self._stack.push_async_callback(self.redis.aclose)
        await self._check_redis()
        self.keyspace = await self._keyspace()
        self.wallet = Wallet(
            self.redis,
            self.catalog.economics,
            keyspace=self.keyspace,
            metrics=self.metrics,
            payout_hold_days=settings.payout_hold_days,
            payout_daily_cap=settings.payout_daily_cap,
            durable_ack=settings.durable_ack,
        )
        await self.wallet.load_scripts()
        if self.keyspace.cluster and settings.crediting:
            # a gift's diamonds reach its creator's partition by this runner (crediting.py),
            # woken by each gift settled here; any gateway's runner may credit any gift
            self.crediting = Crediting(self.redis, self.keyspace, self.metrics)
            self.wallet.on_credit_due = self.crediting.poke
            self._spawn(self.crediting.run(self._stopping))
        self.fanout = Fanout(
            settings.limits.max_backlog_bytes, self.metrics, settings.limits.close_timeout_s
        )
        self.registry = GatewayRegistry(
            self.redis,
            self.gateway_id,
            self._counters,
            self.keyspace.all_live_rooms(),
            expiry_s=settings.limits.gateway_expiry_s,
        )
        self.ops = OpsFeed(self.fanout, OpsLog(self.redis), self.registry)
        await self.ops.start()
        self.broker: Broker = await self._stack.enter_async_context(self._make_broker())
        limits = settings.limits
        times = RoomTimes(
            creator_seen_s=limits.creator_seen_s,
            room_idle_s=limits.room_idle_s,
            unfollow_after_s=limits.unfollow_after_s,
        )
        self.hub = Hub(self.redis, self.broker, self.fanout, self.ops, self.metrics, times)
        restored = await self.hub.restore()
        self.node_state = NodeState(
            user_gifts=SharedBuckets(
                settings.limits.user_gifts_per_s, settings.limits.user_gifts_burst
            )
        )
        self.parts = NodeParts(
            limits=settings.limits,
            tokens=TokenRules(
                settings.jwt_secret,
                leeway_s=settings.jwt_leeway_s,
                audience=settings.jwt_audience,
                issuer=settings.jwt_issuer,
            ),
            caps=ConnectionCaps(settings.limits),
            catalog=self.catalog,
            wallet=self.wallet,
            hub=self.hub,
            ops=self.ops,
            fanout=self.fanout,
            metrics=self.metrics,
        )
        shared_ports = settings.workers > 1  # SO_REUSEPORT: one of N worker processes
        self.gateway = Gateway(
            self.parts,
            self.node_state,
            settings.host,
            settings.port,
            settings.allowed_origins,
            gateway_id=self.gateway_id,
            reuse_port=shared_ports,
        )
        listening = f"{settings.host}:{settings.port}"  # what a bind failure names
        try:
            await self._stack.enter_async_context(self.gateway)
            admin_app = build_admin_app(
                wallet=self.wallet,
                catalog=self.catalog,
                redis=self.redis,
                webhook_secret=settings.webhook_secret,
                webhook_secret_previous=settings.webhook_secret_previous,
                metrics=self.metrics,
            )
            listening = f"{settings.admin_host}:{settings.admin_port} (--admin-host)"
            self.admin = await self._stack.enter_async_context(
                AdminServer(
                    admin_app, settings.admin_host, settings.admin_port, reuse_port=shared_ports
                )
            )
        except OSError as exc:
            raise StartupError(f"cannot listen on {listening}: {exc.strerror or exc}") from exc
        self._spawn(self.hub.run(limits.tick_s, limits.viewers_interval_s, self._stopping))
        await self.registry.beat()  # among the service's gateways from the start
        self._spawn(self.ops.run(limits.tick_s, limits.stats_interval_s, self._stopping))
        if settings.allowed_origins is None:
            log.warning("no --allowed-origins: WebSocket upgrades from any origin are accepted")
        log.info(
            "%s: ws=%s admin=%s redis=%s ledger=%s broker=%s gateway=%s rooms live=%d",
            # a worker's own line is not the service's: the supervisor says that once
            "giftstream worker ready" if shared_ports else "giftstream ready",
            self.ws_url,
            self.admin_url,
            self.redis_description,
            settings.ledger_key,
            settings.broker,
            self.gateway_id,
            restored,
        )

    def _make_broker(self) -> MemoryBroker | RedisBroker:
        limits = self.settings.limits
        if self.settings.broker == "memory":
            return MemoryBroker(
                self.redis, history_size=limits.history_size, keyspace=self.keyspace
            )
        return RedisBroker(
            self.redis,
            history_size=limits.history_size,
            keyspace=self.keyspace,
            gateway_id=self.gateway_id,
            presence_refresh_s=limits.presence_refresh_s,
            presence_ttl_s=limits.presence_ttl_s,
        )

    async def _connect(self) -> RedisClient:
        """The node's one client: one Redis's (a blocking pool of redis_pool_size), or, when
        the URL is a node of a Redis Cluster, a cluster client that reaches every shard."""
        assert self.redis_url is not None
        where = redact_url(self.redis_url)
        pool = aioredis.BlockingConnectionPool.from_url(
            self.redis_url, max_connections=self.settings.redis_pool_size, timeout=10
        )
        single = aioredis.Redis.from_pool(pool)  # closing the client closes the pool
        try:
            await single.ping()
            if not await is_cluster(single):
                return single
        except (RedisError, OSError) as exc:
            await single.aclose()
            raise StartupError(f"cannot reach Redis at {where}: {exc}") from exc
        await single.aclose()
        # No redis_pool_size here: a cluster client's per-node pool refuses a call past its
        # cap (MaxConnectionsError) instead of making it wait, as the blocking pool above does;
        # redis_cluster.NODE_CONNECTIONS and the wallet's own bound keep below it.
        cluster = cluster_client(self.redis_url)
        try:
            await cluster.initialize()  # the slot map, from the node given
        except (RedisError, OSError) as exc:
            await cluster.aclose()
            raise StartupError(f"cannot reach the Redis Cluster at {where}: {exc}") from exc
        return cluster

    async def _keyspace(self) -> keys.KeySpace:
        """One Redis: today's key names. A cluster: its partition count, fixed by the first
        start (a start asking another count is refused in one line)."""
        ledger_key = self.settings.ledger_key
        if not isinstance(self.redis, RedisCluster):
            return keys.KeySpace(ledger_key=ledger_key)
        try:
            partitions = await claim_partitions(self.redis, self.settings.partitions)
        except PartitionsMismatch as exc:
            raise StartupError(str(exc)) from exc
        except (RedisError, OSError) as exc:
            where = redact_url(self.redis_url or "")
            raise StartupError(f"cannot reach the Redis Cluster at {where}: {exc}") from exc
        return keys.KeySpace(ledger_key=ledger_key, partitions=partitions, cluster=True)

    async def _check_redis(self) -> None:
        """Refuse a Redis that may evict money; warn of one that keeps no AOF. On a cluster,
        every master is judged: each holds the money of its slots."""
        assert self.redis_url is not None
        where = redact_url(self.redis_url)
        try:
            if isinstance(self.redis, RedisCluster):
                found = {
                    f"{name} (a master of the cluster at {where})": settings
                    for name, settings in (await read_cluster_settings(self.redis)).items()
                }
            else:
                found = {where: await read_settings(self.redis)}
        except (RedisError, OSError) as exc:
            raise StartupError(f"cannot read the settings of Redis at {where}: {exc}") from exc
        for node, settings in found.items():
            assessment = assess(settings, node)
            if assessment.refusal is not None:
                raise StartupError(assessment.refusal)
            for warning in assessment.warnings:
                log.warning("%s", warning)
        if self.settings.durable_ack and isinstance(self.redis, aioredis.Redis):
            # one Redis: durable acks are WAITAOF's (a cluster's are its replicas' WAIT)
            refusal = durable_ack_refusal(found[where], where, await has_waitaof(self.redis))
            if refusal is not None:
                raise StartupError(refusal)

    def _start_embedded_redis(self) -> str:
        try:
            self.embedded_redis = EmbeddedRedis(self.settings.data_dir / "redis").start()
        except EmbeddedRedisError as exc:
            raise StartupError(f"embedded Redis: {exc}") from exc
        return self.embedded_redis.url

    def _stop_embedded_redis(self) -> None:
        if self.embedded_redis is not None:
            self.embedded_redis.stop()
            self.embedded_redis = None

    def _spawn(self, work: object) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(work)  # type: ignore[arg-type]
        self._tasks.append(task)

    def _counters(self) -> Counters:
        ops = self.ops
        return Counters(self.node_state.connections, ops.gifts, ops.coins, ops.refusals)

    @property
    def redis_description(self) -> str:
        """The Redis as the ready line names it: a cluster says so, with its partitions."""
        where = redact_url(self.redis_url or "")
        if self.keyspace.cluster:
            return f"{where} (Redis Cluster, {self.keyspace.partitions} partitions)"
        return where

    @property
    def ws_url(self) -> str:
        return f"ws://{self.settings.host}:{self.gateway.port}{WS_PATH}"

    @property
    def admin_url(self) -> str:
        return self.admin.url

    # ---- stop ---------------------------------------------------------------------------

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.shutdown()

    async def shutdown(self) -> None:
        """Stop accepting, finish money movements in progress, deliver what the rooms have
        queued, then close every socket with 1001 and release Redis."""
        log.info("shutting down: no new connections")
        self.gateway.stop_accepting()
        self.node_state.draining = True
        left = await self.wallet.drain(self.settings.limits.shutdown_grace_s)
        if left:
            log.warning("%d money movements still running at shutdown", left)
        gifts = self.node_state.gift_tasks
        if gifts:  # settled: their replies go out before the sockets close
            await asyncio.wait(set(gifts), timeout=self.settings.limits.close_timeout_s)
        with contextlib.suppress(Exception):
            await self.hub.flush()
        self._stopping.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.ops.flush()  # a room_opened queued in the last tick
        with contextlib.suppress(Exception):  # out of the stats at once, not after the expiry
            await self.registry.remove()
        await self._stack.aclose()  # admin server, gateway (1001 to every socket), broker, Redis
        self._stop_embedded_redis()
        log.info("giftstream stopped")


async def serve_until_signalled(
    settings: Settings, catalog: Catalog, on_ready: Callable[[App], object] | None = None
) -> None:
    """Run a node until SIGTERM or SIGINT, then shut it down in order."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with App(settings, catalog) as app:
            tune_gc()
            if on_ready is not None:
                result = on_ready(app)
                if asyncio.iscoroutine(result):
                    await result
            await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def tune_gc() -> None:
    """Keep full garbage collections, which stall every room, rare on a serving node (called
    once it is up; tests leave the collector as it is): a gift's state in flight dies young
    under a higher young threshold, and what start-up built is frozen out of every later
    collection. docs/operations.md says what this bought, with the measurements."""
    gc.collect()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 10, 10)
    gc.freeze()
    log.info(
        "garbage collector: young collections every %d allocations, %d start-up objects frozen",
        GC_YOUNG_THRESHOLD,
        gc.get_freeze_count(),
    )
