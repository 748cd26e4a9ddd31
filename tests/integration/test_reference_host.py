"""The reference PyTorch host against a real nats-server and esperd running in-process."""

from __future__ import annotations

import asyncio
from pathlib import Path

import torch
from nats.aio.client import Client

from esperd.client import HostClient
from esperd.ops.natsserver import NatsServer
from esperd_contracts import Op, SeedStage
from esperd_examples.host.train import HostConfig, HostRun, RunReport
from tests.integration.helpers import daemon_config, running_daemon, wait_for_status

torch.set_num_threads(1)

# Lenient rules so that a decision comes within two epochs: germinate from epoch 0, always
# count the host as stabilized, and treat any declining layer below 0.6 health as a target.
# The host kills block2's units over its first epoch (fault injection), so block2 declines.
POLICY = {
    "name": "heuristic",
    "heuristic": {"min_epoch": 0, "stabilize_delta": 1.0, "unhealthy_threshold": 1.0},
}
ANALYZER = {"problematic_health": 0.6}
SCHEDULER = {"min_interval_s": 0.0, "cooldown_s": 0.5}


async def train(url: str, run_id: str, config: HostConfig) -> RunReport:
    client = await HostClient.connect(url, run_id)
    try:
        return await asyncio.wait_for(HostRun(config, link=client).run(), timeout=25)
    finally:
        await client.close()


async def test_reference_host_trains_under_esperd_and_applies_its_commands(
    nats_server: NatsServer, nats_client: Client, tmp_path: Path
) -> None:
    config = daemon_config(nats_server.url, tmp_path, policy=POLICY, analyzer=ANALYZER, scheduler=SCHEDULER)
    async with running_daemon(config) as service:
        host = HostConfig(epochs=2, degrade="block2", health_every=2, epoch_pause_s=0.3)
        report = await train(nats_server.url, "ref-host", host)
        status = await wait_for_status(
            nats_client,
            lambda s: (
                s["acks_by_status"].get("applied", 0) >= 1 and s["accepted_by_kind"].get("state", 0) >= 2
            ),
        )
        run = service.analyzer.get_run("ref-host")
        assert run is not None
        training, inferred = run.training, run.graph is None or run.graph.inferred

    applied = [record for record in report.commands if record.applied]
    assert applied, f"no command applied; got {[(r.command.op, r.reason) for r in report.commands]}"
    first = applied[0].command
    assert first.op is Op.GERMINATE and first.policy == "heuristic" and first.blueprint is not None
    seeds = {s.layer_id: s for s in report.final.seeds}
    assert seeds[first.layer_id].stage is not SeedStage.DORMANT  # it really changed the model
    assert report.final.total_params > report.final.host_params

    assert status["acks_by_status"].get("applied", 0) >= 1
    assert status["commands_total"] >= 1 and status["rejected_total"] == 0
    assert status["accepted_by_kind"]["topology"] == 1 and status["accepted_by_kind"]["health_batch"] >= 10
    # esperd saw the accuracy: the last state packet, with the run marked done.
    assert training.val_accuracy == report.final.val_accuracy > 0.0
    assert training.done and training.epoch == 1 and not inferred


async def test_several_hosts_share_one_esperd(
    nats_server: NatsServer, nats_client: Client, tmp_path: Path
) -> None:
    config = daemon_config(nats_server.url, tmp_path, scheduler=SCHEDULER)
    async with running_daemon(config) as service:
        host = HostConfig(epochs=1, batch_size=128, health_every=4)
        reports = await asyncio.gather(
            train(nats_server.url, "host-a", host), train(nats_server.url, "host-b", host)
        )
        status = await wait_for_status(nats_client, lambda s: s["accepted_by_kind"].get("state", 0) >= 2)
        runs = {run_id: service.analyzer.get_run(run_id) for run_id in ("host-a", "host-b")}
    assert status["runs"] == 2 and status["rejected_total"] == 0
    for report in reports:
        run = runs[report.run_id]
        assert run is not None and run.training.val_accuracy == report.final.val_accuracy > 0.0
