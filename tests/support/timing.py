"""Time in tests: a clock the test moves by hand, and a poll that fails saying what it waited for."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class FakeClock:
    """A monotonic clock for code that takes `clock=`: reads `now`, moved only by the test."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def until(
    predicate: Callable[[], object], timeout: float = 10.0, what: str = "the condition", every: float = 0.01
) -> None:
    """Poll `predicate` every `every` seconds until it is true; fail after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(every)
