"""Prometheus metrics of one server, in a registry of its own (no process-global state),
with its process's CPU, memory, open files and garbage collections beside them."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST as PROMETHEUS_CONTENT_TYPE
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    ProcessCollector,
    generate_latest,
)

__all__ = ["PROMETHEUS_CONTENT_TYPE", "Metrics"]

_LUA_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class Metrics:
    """Every counter the server exports; one instance per server, handed to the parts."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_open_fds, ...
        GCCollector(registry=r)  # python_gc_collections_total{generation="2"}: full collections
        self.connections = Gauge("giftstream_connections", "Open WebSocket connections", registry=r)
        self.rooms_live = Gauge("giftstream_rooms_live", "Live rooms on this node", registry=r)
        self.gifts_settled = Counter(
            "giftstream_gifts_settled", "Gifts debited and credited (replays excluded)", registry=r
        )
        self.coins_settled = Counter(
            "giftstream_coins_settled", "Coins spent on settled gifts", registry=r
        )
        self.gift_replays = Counter(
            "giftstream_gift_replays",
            "Gift requests answered from their idempotency key",
            registry=r,
        )
        # Crediting a gift's creator across partitions (Redis Cluster; money/crediting.py)
        self.credit_lag_ms = Gauge(
            "giftstream_credit_lag_ms",
            "At the last crediting round: ms since the oldest gift it found uncredited (0: none)",
            registry=r,
        )
        self.credits_applied = Counter(
            "giftstream_credits_applied",
            "Gifts whose diamonds a crediting round of this node credited",
            registry=r,
        )
        self.credit_cas_losses = Counter(
            "giftstream_credit_cas_losses",
            "Credits not written because another runner had moved the cursor first",
            registry=r,
        )
        self.credit_wait_holdbacks = Counter(
            "giftstream_credit_wait_holdbacks",
            "Source partitions left uncredited for a round: their replicas did not ack what "
            "was read in time, or their shard did not answer",
            registry=r,
        )
        self.claim_wait_holdbacks = Counter(
            "giftstream_claim_wait_holdbacks",
            "Purchases and payouts refused as unavailable (retry): their claim's replicas did "
            "not ack it in time (Redis Cluster)",
            registry=r,
        )
        self.durable_ack_short = Counter(
            "giftstream_durable_ack_short",
            "--durable-ack gifts answered although WAIT/WAITAOF acked fewer than asked",
            registry=r,
        )
        self.lua_seconds = Histogram(
            "giftstream_lua_seconds",
            "Round trip of one money script call",
            ["script"],
            buckets=_LUA_BUCKETS,
            registry=r,
        )
        self.broadcast_frames = Counter(
            "giftstream_broadcast_frames",
            "Room frames encoded once and sent to every viewer",
            registry=r,
        )
        self.broadcast_deliveries = Counter(
            "giftstream_broadcast_deliveries", "Room frames written to a viewer", registry=r
        )
        self.slow_consumer_closes = Counter(
            "giftstream_slow_consumer_closes",
            "Connections closed 4008 for unsent backlog",
            registry=r,
        )
        self.connections_refused = Counter(
            "giftstream_connections_refused",
            "Connections refused by a cap: server_full (503), ip_cap (429), user_cap (4429)",
            ["reason"],
            registry=r,
        )
        self.errors = Counter(
            "giftstream_errors",
            "Error replies sent, by protocol error code",
            ["code"],
            registry=r,
        )
        self.http_requests = Counter(
            "giftstream_http_requests",
            "Internal API requests, by route and status",
            ["route", "status"],
            registry=r,
        )
        self.http_previous_secret = Counter(
            "giftstream_http_previous_secret",
            "Internal API requests signed with the previous webhook secret (a rotation is "
            "done once this stops growing)",
            registry=r,
        )

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
