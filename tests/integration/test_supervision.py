"""Nothing the daemon runs stops silently: `esperd --config FILE` as a process on a real nats-server.

1. `<state_dir>/learner` is a regular file (unwritable for root too): every periodic checkpoint
   fails. The failures are logged and counted in status, retried with backoff, and learning
   goes on (updates and the serving version keep rising). Once the file is removed, the next
   retry saves. (Before: the first failure ended the learner task, silently, for good.)
2. A background task that keeps failing (a bug injected into the housekeeping pass, the one
   fault here that cannot be caused from outside) is restarted with backoff and shown in status
   (`tasks`), then given up on: esperd stops cleanly and exits 70 so that systemd restarts it.
3. The embedded nats-server, SIGKILLed under esperd: started again on its port, the daemon
   reconnects by itself and serves; status says what happened (`tasks.embedded-broker`).
   (Before: esperd retried a dead broker forever.)
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client

from esperd.ops.natsserver import NatsServer, free_port
from tests.integration.test_faults import (
    GNN,
    PPO_FAST,
    START_TIMEOUT_S,
    Esperd,
    config_dict,
    esperd_process,
    ready,
    sim_hosts,
    wait_status,
    write_config,
)

pytestmark = pytest.mark.timeout(300)


def learner_of(s: dict[str, Any]) -> dict[str, Any]:
    return s.get("learner") or {}


async def test_unwritable_learner_dir_is_reported_retried_and_learning_goes_on(
    nats_server: NatsServer, nats_client: Client, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    blocker = state / "learner"
    blocker.write_text("a file where the learner's checkpoint directory should be\n")
    raw = config_dict(
        nats_server.url,
        state,
        policy=GNN,
        learner={"algorithm": "ppo", "checkpoint_interval_s": 1.0, "ppo": PPO_FAST},
    )
    config = write_config(tmp_path / "esperd.toml", raw)
    async with esperd_process(config, tmp_path / "esperd.log") as daemon:
        await wait_status(nats_client, daemon, ready, START_TIMEOUT_S, "esperd ready")
        async with sim_hosts(nats_server.url, 4, epoch_s=0.05):
            first = await wait_status(
                nats_client,
                daemon,
                lambda s: learner_of(s).get("checkpoint_failures", 0) >= 1 and learner_of(s)["updates"] >= 1,
                120,
                "a failed checkpoint after an update",
            )
            later = await wait_status(
                nats_client,
                daemon,
                lambda s: (
                    learner_of(s)["checkpoint_failures"] >= first["learner"]["checkpoint_failures"] + 2
                    and learner_of(s)["updates"] >= first["learner"]["updates"] + 3
                    and s["policy"]["version"] >= first["policy"]["version"] + 3
                ),
                120,
                "learning going on through repeated checkpoint failures",
            )
            blocker.unlink()  # the operator fixes it; the next retry saves
            saved = await wait_status(
                nats_client,
                daemon,
                lambda s: learner_of(s)["checkpoints"] >= 1,
                60,
                "a checkpoint once the directory is usable",
            )
        code = daemon.sigterm()

    assert code == 0, daemon.tail()
    learner = later["learner"]
    assert (
        "File exists" in learner["last_checkpoint_error"] and str(blocker) in learner["last_checkpoint_error"]
    )
    assert learner["last_checkpoint_error_at"] and learner["checkpoint_retry_in_s"] > 0
    assert learner["checkpoints"] == 0 and learner["breaker"] == "closed"
    tasks = later["tasks"]
    assert tasks["learner"]["running"] and tasks["learner"]["restarts"] == 0  # it never ended
    assert saved["learner"]["checkpoint_retry_in_s"] == 0.0
    failures = daemon.events("learner checkpoint failed; learning goes on, retrying")
    assert len(failures) >= 3 and failures[0]["level"] == "error"
    assert (state / "learner" / "policy.safetensors").is_file()


# Runs esperd exactly as `esperd --config FILE` does, with one bug injected: every housekeeping
# pass raises. The restart budget is shortened so that the test sees it spent within seconds.
BUGGY_HOUSEKEEPING = """
import sys
import esperd.service
from esperd.ops.supervisor import Supervisor, SupervisorConfig

def buggy_housekeeping(self):
    raise RuntimeError("injected housekeeping bug")

class QuickSupervisor(Supervisor):
    def __init__(self, on_give_up, config=None, **kwargs):
        quick = SupervisorConfig(max_restarts=3, window_s=120.0, backoff_s=1.0, backoff_max_s=2.0)
        super().__init__(on_give_up, quick, **kwargs)

esperd.service.Service.housekeeping = buggy_housekeeping
esperd.service.Supervisor = QuickSupervisor
from esperd.cli import main
sys.exit(main(sys.argv[1:]))
"""


async def test_a_task_that_keeps_failing_is_restarted_shown_then_esperd_exits_70(
    nats_server: NatsServer, nats_client: Client, tmp_path: Path
) -> None:
    probe = tmp_path / "buggy.py"
    probe.write_text(BUGGY_HOUSEKEEPING, encoding="utf-8")
    config = write_config(tmp_path / "esperd.toml", config_dict(nats_server.url, tmp_path / "state"))
    async with esperd_process(config, tmp_path / "esperd.log", [sys.executable, str(probe)]) as daemon:
        restarting = await wait_status(
            nats_client,
            daemon,
            lambda s: s.get("tasks", {}).get("housekeeping", {}).get("restarts", 0) >= 1,
            START_TIMEOUT_S,
            "the housekeeping task restarted",
        )
        assert daemon.proc is not None
        code = daemon.proc.wait(60)

    housekeeping = restarting["tasks"]["housekeeping"]
    assert housekeeping["last_error"] == "RuntimeError: injected housekeeping bug"
    assert housekeeping["last_error_at"] and not housekeeping["gave_up"]
    assert all(t["running"] for name, t in restarting["tasks"].items() if name != "housekeeping")
    assert code == 70, daemon.tail()
    restarts = daemon.events("background task ended unexpectedly; restarting")
    assert [e["task"] for e in restarts] == ["housekeeping"] * 3
    assert daemon.events("background task keeps failing; giving up")
    names = [e.get("event") for e in daemon.events()]
    assert names.index("esperd stopping") < names.index("esperd stopped")  # a clean stop first
    assert daemon.events("esperd exits non-zero: background tasks kept failing")[0]["exit_code"] == 70
    assert "Traceback" in daemon.text()  # the bug's own traceback is logged, once per failure


def child_pids(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def is_nats_server(pid: int) -> bool:
    try:
        return b"nats-server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


async def connect_when_up(url: str, daemon: Esperd) -> Client:
    """A client that reconnects forever, once esperd's embedded broker first answers."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + START_TIMEOUT_S
    while True:
        try:
            return await nats.connect(
                url, allow_reconnect=True, max_reconnect_attempts=-1, reconnect_time_wait=0.2
            )
        except Exception:  # noqa: BLE001 - not up yet
            assert loop.time() < deadline and daemon.alive(), daemon.tail()
            await asyncio.sleep(0.2)


async def test_embedded_broker_killed_is_started_again_and_esperd_serves_on(tmp_path: Path) -> None:
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    raw = config_dict(url, tmp_path / "state", nats={"embedded": True, "embedded_port": port})
    config = write_config(tmp_path / "esperd.toml", raw)
    async with esperd_process(config, tmp_path / "esperd.log") as daemon:
        nc = await connect_when_up(url, daemon)
        try:
            await wait_status(nc, daemon, ready, START_TIMEOUT_S, "esperd ready")
            brokers = [p for p in child_pids(daemon.pid) if is_nats_server(p)]
            assert len(brokers) == 1, brokers
            os.kill(brokers[0], signal.SIGKILL)
            after = await wait_status(
                nc,
                daemon,
                lambda s: (
                    s["tasks"].get("embedded-broker", {}).get("restarts", 0) >= 1
                    and s["tasks"]["embedded-broker"]["running"]
                    and s["nats"]["connected"]
                ),
                60,
                "the embedded broker restarted and esperd reconnected",
            )
            again = [p for p in child_pids(daemon.pid) if is_nats_server(p)]
            assert len(again) == 1 and again != brokers
        finally:
            await nc.close()
        code = daemon.sigterm()
    assert code == 0, daemon.tail()
    task = after["tasks"]["embedded-broker"]
    assert task["last_error"] == "NatsServerError: nats-server was killed by SIGKILL", task
    assert after["nats"]["reconnects"] >= 1
    assert daemon.events("embedded nats-server restarted")
