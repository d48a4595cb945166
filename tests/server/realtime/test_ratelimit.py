"""Token buckets allow a burst, then the sustained rate, and refill with time."""

from giftstream.server.realtime.ratelimit import TokenBucket


def test_burst_then_refill() -> None:
    bucket = TokenBucket(rate=2.0, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert not bucket.take(0.4)  # 0.8 of a token back
    assert bucket.take(0.5)  # one whole token back
    assert not bucket.take(0.5)


def test_refill_never_exceeds_burst() -> None:
    bucket = TokenBucket(rate=100.0, burst=2, now=0.0)
    assert bucket.take(1000.0) and bucket.take(1000.0)
    assert not bucket.take(1000.0)
