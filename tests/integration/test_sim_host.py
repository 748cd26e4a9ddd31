"""Simulated hosts over a real nats-server against the daemon in-process: commands flow and are acked."""

from __future__ import annotations

import asyncio
from pathlib import Path

from nats.aio.client import Client

from esperd.ops.natsserver import NatsServer
from esperd.sim import SimConfig
from esperd.sim.host import SimHosts
from tests.integration.helpers import daemon_config, running_daemon, wait_for_status

# Deficits from epoch 0 and a heuristic that does not wait for training to stabilize, so the
# first germinations come within a few epochs; short cooldowns so lifecycle commands follow.
FAST_SIM = SimConfig(
    epochs=12, onset_fraction=0.0, degrade_epochs=2, min_deficits=2, max_deficits=3, report_budget=False
)
SECTIONS = {
    "scheduler": {"min_interval_s": 0.0, "cooldown_s": 0.1, "max_wait_ms": 1.0},
    "policy": {
        "name": "heuristic",
        "heuristic": {"min_epoch": 0, "stabilize_delta": 1.0, "train_dwell_epochs": 1},
    },
}


async def test_sim_hosts_receive_and_ack_commands(
    nats_server: NatsServer, nats_client: Client, tmp_path: Path
) -> None:
    seen: list[tuple[str, str, bool]] = []
    async with running_daemon(daemon_config(nats_server.url, tmp_path, **SECTIONS)):
        hosts = SimHosts(
            nats_server.url,
            3,
            config=FAST_SIM,
            seed=1,
            epoch_s=0.1,
            episodes=1,
            session="",  # run ids sim-<i>-<episode>, as in SimEnv
            on_command=lambda run, command, applied, reason: seen.append((run, command.op.value, applied)),
        )
        stats = await asyncio.wait_for(hosts.run(), timeout=30)
        st = await wait_for_status(
            nats_client, lambda s: s["acks_by_status"].get("applied", 0) >= stats.applied, timeout=10
        )
    assert stats.episodes_finished == 3 and stats.epochs == FAST_SIM.epochs
    assert stats.commands >= 3 and stats.by_op.get("germinate", 0) >= 1, stats
    assert stats.applied >= 1 and stats.foreign == 0
    assert {run for run, _, _ in seen} <= {"sim-0-0", "sim-1-0", "sim-2-0"}
    # The daemon heard every ack: what the hosts applied and rejected, it counted.
    assert st["commands_total"] >= stats.commands
    assert st["acks_by_status"].get("applied", 0) == stats.applied
    assert st["acks_by_status"].get("rejected", 0) == stats.rejected
    assert st["runs"] == 3 and st["rejected_total"] == 0
