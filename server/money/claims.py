"""Receipts and payout keys on a Redis Cluster: a global id claimed once, then credited in its
owner's partition.

A receipt (or payout key) is global, but the wallet it credits (debits) sits in its user's
(creator's) partition, and one script cannot touch both slots. So a purchase or payout takes
two steps:

 1. claim (`claim.lua`, here): in the id's own partition, the claim record names its owner
    and params. A first call writes it; a retry with the same owner and params goes on; another
    owner or params is refused as the one-Redis scripts refuse a reused receipt or key (the
    same Reason, so the same HTTP status). The claim must outlive a failover of its shard (a
    lost claim would let a replay on another user through), so it is followed by `WAIT n` on
    the same connection (same_connection.py: the client's own node object, not a pipeline, whose
    retries may resend the WAIT alone elsewhere). n is the shard's replicas as `Replicas` counts
    them; fewer acks refuse the request as `unavailable` (a retry of the same request is safe),
    and a slot that moved meanwhile is asked again on its new master.
 2. credit (wallet.py): the existing purchase/payout script in the owner's partition, with
    its idempotency record there (`KeySpace.receipt(rc, owner=user)`), exactly once as on one
    Redis.

A crash between the steps leaves a claim and no credit: the retry finds its own claim and runs
step 2. A refund reads the owner from the claim, then runs refund.lua in the owner's
partition. A claim is kept for good, like the record: so on a cluster a receipt or key first
used for one owner and params stays bound to them even when step 2 refused (balance limit,
payout hold or cap, too few diamonds), where one Redis, which writes nothing on a refusal,
would take the id for other params later. One Redis has no claims at all: exactly today's keys.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from redis.asyncio.cluster import RedisCluster

from giftstream.server import scripts
from giftstream.server.money import keys
from giftstream.server.money.refusal import Reason, Refusal
from giftstream.server.money.same_connection import (
    FAILOVER_ERRORS,
    Replicas,
    script_through_failover,
)

log = logging.getLogger(__name__)

CLAIM_WAIT_MS = 1000  # how long a claim waits for its replicas before the request is refused
ATTEMPTS = 3  # a claim's node moved while it was written (a failover): asked again, this often


@dataclass(frozen=True, slots=True)
class Claim:
    """Who a receipt or payout key went to, and with what (a package id, a diamond count)."""

    owner: str
    params: str


class Claims:
    """The claim step of purchases and payouts on a cluster (the module's docstring says why).
    `now` gives what a script takes as now ('' in production: Redis's TIME)."""

    def __init__(
        self,
        redis: RedisCluster,
        keyspace: keys.KeySpace,
        *,
        now: Callable[[], int | str] = lambda: "",
        wait_ms: int = CLAIM_WAIT_MS,
        replicas: Replicas | None = None,
        on_held_back: Callable[[], object] | None = None,
    ) -> None:
        if not keyspace.cluster:
            raise ValueError("claims are for a Redis Cluster; one Redis needs none")
        self._redis = redis
        self._keys = keyspace
        self._now = now
        self._wait_ms = wait_ms
        self._replicas = replicas or Replicas(redis)
        self._held_back = on_held_back or (lambda: None)
        self._script = redis.register_script(scripts.script_source("claim"))

    # ---- receipts --------------------------------------------------------------------------

    async def claim_receipt(self, receipt: str, user: str, package: str) -> None:
        """Claim `receipt` for (user, package), or Refusal `receipt_reused` if it went to
        another user or package."""
        taken = await self._claim(self._keys.receipt_claim(receipt), user, package)
        _refuse_receipt(receipt, taken)

    async def check_receipt(self, receipt: str, user: str, package: str) -> None:
        """The claim's check without its write, for a purchase that writes nothing unless
        replayed (a minor's): Refusal `receipt_reused` if the receipt went to someone else."""
        claim = await self.receipt(receipt)
        _refuse_receipt(receipt, claim if claim != Claim(user, package) else None)

    async def receipt(self, receipt: str) -> Claim | None:
        """Who claimed `receipt`, or None: a refund's owner."""
        return await self._read(self._keys.receipt_claim(receipt))

    # ---- payouts ---------------------------------------------------------------------------

    async def claim_payout(self, key: str, creator: str, diamonds: int) -> None:
        """Claim payout `key` for (creator, diamonds), or Refusal `key_reused`."""
        taken = await self._claim(self._keys.payout_claim(key), creator, str(diamonds))
        if taken is not None:
            raise Refusal(
                Reason.KEY_REUSED,
                f"payout key {key} was already used for {taken.params} diamonds of {taken.owner}",
            )

    # ---- the claim itself ------------------------------------------------------------------

    async def _read(self, claim_key: str) -> Claim | None:
        owner, params = await self._redis.hmget(claim_key, ["owner", "params"])
        if owner is None:
            return None
        return Claim(keys.text(owner), keys.text(params or b""))

    async def _claim(self, claim_key: str, owner: str, params: str) -> Claim | None:
        """Write or confirm the claim and wait for its replicas: None when it is (owner,
        params)'s, else the other claim (nothing written)."""
        try:
            reply, acked, replicas = await script_through_failover(
                self._redis,
                self._replicas,
                self._script,
                [claim_key],
                [owner, params, self._now()],
                self._wait_ms,
                attempts=ATTEMPTS,
            )
        except FAILOVER_ERRORS as exc:
            raise Refusal(
                Reason.UNAVAILABLE, "the cluster is failing over; retry the same request"
            ) from exc
        status = keys.text(reply[0])
        if status == "taken":
            return Claim(keys.text(reply[1]), keys.text(reply[2]))
        if status != "ok":
            raise RuntimeError(f"claim.lua replied {reply!r}")
        if acked >= replicas:
            return None
        self._held_back()
        log.warning(
            "claim %s: %s of %d replicas acked within %d ms",
            claim_key,
            acked,
            replicas,
            self._wait_ms,
        )
        raise Refusal(
            Reason.UNAVAILABLE,
            "the claim is not on its replicas yet; retry the same request",
        )


def _refuse_receipt(receipt: str, taken: Claim | None) -> None:
    """The one-Redis purchase script's refusal of a reused receipt, word for word."""
    if taken is not None:
        raise Refusal(
            Reason.RECEIPT_REUSED,
            f"receipt {receipt} was already used for package {taken.params} of user {taken.owner}",
        )
