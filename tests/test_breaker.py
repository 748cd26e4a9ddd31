"""The learner's circuit breaker (esperd.learn.breaker) on a fake clock: 002's semantics."""

from __future__ import annotations

import pytest

from esperd.learn.breaker import BreakerPolicy, BreakerState, CircuitBreaker
from tests.support.timing import FakeClock


def breaker(**policy: float) -> tuple[CircuitBreaker, FakeClock]:
    clock = FakeClock()
    return CircuitBreaker(BreakerPolicy(**policy), clock), clock  # type: ignore[arg-type]


def test_defaults_are_the_seed_documents() -> None:
    policy = BreakerPolicy()
    assert (policy.failure_threshold, policy.window_s, policy.recovery_s) == (5, 300.0, 60.0)


def test_it_trips_on_the_fifth_failure_within_the_window() -> None:
    b, clock = breaker()
    for i in range(4):
        assert b.record_failure(f"kl {i}") is BreakerState.CLOSED
        assert b.allow()
        clock.advance(60.0)  # 4 failures at 0, 60, 120, 180
    assert b.failures_in_window == 4
    assert b.record_failure("kl 4") is BreakerState.OPEN  # t=240: five within 300 s
    assert not b.allow() and b.transitions == {"closed->open": 1}
    assert b.last_transition is not None and "5 failures within 300s (last: kl 4)" in b.last_transition.reason


def test_failures_spread_wider_than_the_window_never_trip_it() -> None:
    b, clock = breaker()
    for _ in range(20):
        assert b.record_failure("kl") is BreakerState.CLOSED
        clock.advance(75.0)  # at most 4 within any 300 s
    assert b.failures_total == 20 and b.failures_in_window == 3 and b.allow()  # 75 s after the last


def test_open_pauses_for_recovery_then_one_probe_goes_through() -> None:
    b, clock = breaker(failure_threshold=2)
    b.record_failure("a")
    b.record_failure("b")
    clock.advance(59.9)
    assert b.state is BreakerState.OPEN and not b.allow()
    assert b.reopens_in_s == pytest.approx(0.1)
    clock.advance(0.1)
    assert b.state is BreakerState.HALF_OPEN
    assert b.allow()  # the probe
    assert not b.allow()  # nothing else until the probe is judged
    b.record_success()
    assert b.state is BreakerState.CLOSED and b.allow() and b.failures_in_window == 0
    assert b.transitions == {"closed->open": 1, "open->half_open": 1, "half_open->closed": 1}


def test_a_failed_probe_opens_it_again_for_another_recovery() -> None:
    b, clock = breaker(failure_threshold=1, recovery_s=10.0)
    assert b.record_failure("nan") is BreakerState.OPEN
    clock.advance(10.0)
    assert b.allow()
    assert b.record_failure("kl again") is BreakerState.OPEN
    assert not b.allow()
    clock.advance(9.0)
    assert b.state is BreakerState.OPEN
    clock.advance(1.0)
    assert b.state is BreakerState.HALF_OPEN
    assert b.transitions["half_open->open"] == 1 and b.transitions["open->half_open"] == 2


def test_success_while_closed_changes_nothing_and_a_late_failure_while_open_is_only_counted() -> None:
    b, clock = breaker(failure_threshold=2)
    b.record_success()
    assert b.state is BreakerState.CLOSED and not b.transitions
    b.record_failure("a")
    b.record_failure("b")
    assert b.record_failure("late") is BreakerState.OPEN and b.failures_total == 3
    clock.advance(30.0)
    assert b.reopens_in_s == pytest.approx(30.0)  # the late failure did not extend the pause


def test_a_bad_policy_is_refused() -> None:
    with pytest.raises(ValueError):
        BreakerPolicy(failure_threshold=0)
