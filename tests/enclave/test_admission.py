"""Admission bookkeeping (issue #12, item 5): token buckets per peer, call caps, peer keys. Pinned clocks."""

from __future__ import annotations

import pytest

from veil.enclave.admission import CallGate, PeerRateLimiter, TokenBucket, peer_key, retry_after_ms


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_token_bucket_refills_at_its_rate_and_says_how_long_to_wait() -> None:
    clock = Clock()
    bucket = TokenBucket(2.0, 3, clock)
    assert [bucket.try_acquire() for _ in range(4)] == [True, True, True, False]
    assert bucket.retry_after_s() == pytest.approx(0.5)
    clock.t += 0.25
    assert not bucket.try_acquire()
    assert bucket.retry_after_s() == pytest.approx(0.25)
    clock.t += 0.25
    assert bucket.try_acquire()
    clock.t += 100
    assert [bucket.try_acquire() for _ in range(4)] == [True, True, True, False]  # capped at burst
    with pytest.raises(ValueError):
        TokenBucket(0, 1)
    with pytest.raises(ValueError):
        TokenBucket(1, 0)


def test_one_peer_exhausting_its_bucket_leaves_the_others_theirs() -> None:
    clock = Clock()
    limiter = PeerRateLimiter(1.0, 2, clock=clock)
    assert limiter.acquire("10.0.0.1") == 0.0
    assert limiter.acquire("10.0.0.1") == 0.0
    for _ in range(50):  # a client looping
        assert limiter.acquire("10.0.0.1") == pytest.approx(1.0)
    assert limiter.acquire("10.0.0.2") == 0.0
    assert limiter.acquire("10.0.0.2") == 0.0
    clock.t += 1.0
    assert limiter.acquire("10.0.0.1") == 0.0


def test_a_shared_bucket_caps_all_peers_but_a_refused_peer_takes_nothing_from_it() -> None:
    clock = Clock()
    limiter = PeerRateLimiter(1.0, 2, shared=TokenBucket(1.0, 3, clock), clock=clock)
    assert limiter.acquire("a") == 0.0
    assert limiter.acquire("a") == 0.0
    for _ in range(20):
        assert limiter.acquire("a") > 0  # refused by its own bucket: the shared one keeps its token
    assert limiter.acquire("b") == 0.0
    assert limiter.acquire("c") == pytest.approx(1.0)  # the shared bucket is empty now


def test_the_peer_table_is_bounded_and_evicts_the_least_recently_seen() -> None:
    clock = Clock()
    limiter = PeerRateLimiter(1.0, 1, max_peers=3, clock=clock)
    for peer in ("a", "b", "c"):
        assert limiter.acquire(peer) == 0.0
    assert limiter.acquire("a") > 0  # "a" is now the most recently seen
    for i in range(100):
        limiter.acquire(f"new{i}")
        assert len(limiter) <= 3
    assert limiter.acquire("a") == 0.0  # evicted long ago: back with a full bucket


def test_call_gate_caps_each_peer_and_the_total_health_only_per_peer() -> None:
    gate = CallGate(max_per_peer=2, max_total=3)
    assert gate.enter("a") is None and gate.enter("a") is None
    assert gate.enter("a") == CallGate.PEER
    assert gate.enter("a", counted=False) == CallGate.PEER
    assert gate.enter("b") is None
    assert gate.enter("c") == CallGate.TOTAL
    assert gate.enter("c", counted=False) is None  # a health check still gets in
    gate.leave("c", counted=False)
    gate.leave("a")
    assert gate.enter("c") is None
    for peer in ("a", "b", "c"):
        gate.leave(peer)
    assert gate.total == 0 and gate.in_flight("a") == gate.in_flight("b") == gate.in_flight("c") == 0


@pytest.mark.parametrize(
    ("peer", "key"),
    [
        ("ipv4:127.0.0.1:5000", "127.0.0.1"),
        ("ipv4:127.0.0.2:6000", "127.0.0.2"),
        ("ipv6:[::1]:5000", "::/64"),
        ("ipv6:%5B::1%5D:5000", "::/64"),
        ("ipv6:[2001:db8:1:2:aaaa::1]:443", "2001:db8:1:2::/64"),
        ("ipv6:[2001:db8:1:2:bbbb::7]:444", "2001:db8:1:2::/64"),
        ("ipv6:[::ffff:10.1.2.3]:80", "10.1.2.3"),
        ("ipv6:[fe80::1%25eth0]:80", "fe80::/64"),
        ("unix:/run/veil.sock", "unix:/run/veil.sock"),
        ("ipv4:not-an-address:1", "ipv4:not-an-address:1"),
    ],
)
def test_peer_key_is_the_address_without_port(peer: str, key: str) -> None:
    assert peer_key(peer) == key


def test_retry_hint_is_whole_milliseconds_at_least_one() -> None:
    assert retry_after_ms(0.0) == 1
    assert retry_after_ms(0.0001) == 1
    assert retry_after_ms(0.25) == 250
    assert retry_after_ms(1.0001) == 1001
