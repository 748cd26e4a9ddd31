"""What a host says back steers esperd: rejections change the next choice, applied acks move the stage.

A real nats-server and the daemon in-process; the host speaks through HostClient.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from nats.aio.client import Client

from esperd.analyzer.observation import STAGES
from esperd.client import HostClient
from esperd.ops.natsserver import NatsServer
from esperd_contracts import (
    HealthSignal,
    Op,
    SeedSlotState,
    SeedStage,
    SystemStatePacket,
)
from tests.integration.helpers import daemon_config, running_daemon, wait_for_status
from tests.support.packets import chain_topology

SCHEDULER = {"min_interval_s": 0.05, "cooldown_s": 60.0, "max_wait_ms": 2.0}
POLICY = {"name": "heuristic", "heuristic": {"min_epoch": 3}}


async def test_a_rejected_blueprint_is_not_sent_again_to_that_layer(
    nats_server: NatsServer, nats_client: Client, tmp_path: Path
) -> None:
    config = daemon_config(nats_server.url, tmp_path, scheduler=SCHEDULER, policy=POLICY)
    async with running_daemon(config):
        host = await HostClient.connect(nats_server.url, "picky")
        try:
            host.send_topology(chain_topology(3, name_prefix="fc", params=500))
            await wait_for_status(nats_client, lambda s: s["accepted_by_kind"].get("topology", 0) >= 1)
            for health in (0.5, 0.4, 0.3, 0.2):  # layer 1 unhealthy and declining
                host.send_health(
                    [HealthSignal(layer_id=i, health_score=health if i == 1 else 0.9) for i in range(3)]
                )
            tried: list[object] = []
            for epoch in range(5, 8):
                host.send_state(SystemStatePacket(epoch=epoch, val_accuracy=0.7, total_epochs=100))
                command = await asyncio.wait_for(host.commands.get(), 5.0)
                assert (command.op, command.layer_id) == (Op.GERMINATE, 1)
                tried.append(command.blueprint)
                host.ack(command, applied=False, reason=f"{command.blueprint.value} is not implemented here")
                rejected = len(tried)
                await wait_for_status(
                    nats_client, lambda s, n=rejected: s["acks_by_status"].get("rejected", 0) >= n
                )
            # Three rejected germinations: the layer is not germinated again in this run.
            host.send_state(SystemStatePacket(epoch=8, val_accuracy=0.7, total_epochs=100))
            await asyncio.sleep(0.5)
            assert host.commands.empty()
        finally:
            await host.close()
    # Each retry was steered by the rejections before it: never the same blueprint twice on the layer.
    assert len(set(tried)) == len(tried) == 3


async def test_an_applied_ack_moves_esperds_view_of_the_slot_before_the_next_packet(
    nats_server: NatsServer, nats_client: Client, tmp_path: Path
) -> None:
    config = daemon_config(nats_server.url, tmp_path, scheduler=SCHEDULER, policy=POLICY)
    async with running_daemon(config) as service:
        host = await HostClient.connect(nats_server.url, "eager")
        try:
            host.send_topology(chain_topology(3, name_prefix="fc", params=500))
            await wait_for_status(nats_client, lambda s: s["accepted_by_kind"].get("topology", 0) >= 1)
            training = SeedSlotState(layer_id=2, stage=SeedStage.TRAINING, epochs_in_stage=3)
            host.send_state(SystemStatePacket(epoch=8, val_accuracy=0.7, seeds=[training]))
            command = await asyncio.wait_for(host.commands.get(), 5.0)
            assert (command.op, command.layer_id) == (Op.ADVANCE, 2)
            host.ack(command, applied=True)
            await wait_for_status(nats_client, lambda s: s["acks_by_status"].get("applied", 0) >= 1)
            obs = service.analyzer.observe("eager")
            assert STAGES[int(obs.stages[2])] is SeedStage.BLENDING
        finally:
            await host.close()


async def test_no_seed_is_started_that_the_runs_budget_cannot_finish(
    nats_server: NatsServer, nats_client: Client, tmp_path: Path
) -> None:
    config = daemon_config(nats_server.url, tmp_path, scheduler=SCHEDULER, policy=POLICY)
    async with running_daemon(config):
        early = await HostClient.connect(nats_server.url, "early", total_epochs=48)
        late = await HostClient.connect(nats_server.url, "late", total_epochs=48)
        try:
            for host in (early, late):
                host.send_topology(chain_topology(3, name_prefix="fc", params=500))
            await wait_for_status(nats_client, lambda s: s["accepted_by_kind"].get("topology", 0) >= 2)
            for host in (early, late):
                for health in (0.5, 0.4, 0.3, 0.2):  # layer 1 unhealthy and declining in both
                    host.send_health(
                        [HealthSignal(layer_id=i, health_score=health if i == 1 else 0.9) for i in range(3)]
                    )
            early.send_state(SystemStatePacket(epoch=20, val_accuracy=0.7))  # 27 epochs to go
            late.send_state(SystemStatePacket(epoch=40, val_accuracy=0.7))  # 7 to go: < a lifecycle
            command = await asyncio.wait_for(early.commands.get(), 5.0)
            assert (command.op, command.layer_id) == (Op.GERMINATE, 1)
            await wait_for_status(nats_client, lambda s: s["decisions"]["decisions"] >= 2)
            await asyncio.sleep(0.3)
            assert late.commands.empty()
        finally:
            await early.close()
            await late.close()


async def test_fossilize_or_prune_is_not_decided_on_a_few_validation_samples(
    nats_server: NatsServer, nats_client: Client, tmp_path: Path
) -> None:
    config = daemon_config(nats_server.url, tmp_path, scheduler=SCHEDULER, policy=POLICY)

    def probation(epoch: int, epochs_in_stage: int, counterfactual: float) -> SystemStatePacket:
        seed = SeedSlotState(
            layer_id=1,
            stage=SeedStage.PROBATIONARY,
            epochs_in_stage=epochs_in_stage,
            counterfactual=counterfactual,
            total_improvement=0.02,
        )
        return SystemStatePacket(epoch=epoch, val_accuracy=0.8, seeds=[seed])

    async with running_daemon(config):
        noisy = await HostClient.connect(nats_server.url, "noisy", val_samples=1000)
        clear = await HostClient.connect(nats_server.url, "clear", val_samples=1000)
        try:
            for host in (noisy, clear):
                host.send_topology(chain_topology(3, name_prefix="fc", params=500))
            await wait_for_status(nats_client, lambda s: s["accepted_by_kind"].get("topology", 0) >= 2)
            noisy.send_state(probation(10, 1, 0.003))  # 3 of 1000 validation samples: noise
            clear.send_state(probation(10, 1, 0.03))  # 30 of 1000: a real contribution
            command = await asyncio.wait_for(clear.commands.get(), 5.0)
            assert (command.op, command.layer_id) == (Op.FOSSILIZE, 1)
            await wait_for_status(nats_client, lambda s: s["decisions"]["decisions"] >= 2)
            await asyncio.sleep(0.3)
            assert noisy.commands.empty()  # undecided: measure another epoch
            for epoch, eis in ((11, 2), (12, 3), (13, 4)):
                noisy.send_state(probation(epoch, eis, 0.003))
                await asyncio.sleep(0.15)
            command = await asyncio.wait_for(noisy.commands.get(), 5.0)
            assert (command.op, command.layer_id) == (Op.PRUNE, 1)  # never shown to earn its parameters
        finally:
            await noisy.close()
            await clear.close()
