"""Seed document 002's timing budgets for the learner, watched at run time (pure: no torch, no asyncio).

  processing  20 ms -- turning recorded experience into a batch on the event loop
              (`Learner._take_batch`: draining the rollout or sampling the replay buffer); it is
              time the decisions wait for, 002's "20ms batch processing budget";
  batch       50 ms -- one update of one batch on the worker (UpdateStats.seconds), 002's
              `batch_processing_ms` that a PPO train step is held to;
  step        100 ms -- the whole learner step as the daemon sees it, from taking the batch to
              the verdict on its result (`Learner.update_once`), 002's "training step budget".

A violation is counted (status `learner.budget_violations`, metrics) every time and logged at
most once per budget per `log_interval_s`, saying how many were held back since the last line.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

import structlog

from esperd.learn.config import BudgetConfig
from esperd.logs import RateLimiter

log = structlog.get_logger("esperd.learn.budgets")

BUDGETS: tuple[str, ...] = ("processing", "batch", "step")


class BudgetWatch:
    """Counts (and, rate-limited, logs) timings over their budget."""

    def __init__(self, config: BudgetConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.limits_ms = {
            "processing": config.processing_ms,
            "batch": config.batch_ms,
            "step": config.step_ms,
        }
        self.violations: collections.Counter[str] = collections.Counter()
        self.worst_ms: dict[str, float] = {}
        self._limiter = RateLimiter(config.log_interval_s, clock)  # type: ignore[arg-type]

    def observe(self, budget: str, ms: float) -> bool:
        """Note one timing of `budget` (one of BUDGETS); True if it was over its budget."""
        limit = self.limits_ms[budget]
        if ms <= limit:
            return False
        self.violations[budget] += 1
        self.worst_ms[budget] = max(self.worst_ms.get(budget, 0.0), ms)
        allowed, suppressed = self._limiter.allow(budget)
        if allowed:
            log.warning(
                "learner timing budget exceeded",
                budget=budget,
                ms=round(ms, 3),
                limit_ms=limit,
                violations=self.violations[budget],
                suppressed=suppressed,
            )
        return True
