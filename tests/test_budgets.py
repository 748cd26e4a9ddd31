"""002's timing budgets (esperd.learn.budgets): every violation counted, one log line per window."""

from __future__ import annotations

from structlog.testing import capture_logs

from esperd.learn.budgets import BudgetWatch
from esperd.learn.config import BudgetConfig
from tests.support.timing import FakeClock


def test_defaults_are_the_seed_documents() -> None:
    config = BudgetConfig()
    assert (config.processing_ms, config.batch_ms, config.step_ms) == (20.0, 50.0, 100.0)


def test_violations_are_counted_and_logged_at_most_once_per_window() -> None:
    clock = FakeClock()
    watch = BudgetWatch(BudgetConfig(log_interval_s=60.0), clock)
    with capture_logs() as logs:
        assert not watch.observe("step", 100.0)  # at the budget: fine
        assert not watch.observe("batch", 12.0)
        for ms in (150.0, 300.0, 120.0):
            assert watch.observe("step", ms)
            clock.advance(10.0)
        assert watch.observe("processing", 25.0)  # another budget: its own line
        clock.advance(31.0)  # 61 s after the first step line
        assert watch.observe("step", 101.0)
    assert watch.violations == {"step": 4, "processing": 1}
    assert watch.worst_ms == {"step": 300.0, "processing": 25.0}
    lines = [
        (e["budget"], e["ms"], e["suppressed"])
        for e in logs
        if e["event"] == "learner timing budget exceeded"
    ]
    assert lines == [("step", 150.0, 0), ("processing", 25.0, 0), ("step", 101.0, 2)]
