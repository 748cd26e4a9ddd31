"""Supervision of the daemon's background tasks: none of them may end silently.

Every long-running task the service starts runs under one Supervisor. A task that ends when
nobody asked it to (it raised, or returned) is logged with its error, shown in status, and
started again after a backoff (1 s, doubling, at most `backoff_max_s`; back to the start once a
run lasted `healthy_after_s`). A task that ends `max_restarts` times within `window_s` is given
up on: `on_give_up` is called (the service then stops and exits non-zero, so that systemd
restarts the whole process), and the task stays down.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import time
from collections.abc import Awaitable, Callable
from typing import Annotated

import msgspec
import structlog
from msgspec import Meta

from esperd.section import Section
from esperd_contracts.status import TaskStatus

log = structlog.get_logger("esperd.ops.supervisor")

TaskFactory = Callable[[], Awaitable[None]]
GiveUp = Callable[[str, str], None]  # (task name, its last error)


class SupervisorConfig(Section, frozen=True):
    """How hard to try before giving a task up."""

    max_restarts: Annotated[int, Meta(ge=0)] = 5  # ends within window_s before the daemon gives up
    window_s: Annotated[float, Meta(gt=0.0)] = 300.0
    backoff_s: Annotated[float, Meta(ge=0.0)] = 1.0  # before the first restart; doubles
    backoff_max_s: Annotated[float, Meta(ge=0.0)] = 30.0
    healthy_after_s: Annotated[float, Meta(ge=0.0)] = 60.0  # a run this long resets the backoff


class Supervisor:
    """Starts named tasks and keeps them running (see the module docstring)."""

    def __init__(
        self,
        on_give_up: GiveUp,
        config: SupervisorConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config or SupervisorConfig()
        self._on_give_up = on_give_up
        self._clock = clock
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._status: dict[str, TaskStatus] = {}
        self._stopping = False

    def spawn(self, name: str, factory: TaskFactory) -> None:
        """Run `factory()` as the task `name`, restarting it whenever it ends unexpectedly."""
        if name in self._tasks:
            raise ValueError(f"a task named {name!r} is already supervised")
        self._status[name] = TaskStatus()
        self._tasks[name] = asyncio.create_task(self._supervise(name, factory), name=name)

    def status(self) -> dict[str, TaskStatus]:
        """Every task's state (copies: the caller may keep them)."""
        return {name: msgspec.structs.replace(s) for name, s in self._status.items()}

    @property
    def gave_up(self) -> list[str]:
        """The tasks that were given up on."""
        return [name for name, s in self._status.items() if s.gave_up]

    def stopping(self) -> None:
        """From now on a task that ends is expected to (the service is shutting down)."""
        self._stopping = True

    async def stop(self) -> None:
        """Cancel every task and wait for them."""
        self._stopping = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _supervise(self, name: str, factory: TaskFactory) -> None:
        state = self._status[name]
        ends: collections.deque[float] = collections.deque()
        delay = self.config.backoff_s
        while True:
            started = self._clock()
            state.running = True
            try:
                error = await self._run_once(name, factory)
            finally:
                state.running = False
            if self._stopping:  # ending is what it was asked to do (an error is logged already)
                return
            now = self._clock()
            state.last_error = error
            state.last_error_at = _utc_now()
            if now - started >= self.config.healthy_after_s:
                delay = self.config.backoff_s
            ends.append(now)
            while ends and ends[0] < now - self.config.window_s:
                ends.popleft()
            if len(ends) > self.config.max_restarts:
                state.gave_up = True
                log.critical(
                    "background task keeps failing; giving up",
                    task=name,
                    error=error,
                    ends_in_window=len(ends),
                    window_s=self.config.window_s,
                )
                self._on_give_up(name, error)
                return
            log.error(
                "background task ended unexpectedly; restarting", task=name, error=error, retry_in_s=delay
            )
            await asyncio.sleep(delay)
            delay = min(max(delay * 2, self.config.backoff_s), self.config.backoff_max_s)
            if self._shutting_down():  # asked while it slept
                return
            state.restarts += 1

    def _shutting_down(self) -> bool:
        return self._stopping

    async def _run_once(self, name: str, factory: TaskFactory) -> str:
        """Run the task once; why it ended. Cancelling the supervising task cancels it for good."""
        try:
            await factory()
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
            return "cancelled from within"  # e.g. a future it awaited was cancelled by someone else
        except Exception as exc:  # whatever ended it is reported, never swallowed
            log.exception("background task failed", task=name)
            return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return "returned"


def _utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
