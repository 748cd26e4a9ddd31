"""Signals and exit codes, each caused for real on `esperd --config FILE` as a process.

- SIGTERM while torch is still being imported, while the broker is unreachable at start, and
  twice 50 ms apart: exit 0 (before: -15, 1 and -15).
- A port taken by another process (the embedded broker's): exit 69 with a one-line error.
- An unusable state_dir (a file in its place, a path below a file): exit 73, one line.
- `esperd check-config` refuses a malformed server URL (2) and an unusable state_dir (73).
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from esperd.ops.natsserver import NatsServer, free_port
from tests.integration.test_faults import REPO, config_dict, write_config

ESPERD = [sys.executable, "-m", "esperd.cli"]
TIMEOUT_S = 90.0  # start-up imports torch: ~5-10 s on a loaded 2-core machine

pytestmark = pytest.mark.timeout(240)


class Daemon:
    """esperd as a child process; its output (JSON log lines and stderr) read line by line."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(
            argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        self.lines: list[str] = []

    def wait_for(self, text: str, timeout: float = TIMEOUT_S) -> None:
        """Read output until a line contains `text`."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                pytest.fail(f"esperd exited ({self.proc.wait()}) before {text!r}:\n{self.output()}")
            self.lines.append(line)
            if text in line:
                return
        pytest.fail(f"no {text!r} within {timeout}s:\n{self.output()}")

    def finish(self, timeout: float = TIMEOUT_S) -> int:
        try:
            rest, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rest, _ = self.proc.communicate()
            self.lines.append(rest)
            pytest.fail(f"esperd still running after {timeout}s:\n{self.output()}")
        self.lines.append(rest)
        return self.proc.returncode

    def output(self) -> str:
        return "".join(self.lines)

    def events(self) -> list[dict[str, object]]:
        found = []
        for line in self.output().splitlines():
            if line.startswith("{"):
                event = json.loads(line)
                if isinstance(event, dict):
                    found.append(event)
        return found


def start(config: Path) -> Daemon:
    return Daemon([*ESPERD, "--config", str(config)])


def plain_config(tmp_path: Path, url: str, **sections: dict[str, object]) -> Path:
    return write_config(tmp_path / "esperd.toml", config_dict(url, tmp_path / "state", **sections))


def assert_one_line_error(daemon: Daemon, code: int, *fragments: str) -> None:
    out = daemon.output()
    assert "Traceback" not in out, out
    errors = [e for e in daemon.events() if e.get("event") == "could not start"]
    assert len(errors) == 1, out
    assert errors[0]["exit_code"] == code and errors[0]["level"] == "error"
    for fragment in fragments:
        assert fragment in str(errors[0]["error"]), errors[0]
    assert "\n" not in str(errors[0]["error"])


# ------------------------------------------------------------------ SIGTERM: always a clean exit 0


def test_sigterm_while_still_importing_exits_zero(nats_server: NatsServer, tmp_path: Path) -> None:
    daemon = start(plain_config(tmp_path, nats_server.url))
    time.sleep(0.5)  # torch takes seconds to import: this lands long before READY
    assert daemon.proc.poll() is None
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.finish() == 0, daemon.output()
    assert "esperd ready" not in daemon.output()


def test_sigterm_while_the_broker_is_unreachable_at_start_exits_zero(tmp_path: Path) -> None:
    nobody = f"nats://127.0.0.1:{free_port()}"
    daemon = start(plain_config(tmp_path, nobody))
    daemon.wait_for('"NATS error"')  # retrying, un-READY
    daemon.wait_for('"NATS error"')
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.finish() == 0, daemon.output()
    out = daemon.output()
    assert "esperd ready" not in out and "stopped before NATS was reachable" in out
    assert "Traceback" not in out


def test_two_sigterms_50ms_apart_exit_zero(nats_server: NatsServer, tmp_path: Path) -> None:
    daemon = start(plain_config(tmp_path, nats_server.url))
    daemon.wait_for("esperd ready")
    daemon.proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.finish() == 0, daemon.output()
    assert "esperd stopped" in daemon.output()


def test_sigterm_during_the_learners_start_exits_zero(nats_server: NatsServer, tmp_path: Path) -> None:
    """Between the imports and READY: the policy is built and the learner's worker process spawned."""
    learner = {"algorithm": "ppo", "ppo": {"rollout_size": 16, "minibatch_size": 8}}
    daemon = start(plain_config(tmp_path, nats_server.url, policy={"name": "gnn"}, learner=learner))
    children = Path(f"/proc/{daemon.proc.pid}/task/{daemon.proc.pid}/children")
    deadline = time.monotonic() + TIMEOUT_S
    while not children.read_text().split():  # the learner's worker process is being spawned
        assert time.monotonic() < deadline and daemon.proc.poll() is None, "no worker process"
        time.sleep(0.01)
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.finish() == 0, daemon.output()


# ------------------------------------------------------------------ unusable resources: one line, a code


def test_embedded_port_taken_by_another_process_exits_69(tmp_path: Path) -> None:
    port = free_port()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import socket, sys, time\n"
                f"s = socket.socket(); s.bind(('127.0.0.1', {port})); s.listen()\n"
                "print('listening', flush=True); time.sleep(120)"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "listening"
        config = plain_config(
            tmp_path,
            f"nats://127.0.0.1:{port}",
            nats={"embedded": True, "embedded_port": port},
        )
        daemon = start(config)
        assert daemon.finish() == 69, daemon.output()
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()  # type: ignore[union-attr]
    assert_one_line_error(daemon, 69, f"127.0.0.1:{port}", "already in use")


def test_embedded_port_taken_by_another_nats_server_exits_69(nats_server: NatsServer, tmp_path: Path) -> None:
    config = plain_config(
        tmp_path, nats_server.url, nats={"embedded": True, "embedded_port": nats_server.port}
    )
    daemon = start(config)
    assert daemon.finish() == 69, daemon.output()
    assert_one_line_error(daemon, 69, f"{nats_server.port}", "another NATS server")
    with socket.create_connection(("127.0.0.1", nats_server.port), timeout=2) as sock:
        assert sock.recv(4) == b"INFO"  # the other server is untouched


@pytest.mark.parametrize("where", ["file", "below-a-file"])
def test_unusable_state_dir_exits_73(nats_server: NatsServer, tmp_path: Path, where: str) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory\n")
    state_dir = blocker if where == "file" else blocker / "state"
    raw = config_dict(nats_server.url, state_dir)
    daemon = start(write_config(tmp_path / "esperd.toml", raw))
    assert daemon.finish() == 73, daemon.output()
    assert_one_line_error(daemon, 73, str(state_dir))
    assert "esperd ready" not in daemon.output()


# ------------------------------------------------------------------ check-config


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*ESPERD, "check-config", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


@pytest.mark.parametrize(
    "url", ["nats//127.0.0.1:4222", "http://127.0.0.1:4222", "nats://127.0.0.1:42x2", "nats://:4222"]
)
def test_check_config_refuses_a_malformed_server_url(tmp_path: Path, url: str) -> None:
    path = tmp_path / "esperd.toml"
    path.write_text(f'[nats]\nservers = ["{url}"]\n[service]\nstate_dir = "{tmp_path / "state"}"\n')
    res = check_config(path)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "`nats.servers`" in res.stderr and url in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr


def test_check_config_refuses_an_unusable_state_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory\n")
    for state_dir in (blocker, blocker / "state"):
        path = tmp_path / "esperd.toml"
        path.write_text(f'[service]\nstate_dir = "{state_dir}"\n')
        res = check_config(path)
        assert res.returncode == 73, res.stdout + res.stderr
        assert str(state_dir) in res.stderr and "not a directory" in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1
    usable = tmp_path / "esperd.toml"
    usable.write_text(f'[service]\nstate_dir = "{tmp_path / "new" / "state"}"\n')
    res = check_config(usable)
    assert res.returncode == 0, res.stderr
    assert not (tmp_path / "new").exists()  # checked, not created
