"""NatsServer: a real nats-server child process on a loopback port."""

from __future__ import annotations

import gc
import os
import socket
import subprocess
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from esperd.ops.natsserver import NatsServer, NatsServerError, find_nats_server, free_port

pytestmark = pytest.mark.integration  # every test here runs a real nats-server


def answers_info(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            return sock.recv(4).startswith(b"INFO")
    except OSError:
        return False


def wait_closed(port: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not answers_info(port):
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def servers() -> Iterator[list[NatsServer]]:
    """Servers a test starts; all stopped at the end, whatever happened."""
    made: list[NatsServer] = []
    yield made
    for server in made:
        server.kill()


def make(servers: list[NatsServer], **kwargs: object) -> NatsServer:
    server = NatsServer(**kwargs)  # type: ignore[arg-type]
    servers.append(server)
    return server


def test_find_nats_server_returns_an_executable() -> None:
    path = find_nats_server()
    assert os.path.isfile(path)
    assert os.access(path, os.X_OK)
    out = subprocess.run([path, "--version"], check=False, capture_output=True, text=True, timeout=10)
    assert out.returncode == 0
    assert "nats-server" in (out.stdout + out.stderr)


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 0 < port < 65536
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_start_and_stop_on_a_free_port(servers: list[NatsServer], tmp_path: Path) -> None:
    port = free_port()
    server = make(servers, port=port, work_dir=tmp_path)
    assert server.port == port
    assert server.url == f"nats://127.0.0.1:{port}"
    assert not server.running
    assert not answers_info(port)
    server.start()
    assert server.running
    assert answers_info(port)
    assert (tmp_path / "nats-server.log").exists()
    server.stop()
    assert not server.running
    assert wait_closed(port)
    server.stop()  # stopping twice is harmless
    assert not server.running


def test_port_zero_picks_a_free_port(servers: list[NatsServer], tmp_path: Path) -> None:
    server = make(servers, work_dir=tmp_path)
    assert server.port > 0
    server.start()
    assert answers_info(server.port)


async def test_clients_can_talk_through_it(servers: list[NatsServer], tmp_path: Path) -> None:
    server = make(servers, work_dir=tmp_path)
    server.start()
    nc = await nats.connect(server.url)
    try:
        sub = await nc.subscribe("t.x")
        await nc.publish("t.x", b"ping")
        msg = await sub.next_msg(timeout=2)
        assert msg.data == b"ping"
    finally:
        await nc.close()


def test_start_twice_is_idempotent(servers: list[NatsServer], tmp_path: Path) -> None:
    server = make(servers, work_dir=tmp_path)
    server.start()
    proc = server._proc
    server.start()
    assert server._proc is proc
    assert server.running


def test_kill_takes_it_down(servers: list[NatsServer], tmp_path: Path) -> None:
    server = make(servers, work_dir=tmp_path)
    server.start()
    proc = server._proc
    assert proc is not None
    server.kill()
    assert not server.running
    assert proc.returncode == -9
    assert wait_closed(server.port)
    server.kill()  # killing twice is harmless
    assert not server.running


def test_stop_is_graceful(servers: list[NatsServer], tmp_path: Path) -> None:
    server = make(servers, work_dir=tmp_path)
    server.start()
    proc = server._proc
    assert proc is not None
    server.stop()
    assert proc.returncode is not None and proc.returncode != -9


def test_restart_on_the_same_port(servers: list[NatsServer], tmp_path: Path) -> None:
    server = make(servers, work_dir=tmp_path)
    server.start()
    port = server.port
    server.stop()
    assert wait_closed(port)
    server.start()
    assert server.running and server.port == port and answers_info(port)
    server.kill()
    assert wait_closed(port)
    server.start()
    assert server.running and server.port == port and answers_info(port)


def test_jetstream_store_dir(servers: list[NatsServer], tmp_path: Path) -> None:
    store = tmp_path / "js"
    server = make(servers, store_dir=store)
    server.start()
    assert server.running
    assert store.is_dir()
    assert (store / "nats-server.log").exists()  # the store dir doubles as the work dir


def test_context_manager(tmp_path: Path) -> None:
    with NatsServer(work_dir=tmp_path) as server:
        assert server.running
        port = server.port
        assert answers_info(port)
    assert not server.running
    assert wait_closed(port)


def test_config_text_without_work_dir_raises(servers: list[NatsServer]) -> None:
    server = make(servers, config_text="max_payload: 1MB\n")
    with pytest.raises(NatsServerError, match="work_dir"):
        server.start()
    assert not server.running


def test_config_text_is_used(servers: list[NatsServer], tmp_path: Path) -> None:
    server = make(servers, work_dir=tmp_path, config_text="max_payload: 2048\n")
    server.start()
    assert (tmp_path / "nats-server.conf").read_text() == "max_payload: 2048\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=2) as sock:
        info = sock.recv(4096)
    assert b'"max_payload":2048' in info


def test_max_payload_is_what_the_server_announces(servers: list[NatsServer], tmp_path: Path) -> None:
    server = make(servers, work_dir=tmp_path, max_payload=3 * 1024 * 1024)
    server.start()
    with socket.create_connection(("127.0.0.1", server.port), timeout=2) as sock:
        info = sock.recv(4096)
    assert b'"max_payload":3145728' in info


def test_bad_config_text_raises_with_log_tail(servers: list[NatsServer], tmp_path: Path) -> None:
    server = make(servers, work_dir=tmp_path, config_text="this is { not ][ a config\n")
    started = time.monotonic()
    with pytest.raises(NatsServerError) as info:
        server.start(timeout=10.0)
    assert time.monotonic() - started < 5.0  # noticed the exit, did not wait for the timeout
    message = str(info.value)
    assert "exited" in message
    log_text = (tmp_path / "nats-server.log").read_text()
    assert log_text.strip()
    assert log_text.strip().splitlines()[-1] in message  # the tail of the broker's log
    assert not server.running


def test_port_already_taken_by_another_server_is_an_error(servers: list[NatsServer], tmp_path: Path) -> None:
    first = make(servers, work_dir=tmp_path / "first")
    first.start()
    second = make(servers, port=first.port, work_dir=tmp_path / "second")
    # The second process cannot bind: start() must not mistake the first one's INFO for its own.
    with pytest.raises(NatsServerError):
        second.start(timeout=5.0)
    assert not second.running
    assert first.running


def test_start_does_not_leak_the_log_file(servers: list[NatsServer], tmp_path: Path) -> None:
    server = make(servers, work_dir=tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        server.start()
        server.stop()
        gc.collect()
    leaks = [
        w for w in caught if issubclass(w.category, ResourceWarning) and "nats-server.log" in str(w.message)
    ]
    assert leaks == []
