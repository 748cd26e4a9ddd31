"""structlog setup: a console renderer on a TTY, JSON lines otherwise."""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO, cast

import structlog


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> LogLevel:
    """Configure structlog (and route stdlib logging, e.g. nats-py's, through the same level).

    Returns the level's control: `set` changes it while running (a SIGHUP reload does).
    """
    stream = stream if stream is not None else cast(TextIO, _CurrentStderr())
    use_console = fmt == "console" or (fmt == "auto" and stream.isatty())
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer() if use_console else structlog.processors.JSONRenderer()
    )
    threshold = LogLevel(level)
    structlog.configure(
        processors=[
            threshold,  # first: a dropped event costs nothing more
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        # Every method active; `threshold` drops what is below the level. A level baked into the
        # logger class could not change later: loggers are cached on first use.
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=threshold.numeric, stream=stream, format="%(levelname)s %(name)s: %(message)s")
    return threshold


class _CurrentStderr:
    """Writes to whatever `sys.stderr` is at the time of the write. A logger bound to the object
    that was stderr at configuration time would write into a closed file once that object is
    replaced and closed (an embedding program's capture, a test runner's)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


class LogLevel:
    """A structlog processor that drops events below a level that can change at run time."""

    def __init__(self, level: str) -> None:
        self.numeric = logging.DEBUG
        self.set(level)

    def set(self, level: str) -> None:
        """Log `level` and above from now on (stdlib loggers too); KeyError for an unknown level."""
        self.numeric = logging.getLevelNamesMapping()[level.upper()]
        logging.getLogger().setLevel(self.numeric)

    def __call__(
        self, logger: object, method_name: str, event_dict: structlog.typing.EventDict
    ) -> structlog.typing.EventDict:
        if _METHOD_LEVELS.get(method_name, logging.INFO) < self.numeric:
            raise structlog.DropEvent
        return event_dict


_METHOD_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "msg": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "exception": logging.ERROR,
    "critical": logging.CRITICAL,
    "fatal": logging.CRITICAL,
}


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
