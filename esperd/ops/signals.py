"""What SIGTERM, SIGINT and SIGHUP mean to esperd at every stage of its life.

A stop signal (SIGTERM, SIGINT) asks for a clean stop and never kills the process outright:
not while torch is still being imported, not during start-up or while the broker is
unreachable, not after the event loop has closed. So SIGTERM before READY, or twice in a row,
ends in exit 0. SIGHUP asks for a reload; one that arrives before the service runs is applied
once it does.

Python-level handlers cover the time before and after the event loop (they only record);
while the loop runs, asyncio's handlers wake it and call the service.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
RELOAD_SIGNAL = signal.SIGHUP
HANDLED = (*STOP_SIGNALS, RELOAD_SIGNAL)


class Signals:
    """Records stop and reload requests, and hands them to the service once one is routed."""

    def __init__(self) -> None:
        self.stop_requested = False
        self._reload_pending = False
        self._on_stop: Callable[[], None] | None = None
        self._on_reload: Callable[[], None] | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        """Take the signals over in Python (main thread; call it before anything slow)."""
        for sig in HANDLED:
            self._previous[sig] = signal.signal(sig, self._python_handler)

    def restore(self) -> None:
        """Give the signals back as they were (for commands other than the daemon); a stop signal
        that came meanwhile is raised again, to act as it would have."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self.stop_requested:
            signal.raise_signal(signal.SIGTERM)

    def ignore_from_now_on(self) -> None:
        """The daemon has stopped and the process is exiting: ignore the signals. (Python resets
        its own handlers to the defaults while it finalizes, which takes a while with torch
        loaded; a second SIGTERM then would kill the process.)"""
        for sig in HANDLED:
            signal.signal(sig, signal.SIG_IGN)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Handle the signals on `loop` from now on (a Python handler would not wake it)."""
        for sig in HANDLED:
            loop.add_signal_handler(sig, self._on_signal, sig)

    def detach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Back to the Python handlers, before the loop closes (closing it restores the defaults,
        and a SIGTERM in that gap would kill the process). Signals are blocked meanwhile."""
        self._on_stop = self._on_reload = None
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
        try:
            for sig in HANDLED:
                loop.remove_signal_handler(sig)
                signal.signal(sig, self._python_handler)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def route(self, on_stop: Callable[[], None], on_reload: Callable[[], None]) -> None:
        """Deliver signals to these (on the loop); a stop or reload recorded earlier is delivered now."""
        self._on_stop, self._on_reload = on_stop, on_reload
        if self.stop_requested:
            on_stop()
        if self._reload_pending:
            self._reload_pending = False
            on_reload()

    def _on_signal(self, sig: int) -> None:
        if sig == RELOAD_SIGNAL:
            if self._on_reload is not None:
                self._on_reload()
            else:
                self._reload_pending = True
            return
        self.stop_requested = True
        if self._on_stop is not None:
            self._on_stop()

    def _python_handler(self, signum: int, frame: FrameType | None) -> None:
        # Record only: this may interrupt any bytecode of the main thread.
        if signum == RELOAD_SIGNAL:
            self._reload_pending = True
        else:
            self.stop_requested = True
