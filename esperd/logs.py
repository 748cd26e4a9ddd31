"""structlog setup: a console renderer on a TTY, JSON lines otherwise."""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

import structlog


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Configure structlog (and route stdlib logging, e.g. nats-py's, through the same level)."""
    stream = stream or sys.stderr
    use_console = fmt == "console" or (fmt == "auto" and stream.isatty())
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer() if use_console else structlog.processors.JSONRenderer()
    )
    numeric = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=numeric, stream=stream, format="%(levelname)s %(name)s: %(message)s")


class RateLimiter:
    """Allows one event per key per window and counts the ones it held back."""

    def __init__(self, window_s: float, clock: type[time.monotonic] | None = None) -> None:
        self.window_s = window_s
        self._clock = clock or time.monotonic
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def allow(self, key: str) -> tuple[bool, int]:
        """(allowed, how many were suppressed since the last allowed one)."""
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self.window_s:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False, 0
        self._last[key] = now
        return True, self._suppressed.pop(key, 0)
