"""The Supervisor keeps background tasks running, says when they end, and gives up loudly.

Real coroutines that really raise or return; short real backoffs.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable

import pytest

from esperd.ops.supervisor import Supervisor, SupervisorConfig
from tests.support.timing import until

FAST = SupervisorConfig(
    max_restarts=3, window_s=60.0, backoff_s=0.01, backoff_max_s=0.04, healthy_after_s=60.0
)


def failing_after(runs: list[int], fail_times: int, error: Exception) -> Callable[[], Awaitable[None]]:
    """A task that raises `error` on its first `fail_times` runs, then runs forever."""

    async def task() -> None:
        runs.append(len(runs))
        if len(runs) <= fail_times:
            raise error
        await asyncio.Event().wait()

    return task


async def test_a_task_that_raises_is_restarted_and_status_says_why() -> None:
    gave_up: list[tuple[str, str]] = []
    supervisor = Supervisor(lambda name, error: gave_up.append((name, error)), FAST)
    runs: list[int] = []
    supervisor.spawn("learner", failing_after(runs, 2, OSError(28, "No space left on device")))
    await until(lambda: len(runs) == 3)
    await until(lambda: supervisor.status()["learner"].running)
    status = supervisor.status()["learner"]
    assert status.restarts == 2
    assert "No space left on device" in status.last_error and status.last_error.startswith("OSError")
    assert status.last_error_at.endswith("+00:00")
    assert not status.gave_up and not gave_up and supervisor.gave_up == []
    await supervisor.stop()


async def test_a_task_that_returns_is_an_unexpected_end_too() -> None:
    supervisor = Supervisor(lambda name, error: None, FAST)
    runs: list[int] = []

    async def returns_once() -> None:
        runs.append(1)
        if len(runs) == 1:
            return
        await asyncio.Event().wait()

    supervisor.spawn("status-log", returns_once)
    await until(lambda: len(runs) == 2)
    status = supervisor.status()["status-log"]
    assert status.restarts == 1 and status.last_error == "returned"
    await supervisor.stop()


async def test_past_the_budget_it_gives_up_and_calls_back_once() -> None:
    gave_up: list[tuple[str, str]] = []
    supervisor = Supervisor(lambda name, error: gave_up.append((name, error)), FAST)
    runs: list[int] = []
    supervisor.spawn("housekeeping", failing_after(runs, 1_000, RuntimeError("bug")))
    await until(lambda: bool(gave_up))
    await asyncio.sleep(0.1)  # no more runs once given up
    assert gave_up == [("housekeeping", "RuntimeError: bug")]
    assert len(runs) == FAST.max_restarts + 1
    status = supervisor.status()["housekeeping"]
    assert status.gave_up and not status.running and status.restarts == FAST.max_restarts
    assert supervisor.gave_up == ["housekeeping"]
    await supervisor.stop()


async def test_backoff_doubles_up_to_its_cap() -> None:
    config = SupervisorConfig(max_restarts=10, window_s=60.0, backoff_s=0.05, backoff_max_s=0.1)
    supervisor = Supervisor(lambda name, error: None, config)
    started: list[float] = []
    loop = asyncio.get_running_loop()

    async def task() -> None:
        started.append(loop.time())
        if len(started) <= 4:
            raise ValueError("again")
        await asyncio.Event().wait()

    supervisor.spawn("t", task)
    await until(lambda: len(started) == 5)
    gaps = [b - a for a, b in itertools.pairwise(started)]
    assert gaps[0] >= 0.05 and gaps[1] >= 0.1 and gaps[2] >= 0.1 and gaps[3] >= 0.1
    assert gaps[1] < 0.2 + 0.15  # capped at backoff_max_s (with slack for a loaded machine)
    await supervisor.stop()


async def test_ends_outside_the_window_do_not_count_towards_the_budget() -> None:
    now = [0.0]
    config = SupervisorConfig(max_restarts=1, window_s=10.0, backoff_s=0.0, backoff_max_s=0.0)
    gave_up: list[str] = []
    supervisor = Supervisor(lambda name, error: gave_up.append(name), config, clock=lambda: now[0])
    runs: list[int] = []
    proceed = asyncio.Event()

    async def task() -> None:
        runs.append(1)
        await proceed.wait()
        proceed.clear()
        raise RuntimeError("transient")

    supervisor.spawn("t", task)
    for step in range(4):  # an end every 20 (fake) seconds: never two within 10
        await until(lambda step=step: len(runs) == step + 1)
        now[0] += 20.0
        proceed.set()
    await until(lambda: len(runs) == 5)
    assert not gave_up and supervisor.status()["t"].restarts == 4
    proceed.set()  # a second end at the same (fake) time: two within the window, over the budget of 1
    await until(lambda: bool(gave_up))
    assert gave_up == ["t"] and len(runs) == 5
    await supervisor.stop()


async def test_stopping_is_not_a_failure() -> None:
    gave_up: list[str] = []
    supervisor = Supervisor(lambda name, error: gave_up.append(name), FAST)
    quiesce = asyncio.Event()

    async def ends_when_quiesced() -> None:
        await quiesce.wait()

    async def forever() -> None:
        await asyncio.Event().wait()

    supervisor.spawn("learner", ends_when_quiesced)
    supervisor.spawn("decisions", forever)
    await asyncio.sleep(0.01)
    supervisor.stopping()
    quiesce.set()  # the learner returns as asked during shutdown: no restart, no error
    await asyncio.sleep(0.05)
    await supervisor.stop()
    status = supervisor.status()
    assert status["learner"].restarts == 0 and status["learner"].last_error == ""
    assert status["decisions"].restarts == 0 and not status["decisions"].running
    assert not gave_up


async def test_a_duplicate_name_is_refused() -> None:
    supervisor = Supervisor(lambda name, error: None, FAST)

    async def forever() -> None:
        await asyncio.Event().wait()

    supervisor.spawn("x", forever)
    with pytest.raises(ValueError, match="already supervised"):
        supervisor.spawn("x", forever)
    await supervisor.stop()
