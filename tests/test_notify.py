"""Tests for esperd.ops.notify against real AF_UNIX datagram sockets."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from esperd.ops.notify import SystemdNotifier


@pytest.fixture
def receiver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket standing in for systemd's notify socket."""
    # A short directory name: sun_path is limited to 108 bytes.
    path = tmp_path_factory.mktemp("sd") / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2.0)
    yield sock, str(path)
    sock.close()


def _drain(sock: socket.socket) -> list[bytes]:
    """Everything queued on ``sock`` right now, without waiting."""
    out: list[bytes] = []
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(4096))
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(2.0)
    return out


def test_messages_arrive_exactly(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    n = SystemdNotifier({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready()
    assert sock.recv(4096) == b"READY=1"
    assert n.status("draining 3 requests")
    assert sock.recv(4096) == b"STATUS=draining 3 requests"
    assert n.stopping()
    assert sock.recv(4096) == b"STOPPING=1"
    assert n.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    n.close()


def test_status_newlines_are_flattened(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    n = SystemdNotifier({"NOTIFY_SOCKET": path})
    n.status("line one\nREADY=1")
    assert sock.recv(4096) == b"STATUS=line one READY=1"
    n.close()


def test_abstract_namespace_socket() -> None:
    name = f"esperd-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(2.0)
    try:
        n = SystemdNotifier({"NOTIFY_SOCKET": "@" + name})
        assert n.ready()
        assert sock.recv(4096) == b"READY=1"
        n.close()
    finally:
        sock.close()


def test_noop_when_unset() -> None:
    n = SystemdNotifier({})
    assert not n.enabled
    assert n.ready() is False
    assert n.stopping() is False
    assert n.status("x") is False
    assert n.watchdog() is False
    assert n.watchdog_interval() is None


def test_unsupported_socket_kind_is_noop() -> None:
    n = SystemdNotifier({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not n.enabled
    assert n.ready() is False


def test_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not SystemdNotifier().enabled
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/notify.sock")
    assert SystemdNotifier().enabled


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "100000"}, 0.05),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "junk"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "abc"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    n = SystemdNotifier({"NOTIFY_SOCKET": "/nonexistent/notify.sock", **env})
    assert n.watchdog_interval() == expected


async def test_watchdog_loop_pings_and_stops_on_cancel(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    n = SystemdNotifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"})  # ping every 50 ms
    task = asyncio.create_task(n.run_watchdog())
    await asyncio.sleep(0.3)
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    pings = _drain(sock)
    assert len(pings) >= 3
    assert set(pings) == {b"WATCHDOG=1"}
    # Cancelled means no more pings.
    await asyncio.sleep(0.15)
    assert _drain(sock) == []
    n.close()


async def test_watchdog_loop_alias_and_noop_without_watchdog(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    n = SystemdNotifier({"NOTIFY_SOCKET": path})
    # No WATCHDOG_USEC: returns at once and sends nothing.
    await asyncio.wait_for(n.watchdog_loop(), timeout=1.0)
    assert _drain(sock) == []
    # Watchdog set but no socket: also returns at once.
    await asyncio.wait_for(SystemdNotifier({"WATCHDOG_USEC": "100000"}).run_watchdog(), timeout=1.0)


def test_send_to_vanished_socket_does_not_raise(tmp_path: Path) -> None:
    path = tmp_path / "gone.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    n = SystemdNotifier({"NOTIFY_SOCKET": str(path)})
    assert n.ready()
    sock.close()
    path.unlink()
    assert n.ready() is False
    assert n.status("still alive") is False
    assert n.watchdog() is False
    n.close()


async def test_watchdog_loop_survives_vanished_socket(tmp_path: Path) -> None:
    n = SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "never.sock"), "WATCHDOG_USEC": "100000"})
    task = asyncio.create_task(n.run_watchdog())
    await asyncio.sleep(0.15)
    assert not task.done()  # send errors were swallowed, the loop keeps going
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    n.close()
