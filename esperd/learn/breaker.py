"""The learner's circuit breaker, as seed document 002 specifies it (pure: no torch, no asyncio).

  closed     learning runs. Each failure is remembered; `failure_threshold` failures within
             `window_s` open the breaker.
  open       learning is paused for `recovery_s`, then the breaker is half-open.
  half_open  one probe update is let through: a success closes the breaker (and forgets the
             failures), a failure opens it again for another `recovery_s`.

The clock is injected (monotonic seconds), so the tests drive it by hand. What a failure costs
besides being counted (rolling the weights back) is the learner's business, not the breaker's.
"""

from __future__ import annotations

import collections
import enum
from collections.abc import Callable

import msgspec


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class BreakerPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """002's numbers: 5 failures within 300 s open it; a probe after 60 s may close it."""

    failure_threshold: int = 5
    window_s: float = 300.0
    recovery_s: float = 60.0

    def __post_init__(self) -> None:
        if self.failure_threshold < 1 or self.window_s <= 0 or self.recovery_s < 0:
            raise ValueError(f"breaker: invalid {self}")


class Transition(msgspec.Struct, frozen=True):
    """One change of state, and why."""

    at: float
    old: BreakerState
    new: BreakerState
    reason: str


class CircuitBreaker:
    """Counts failures in a sliding window and gates learning (see the module docstring)."""

    def __init__(self, policy: BreakerPolicy, clock: Callable[[], float]) -> None:
        self.policy = policy
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._failures: collections.deque[float] = collections.deque()
        self._opened_at = 0.0
        self._probing = False  # half-open: the one probe has been let through, its outcome pending
        self.failures_total = 0
        self.transitions: collections.Counter[str] = collections.Counter()  # "closed->open" -> count
        self.last_transition: Transition | None = None
        self.last_failure = ""

    @property
    def state(self) -> BreakerState:
        """The state now (an open breaker whose recovery has passed reads half-open)."""
        if self._state is BreakerState.OPEN and self._clock() >= self._opened_at + self.policy.recovery_s:
            self._move(BreakerState.HALF_OPEN, f"recovery of {self.policy.recovery_s:g}s passed")
        return self._state

    @property
    def failures_in_window(self) -> int:
        self._expire(self._clock())
        return len(self._failures)

    @property
    def reopens_in_s(self) -> float:
        """While open: seconds until the half-open probe (0 otherwise)."""
        if self.state is not BreakerState.OPEN:
            return 0.0
        return max(self._opened_at + self.policy.recovery_s - self._clock(), 0.0)

    def allow(self) -> bool:
        """Whether an update may run now. Half-open lets exactly one probe through until it is judged."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN and not self._probing:
            self._probing = True
            return True
        return False

    def release_probe(self) -> None:
        """The probe let through did not run to a verdict (no data, the worker died): let another try."""
        self._probing = False

    def record_success(self) -> None:
        """An update was sound. A half-open probe's success closes the breaker."""
        if self.state is BreakerState.HALF_OPEN:
            self._failures.clear()
            self._move(BreakerState.CLOSED, "probe update succeeded")

    def record_failure(self, reason: str) -> BreakerState:
        """An update failed (`reason` says how); returns the state after it."""
        now = self._clock()
        self.failures_total += 1
        self.last_failure = reason
        state = self.state
        if state is BreakerState.HALF_OPEN:
            self._open(now, f"probe update failed: {reason}")
            return self._state
        if state is BreakerState.OPEN:
            return state  # a late result from before it opened: counted, the pause stands
        self._failures.append(now)
        self._expire(now)
        if len(self._failures) >= self.policy.failure_threshold:
            self._open(
                now,
                f"{len(self._failures)} failures within {self.policy.window_s:g}s (last: {reason})",
            )
        return self._state

    def _open(self, now: float, reason: str) -> None:
        self._opened_at = now
        self._move(BreakerState.OPEN, reason)

    def _expire(self, now: float) -> None:
        horizon = now - self.policy.window_s
        while self._failures and self._failures[0] <= horizon:
            self._failures.popleft()

    def _move(self, new: BreakerState, reason: str) -> None:
        old = self._state
        self._state = new
        self._probing = False
        self.transitions[f"{old}->{new}"] += 1
        self.last_transition = Transition(self._clock(), old, new, reason)
