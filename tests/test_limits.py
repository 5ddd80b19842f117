"""Client-side rate limiting and the response cache, on a fake clock."""

from _timing import FakeClock
from fabstir_jupyter.cache import ResponseCache
from fabstir_jupyter.limits import RateLimiter, TokenBucket


def test_bucket_allows_a_burst_then_spaces_requests_at_the_rate():
    """A bucket of 3 at 2/s lets 3 through at once, then asks for 0.5 s waits per request."""
    clock = FakeClock()
    bucket = TokenBucket(rate=2.0, burst=3, clock=clock)
    waits = [bucket.reserve() for _ in range(5)]
    assert waits[:3] == [0.0, 0.0, 0.0]
    assert waits[3] == 0.5 and waits[4] == 1.0


def test_bucket_refills_with_time_but_never_above_burst():
    """Tokens come back at the rate and stop at the burst size."""
    clock = FakeClock()
    bucket = TokenBucket(rate=1.0, burst=2, clock=clock)
    bucket.reserve(), bucket.reserve()
    clock.now += 1.0
    assert bucket.available() == 1.0
    clock.now += 100
    assert bucket.available() == 2.0


def test_rate_of_requests_over_a_minute_matches_the_limit():
    """Over 60 fake seconds a 1/s bucket (burst 5) admits 65 requests without waiting."""
    clock = FakeClock()
    bucket = TokenBucket(rate=1.0, burst=5, clock=clock)
    admitted = 0
    for _ in range(600):  # a request every 0.1 s, waiting requests are refused
        if bucket.available() >= 1:
            bucket.reserve()
            admitted += 1
        clock.now += 0.1
    assert 64 <= admitted <= 66


def test_limiter_keeps_one_bucket_per_host_and_none_when_off():
    """Hosts do not share a budget; rate=None never waits."""
    clock = FakeClock()
    limiter = RateLimiter(1.0, 1, clock=clock)
    assert limiter.reserve("a") == 0.0
    assert limiter.reserve("b") == 0.0
    assert limiter.reserve("a") == 1.0
    off = RateLimiter(None, 1)
    assert all(off.reserve("a") == 0.0 for _ in range(100))


def test_cache_is_a_bounded_lru():
    """The least recently used entry goes first; hits and misses are counted."""
    cache = ResponseCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1
    cache.put("c", 3)
    assert cache.get("b") is None
    assert cache.get("a") == 1 and cache.get("c") == 3
    assert (cache.hits, cache.misses, len(cache)) == (3, 1, 2)
