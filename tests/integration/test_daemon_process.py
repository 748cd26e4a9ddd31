"""esperd as a real process: `esperd --config FILE`, embedded broker, SIGTERM."""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import nats
import pytest

from esperd.ops.natsserver import NatsServer, free_port
from tests.integration.helpers import wait_for_status

ESPERD = [sys.executable, "-m", "esperd.cli"]


def write_config(path: Path, body: str) -> Path:
    path.write_text(body, encoding="utf-8")
    return path


def start_esperd(config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*ESPERD, "--config", str(config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


async def connect_when_up(url: str, timeout: float = 15.0) -> nats.aio.client.Client:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            return await nats.connect(url, connect_timeout=1, max_reconnect_attempts=0, allow_reconnect=False)
        except Exception:  # noqa: BLE001 - broker not up yet
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.1)


def stop_with_sigterm(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out.decode(errors="replace")


async def test_process_serves_and_exits_zero_on_sigterm(nats_server: NatsServer, tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "esperd.toml",
        f"""
[nats]
servers = ["{nats_server.url}"]
[service]
state_dir = "{tmp_path / "state"}"
drain_timeout_s = 5.0
""",
    )
    proc = start_esperd(config)
    try:
        nc = await connect_when_up(nats_server.url)
        up = await wait_for_status(nc, lambda s: "version" in s, timeout=20)
        assert up.get("version"), "daemon never answered esperd.status"
        # A `nats pub` of the DESIGN.md example: raw JSON bytes, no headers.
        await nc.publish("esper.cli.health", b'{"kind":"health","layer_id":3,"health_score":0.2}')
        await nc.publish("esper.cli.health", b"not json, not msgpack")
        st = await wait_for_status(nc, lambda s: s["accepted_total"] + s["rejected_total"] >= 2)
        await nc.close()
    finally:
        code, output = stop_with_sigterm(proc)
    assert st["accepted_total"] == 1 and st["rejected_total"] == 1
    assert code == 0, output
    assert "esperd stopped" in output
    assert '"level": "info"' in output  # not a TTY: JSON log lines


async def test_embedded_broker_starts_and_stops_with_the_daemon(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(
        tmp_path / "esperd.toml",
        f"""
[nats]
servers = ["nats://127.0.0.1:{port}"]
embedded = true
embedded_port = {port}
[service]
state_dir = "{tmp_path / "state"}"
drain_timeout_s = 5.0
""",
    )
    proc = start_esperd(config)
    try:
        nc = await connect_when_up(f"nats://127.0.0.1:{port}", timeout=20)
        st = await wait_for_status(nc, lambda s: "version" in s, timeout=20)
        await nc.close()
    finally:
        code, output = stop_with_sigterm(proc)
    assert st.get("nats", {}).get("connected") is True
    assert code == 0, output
    assert (tmp_path / "state" / "jetstream").is_dir()
    with pytest.raises(OSError):  # the embedded broker is gone with the daemon
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_check_config_accepts_the_example_and_names_bad_keys(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "esperd.toml"
    ok = subprocess.run([*ESPERD, "check-config", str(example)], capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    assert '"embedded": true' in ok.stdout

    bad = write_config(tmp_path / "bad.toml", '[nats]\nembedded_port = "lots"\n')
    res = subprocess.run([*ESPERD, "check-config", str(bad)], capture_output=True, text=True, timeout=30)
    assert res.returncode == 2
    assert "nats.embedded_port" in res.stderr and "'lots'" in res.stderr

    typo = write_config(tmp_path / "typo.toml", "[limits]\nmax_nodez = 3\n")
    res = subprocess.run([*ESPERD, "--config", str(typo)], capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "limits.max_nodez" in res.stderr


def test_console_script_is_installed() -> None:
    exe = shutil.which("esperd", path=str(Path(sys.executable).parent))
    assert exe is not None
    res = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0 and res.stdout.startswith("esperd ")
