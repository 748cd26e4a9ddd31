"""sd_notify for running under systemd, without libsystemd.

systemd passes ``NOTIFY_SOCKET`` (a filesystem path, or an abstract-namespace
name written with a leading ``@``) to ``Type=notify`` services; each
notification is one datagram of newline-separated ``KEY=VALUE`` lines. When the
variable is unset (a terminal, a test, a container) every call is a no-op.

The watchdog ping is meant to come from the event loop itself
(:meth:`SystemdNotifier.run_watchdog` as a task): if the loop is blocked the
pings stop and systemd restarts the service, which is the point.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Mapping

import structlog

__all__ = ["SystemdNotifier"]

_log = structlog.get_logger(__name__)


class SystemdNotifier:
    """Send sd_notify messages to the socket named by ``NOTIFY_SOCKET``.

    ``env`` defaults to :data:`os.environ`; it is read once, at construction.
    No method raises on a send failure: failures are logged and reported as
    ``False``, because a lost notification must never take the daemon down.
    """

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self._env: Mapping[str, str] = os.environ if env is None else env
        self._address: str | bytes | None = self._parse_address(self._env.get("NOTIFY_SOCKET", ""))
        self._sock: socket.socket | None = None

    @staticmethod
    def _parse_address(raw: str) -> str | bytes | None:
        """Map ``NOTIFY_SOCKET`` to a sendto() address, or None if unusable."""
        if not raw:
            return None
        if raw.startswith("@"):
            # Abstract namespace: the leading '@' stands for a NUL byte.
            return b"\0" + raw[1:].encode()
        if raw.startswith("/"):
            return raw
        # e.g. "vsock:..." (systemd >= 253 in VMs): not something we speak.
        _log.warning("sd_notify.unsupported_socket", notify_socket=raw)
        return None

    @property
    def enabled(self) -> bool:
        """True when there is a notification socket to talk to."""
        return self._address is not None

    def notify(self, *fields: str) -> bool:
        """Send one datagram made of ``KEY=VALUE`` fields; True if it was sent."""
        if self._address is None or not fields:
            return False
        payload = "\n".join(fields).encode()
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # Never block the event loop on a full receive queue: drop instead.
                sock.setblocking(False)
                self._sock = sock
            self._sock.sendto(payload, self._address)
        except OSError as exc:
            _log.warning("sd_notify.send_failed", fields=list(fields), error=repr(exc))
            return False
        return True

    def ready(self) -> bool:
        """Tell systemd start-up is complete (``READY=1``)."""
        return self.notify("READY=1")

    def stopping(self) -> bool:
        """Tell systemd a graceful shutdown has begun (``STOPPING=1``)."""
        return self.notify("STOPPING=1")

    def status(self, text: str) -> bool:
        """Set the one-line status shown by ``systemctl status``."""
        # A newline would end the STATUS field and start a bogus one.
        return self.notify("STATUS=" + " ".join(text.splitlines()))

    def watchdog(self) -> bool:
        """Ping the service watchdog (``WATCHDOG=1``)."""
        return self.notify("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """Seconds between pings (half of ``WATCHDOG_USEC``), or None if no watchdog.

        None too when ``WATCHDOG_PID`` names another process: the watchdog is
        then not ours to feed (e.g. the variable was inherited by a child).
        """
        pid = self._env.get("WATCHDOG_PID")
        if pid:
            try:
                if int(pid) != os.getpid():
                    return None
            except ValueError:
                return None
        raw = self._env.get("WATCHDOG_USEC")
        if not raw:
            return None
        try:
            usec = int(raw)
        except ValueError:
            _log.warning("sd_notify.bad_watchdog_usec", watchdog_usec=raw)
            return None
        if usec <= 0:
            return None
        return usec / 2 / 1_000_000

    async def run_watchdog(self) -> None:
        """Ping the watchdog every :meth:`watchdog_interval` seconds until cancelled.

        Returns at once when there is no watchdog or no socket. Run it as a task
        on the daemon's own loop so that a stalled loop starves the watchdog.
        """
        interval = self.watchdog_interval()
        if interval is None or not self.enabled:
            return
        while True:
            self.watchdog()
            await asyncio.sleep(interval)

    watchdog_loop = run_watchdog

    def close(self) -> None:
        """Close the sending socket (a later send reopens it)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
