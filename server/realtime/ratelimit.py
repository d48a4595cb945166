"""Token buckets: how a connection's request, gift and flood budgets, and a user's gift
budget over all their connections, refill over time."""

from __future__ import annotations


class TokenBucket:
    """Holds up to `burst` tokens, refilled at `rate` per second; each request takes one.

    Time is passed in (monotonic seconds) so the bucket is pure and testable.
    """

    __slots__ = ("_tokens", "_updated", "burst", "rate")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._tokens = float(burst)
        self._updated = now

    def take(self, now: float) -> bool:
        """Take one token if there is one; False means the caller is over its rate."""
        elapsed = now - self._updated
        if elapsed > 0:
            self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
            self._updated = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    @property
    def updated(self) -> float:
        """When the bucket was last taken from (its tokens are counted up to then)."""
        return self._updated


class SharedBuckets:
    """One `TokenBucket` per name (a user id), shared by every connection of that name on
    this node, so a budget cannot be multiplied by opening more sockets.

    Buckets are made full on first use and forgotten once full again (an idle name costs
    nothing), in sweeps whose cost is spread over the takes that grew the table.
    """

    __slots__ = ("_buckets", "_sweep_at", "burst", "rate")

    MIN_SWEEP = 1024

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._buckets: dict[str, TokenBucket] = {}
        self._sweep_at = self.MIN_SWEEP

    def take(self, name: str, now: float) -> bool:
        """Take one token from `name`'s bucket; False means `name` is over its rate."""
        bucket = self._buckets.get(name)
        if bucket is None:
            if len(self._buckets) >= self._sweep_at:
                self._sweep(now)
            bucket = self._buckets[name] = TokenBucket(self.rate, self.burst, now)
        return bucket.take(now)

    def __len__(self) -> int:
        return len(self._buckets)

    def _sweep(self, now: float) -> None:
        """Forget the buckets that would be full by `now`: a fresh one is the same."""
        refill = self.burst / self.rate
        self._buckets = {
            name: bucket for name, bucket in self._buckets.items() if now - bucket.updated < refill
        }
        self._sweep_at = max(self.MIN_SWEEP, 2 * len(self._buckets))
