"""Rate buckets and the session store, driven by a hand-moved clock."""

from __future__ import annotations

from fabstir_jupyter.host.limits import AddressLimiter, SessionStore, per_minute_bucket, trim_transcript


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bucket_allows_a_burst_then_refuses():
    """A bucket of 3/min passes 3 requests at once, then refuses."""
    clock = Clock()
    bucket = per_minute_bucket(3, clock=clock)
    assert [bucket.try_acquire() for _ in range(4)] == [True, True, True, False]


def test_bucket_refills_over_time():
    """One token comes back every 60/rate seconds; retry_after says when."""
    clock = Clock()
    bucket = per_minute_bucket(60, clock=clock)
    assert all(bucket.try_acquire() for _ in range(60)) and not bucket.try_acquire()
    assert 0.9 < bucket.retry_after() <= 1.0
    clock.now += 1.0
    assert bucket.try_acquire()


def test_bucket_with_zero_rate_is_off():
    """Rate 0 turns the limit off: no bucket at all."""
    assert per_minute_bucket(0) is None


def test_address_limiter_keeps_one_bucket_per_address():
    """Addresses are limited separately, and the table stays bounded."""
    clock = Clock()
    limiter = AddressLimiter(1, max_addresses=2, clock=clock)
    assert limiter.try_acquire("a") and not limiter.try_acquire("a")
    assert limiter.try_acquire("b")
    assert limiter.try_acquire("c")
    assert len(limiter) <= 2


def test_session_store_evicts_idle_sessions():
    """A session unused for idle_timeout is gone."""
    clock = Clock()
    store = SessionStore(idle_timeout=10, clock=clock)
    store.open("s")
    clock.now += 5
    assert store.get("s") is not None
    clock.now += 9
    assert store.get("s") is not None
    clock.now += 11
    assert store.get("s") is None and len(store) == 0


def test_session_store_evicts_least_recently_used():
    """Opening past max_sessions drops the least recently used session."""
    clock = Clock()
    store = SessionStore(max_sessions=2, clock=clock)
    store.open("a")
    store.open("b")
    store.get("a")
    store.open("c")
    assert "b" not in store and "a" in store and "c" in store


def test_session_store_records_turns_and_prefill():
    """A turn appends the answer; a prefill turn extends the assistant message."""
    store = SessionStore(clock=Clock())
    session = store.open("s")
    store.record_turn(session, [("user", "hi")], "hello")
    assert session.messages == [("user", "hi"), ("assistant", "hello")]
    store.record_turn(session, [*session.messages, ("user", "go"), ("assistant", "one ")], "two")
    assert session.messages[-1] == ("assistant", "one two")


def test_trim_transcript_keeps_the_system_message():
    """Trimming keeps a leading system message and the newest others."""
    messages = [("system", "s"), ("user", "1"), ("assistant", "2"), ("user", "3")]
    assert trim_transcript(messages, 3) == [("system", "s"), ("assistant", "2"), ("user", "3")]
    assert trim_transcript(messages, 10) == messages
    assert trim_transcript([("user", "1"), ("assistant", "2")], 1) == [("assistant", "2")]
