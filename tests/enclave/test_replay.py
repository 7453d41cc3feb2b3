"""The replay guard (issue #12): a time window, remembered ids, bounded memory that fails closed."""

from __future__ import annotations

import secrets

import pytest

from veil.enclave.errors import ReplayCacheFullError, ReplayRefusedError
from veil.enclave.replay import ReplayGuard

NOW = 1_800_000_000.0


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _ms(t: float) -> int:
    return int(t * 1000)


def test_a_request_is_admitted_once() -> None:
    guard = ReplayGuard(clock=Clock())
    rid = secrets.token_bytes(16)
    guard.admit(rid, _ms(NOW))
    with pytest.raises(ReplayRefusedError, match="already seen"):
        guard.admit(rid, _ms(NOW))
    with pytest.raises(ReplayRefusedError, match="already seen"):  # the same id at another time too
        guard.admit(rid, _ms(NOW - 100))
    guard.admit(secrets.token_bytes(16), _ms(NOW))


@pytest.mark.parametrize("offset", [-301.0, 301.0, -86400.0, 86400.0])
def test_stale_and_future_times_are_refused(offset: float) -> None:
    guard = ReplayGuard(clock=Clock())
    with pytest.raises(ReplayRefusedError, match="window"):
        guard.admit(secrets.token_bytes(16), _ms(NOW + offset))
    assert len(guard) == 0


@pytest.mark.parametrize("offset", [-299.0, 0.0, 299.0])
def test_times_inside_the_window_are_admitted(offset: float) -> None:
    guard = ReplayGuard(clock=Clock())
    guard.admit(secrets.token_bytes(16), _ms(NOW + offset))


def test_a_missing_time_is_refused() -> None:
    with pytest.raises(ReplayRefusedError):
        ReplayGuard(clock=Clock()).admit(secrets.token_bytes(16), 0)


def test_a_replay_stays_refused_until_its_time_leaves_the_window() -> None:
    clock = Clock()
    guard = ReplayGuard(clock=clock)
    rid = secrets.token_bytes(16)
    guard.admit(rid, _ms(NOW))
    for step in range(0, 300, 7):  # as long as the capture's time is in the window: remembered
        clock.now = NOW + step
        with pytest.raises(ReplayRefusedError, match="already seen"):
            guard.admit(rid, _ms(NOW))
    clock.now = NOW + 301
    with pytest.raises(ReplayRefusedError, match="window"):  # then refused for its time
        guard.admit(rid, _ms(NOW))


def test_memory_is_bounded_by_age_and_capacity() -> None:
    clock = Clock()
    guard = ReplayGuard(capacity=100, clock=clock)
    for _ in range(100):
        guard.admit(secrets.token_bytes(16), _ms(clock.now))
    assert len(guard) == 100
    # full: refuse rather than forget an id that is still inside the window
    with pytest.raises(ReplayCacheFullError):
        guard.admit(secrets.token_bytes(16), _ms(clock.now))
    assert issubclass(ReplayCacheFullError, ReplayRefusedError)
    # once their time has left the window the old ids are dropped and there is room again
    clock.now += 300 + 2 * 10
    guard.admit(secrets.token_bytes(16), _ms(clock.now))
    assert len(guard) == 1
    # a steady stream over an hour never holds more than a window's worth
    guard = ReplayGuard(capacity=10_000, clock=clock)
    for _ in range(3600):
        clock.now += 1
        guard.admit(secrets.token_bytes(16), _ms(clock.now))
        assert len(guard) <= 300 + 2 * 10 + 1
