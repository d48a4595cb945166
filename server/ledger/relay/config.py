"""The relay's settings with their defaults, its consumer group and its lease key."""

from __future__ import annotations

from dataclasses import dataclass

from giftstream.server.money import keys

GROUP = "relay"  # the relay's consumer group on the ledger stream
CONSUMER = "relay"  # one relay at a time (the lease): it re-reads its own pending entries
DEFAULT_STREAM = "GIFTSTREAM_LEDGER"
DEFAULT_SUBJECT_PREFIX = "giftstream.ledger"
DEFAULT_LEASE_TTL_MS = 10_000


def lease_key(ledger_key: str = keys.LEDGER) -> str:
    """The Redis key of the lease that lets one relay at a time publish `ledger_key`."""
    return keys.relay_lease(ledger_key)


@dataclass(frozen=True, slots=True)
class RelayConfig:
    nats_url: str
    ledger_key: str = keys.LEDGER
    stream: str = DEFAULT_STREAM
    subject_prefix: str = DEFAULT_SUBJECT_PREFIX
    batch: int = 256
    block_ms: int = 1000
    duplicate_window_s: float = 24 * 3600.0  # second line of defence; see worker.py's doc
    max_backoff_s: float = 5.0
    lease_ttl_ms: int = DEFAULT_LEASE_TTL_MS  # renewed every third of it
    publish_timeout_s: float = 5.0  # for JetStream to acknowledge a whole batch
    # Other ledgers' relays publish to the same stream at once (a cluster's partitions): the
    # stream's last message and sequence then say nothing of this ledger (jetstream.py)
    shared_stream: bool = False
