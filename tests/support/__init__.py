"""Shared test support: import from the module that holds what you need.

- `tests.support.timing`: FakeClock (a clock the test moves) and `until` (poll a condition).
- `tests.support.packets`: wire messages built with sensible defaults (topologies, health,
  state, seeds, commands).
- `tests.support.observations`: synthetic Observations shaped as the analyzer makes them,
  for the policy and learner tests and the benchmarks.
"""
