"""Token buckets: how a connection's request, gift and flood budgets refill over time."""

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
