"""A run's life on a real nats-server, the daemon in-process: admitted, finished, released, reused.

Regression tests for issue 13: a finished run kept its `max_runs` slot for `idle_ttl_s` (600 s),
and a run id reused after `done` (a training job restarted under the same id) never got a
decision again.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from esperd.ops.natsserver import NatsServer
from esperd.runs import MIB, estimated_bytes
from esperd_contracts import (
    AckStatus,
    AdaptationCommand,
    Codec,
    CommandAck,
    HealthBatch,
    HealthSignal,
    SeedSlotState,
    SeedStage,
    SystemStatePacket,
)
from tests.integration.helpers import daemon_config, running_daemon, status, wait_for_status
from tests.support.packets import chain_topology

CODEC = Codec()
SCHEDULER = {"min_interval_s": 0.05, "cooldown_s": 0.0, "max_wait_ms": 2.0}
POLICY = {"name": "heuristic", "heuristic": {"min_epoch": 0, "train_dwell_epochs": 3}}
LAYERS = 4


@asynccontextmanager
async def commands_of(nc: Client, run_id: str) -> AsyncIterator[asyncio.Queue[AdaptationCommand]]:
    """The commands esperd publishes for one run, as they come."""
    queue: asyncio.Queue[AdaptationCommand] = asyncio.Queue()

    async def on_command(msg: Msg) -> None:
        queue.put_nowait(CODEC.decode_command(msg.data, (msg.headers or {}).get("Content-Type")))

    sub = await nc.subscribe(f"esper.{run_id}.command", cb=on_command)
    try:
        yield queue
    finally:
        await sub.unsubscribe()


async def publish_topology(nc: Client, run_id: str) -> None:
    await nc.publish(f"esper.{run_id}.topology", CODEC.encode(chain_topology(LAYERS, layer_type="conv")))


async def publish_training(nc: Client, run_id: str, epoch: int) -> None:
    """Health and a state packet with a seed past its dwell time: the heuristic answers with a command."""
    signals = [HealthSignal(layer_id=i, health_score=0.8) for i in range(LAYERS)]
    await nc.publish(f"esper.{run_id}.health", CODEC.encode(HealthBatch(signals=signals)))
    seeds = [SeedSlotState(layer_id=1, stage=SeedStage.TRAINING, epochs_in_stage=3)]
    await nc.publish(f"esper.{run_id}.state", CODEC.encode(SystemStatePacket(epoch=epoch, seeds=seeds)))


async def publish_done(nc: Client, run_id: str, epoch: int) -> None:
    await nc.publish(f"esper.{run_id}.state", CODEC.encode(SystemStatePacket(epoch=epoch, done=True)))


async def next_command(queue: asyncio.Queue[AdaptationCommand], timeout: float = 5.0) -> AdaptationCommand:
    return await asyncio.wait_for(queue.get(), timeout)


def lifecycle_config(url: str, state_dir: Path, **analyzer: Any) -> Any:
    return daemon_config(url, state_dir, analyzer=analyzer, scheduler=SCHEDULER, policy=POLICY)


# ------------------------------------------------------------------ done releases the slot


async def test_a_finished_run_releases_its_slot_after_the_grace_and_late_acks_still_match(
    nats_server: NatsServer, nats_client: Client, tmp_path: Path
) -> None:
    """idle_ttl_s is 600 s: on the old code the finished runs held every slot for ten minutes, so the
    next run was refused `too_many_runs`, and an ack arriving after `done` was an unknown ack."""
    config = lifecycle_config(nats_server.url, tmp_path, max_runs=3, idle_ttl_s=600.0, done_grace_s=1.0)
    async with running_daemon(config):
        commands = []
        for i in range(3):
            async with commands_of(nats_client, f"fin-{i}") as queue:
                await publish_topology(nats_client, f"fin-{i}")
                await publish_training(nats_client, f"fin-{i}", epoch=1)
                commands.append(await next_command(queue))
            await publish_done(nats_client, f"fin-{i}", epoch=2)
        # A late ack, after `done` but within the grace, still settles its command.
        late = CommandAck(command_id=commands[0].command_id, status=AckStatus.APPLIED)
        await nats_client.publish("esper.fin-0.ack", CODEC.encode(late))
        acked = await wait_for_status(nats_client, lambda s: s["acks_by_status"].get("applied", 0) >= 1)
        released = await wait_for_status(nats_client, lambda s: s["runs"] == 0, timeout=5.0)
        await nats_client.publish(
            "esper.next.health", CODEC.encode(HealthSignal(layer_id=0, health_score=0.5))
        )
        after = await wait_for_status(nats_client, lambda s: s["runs"] == 1)
    assert acked["acks_by_status"] == {"applied": 1} and acked["scheduler"]["unknown_acks"] == 0
    assert released["runs"] == 0, released["runs"]
    assert released["run_table"]["dropped_by_reason"] == {"done": 3}
    assert after["runs"] == 1 and after["rejected_total"] == 0


async def test_a_table_full_of_finished_runs_admits_a_new_run_at_once(
    nats_server: NatsServer, nats_client: Client, tmp_path: Path
) -> None:
    config = lifecycle_config(nats_server.url, tmp_path, max_runs=2, idle_ttl_s=600.0, done_grace_s=60.0)
    async with running_daemon(config):
        for run_id in ("old-a", "old-b"):
            await publish_topology(nats_client, run_id)
            await publish_done(nats_client, run_id, epoch=5)
        full = await wait_for_status(nats_client, lambda s: s["accepted_total"] >= 4)
        async with commands_of(nats_client, "newcomer") as queue:
            await publish_topology(nats_client, "newcomer")
            await publish_training(nats_client, "newcomer", epoch=1)
            command = await next_command(queue)
        st = await status(nats_client)
    assert full["runs"] == 2 and full["run_table"]["finishing"] == 2
    assert command.run_id == "newcomer"
    assert st["rejected_total"] == 0, st["rejected_by_reason"]
    assert st["runs"] == 2 and st["run_table"]["dropped_by_reason"] == {"done": 1}


# ------------------------------------------------------------------ a reused run id


@pytest.mark.parametrize(
    ("restart", "grace_s"),
    [("topology", 60.0), ("epoch_backwards", 60.0), ("topology", 0.2)],
    ids=["new-topology", "epoch-backwards", "after-the-grace"],
)
async def test_a_run_id_reused_after_done_gets_decisions_again(
    nats_server: NatsServer, nats_client: Client, tmp_path: Path, restart: str, grace_s: float
) -> None:
    """On the old code the run stayed `done` until it idled out (600 s): the restarted job was ignored."""
    config = lifecycle_config(nats_server.url, tmp_path, idle_ttl_s=600.0, done_grace_s=grace_s)
    async with running_daemon(config):
        async with commands_of(nats_client, "job") as queue:
            await publish_topology(nats_client, "job")
            await publish_training(nats_client, "job", epoch=4)
            first = await next_command(queue)
            await publish_done(nats_client, "job", epoch=5)
            await wait_for_status(nats_client, lambda s: s["accepted_by_kind"].get("state", 0) >= 2)
            if grace_s < 1.0:
                await wait_for_status(nats_client, lambda s: s["runs"] == 0)
            # The job restarts under the same id.
            if restart == "topology":
                await publish_topology(nats_client, "job")
            await publish_training(nats_client, "job", epoch=0)
            second = await next_command(queue)
        st = await status(nats_client)
    assert second.run_id == first.run_id == "job" and second.command_id != first.command_id
    assert st["run_table"]["reused"] == 1
    assert st["runs"] == 1 and st["rejected_total"] == 0


# ------------------------------------------------------------------ the memory budget


def chain(layers: int) -> bytes:
    return CODEC.encode(chain_topology(layers, layer_type="conv"))


async def test_the_memory_budget_refuses_runs_and_growth_beyond_it(
    nats_server: NatsServer, nats_client: Client, tmp_path: Path
) -> None:
    """On the old code nothing bounded the sum: any publisher could make esperd hold max_runs x ~8 MB."""
    budget_mb = 1.3
    budget = int(budget_mb * MIB)
    big, small, grown = estimated_bytes(200, 199), estimated_bytes(10, 9), estimated_bytes(50, 49)
    assert big + small + grown <= budget < big + small + estimated_bytes(100, 99)  # the scenario's premise
    assert 2 * big + small > budget
    config = lifecycle_config(
        nats_server.url, tmp_path, memory_budget_mb=budget_mb, idle_ttl_s=600.0, done_grace_s=0.2
    )
    async with running_daemon(config):
        await nats_client.publish("esper.big.topology", chain(200))
        await nats_client.publish("esper.rival.topology", chain(200))  # does not fit beside big
        await nats_client.publish("esper.small.topology", chain(10))  # does
        # A run that grows its inferred graph one batch at a time hits the budget too.
        for first in range(0, 200, 50):
            signals = [HealthSignal(layer_id=i, health_score=0.5) for i in range(first, first + 50)]
            await nats_client.publish("esper.grower.health", CODEC.encode(HealthBatch(signals=signals)))
        full = await wait_for_status(nats_client, lambda s: s["accepted_total"] + s["rejected_total"] >= 7)
        await asyncio.sleep(0.2)
        full = await status(nats_client)
        await publish_done(nats_client, "big", epoch=1)  # big finishes: after its grace, rival fits
        await wait_for_status(nats_client, lambda s: s["run_table"]["dropped_by_reason"].get("done") == 1)
        await nats_client.publish("esper.rival.topology", chain(200))
        after = await wait_for_status(nats_client, lambda s: s["accepted_by_kind"].get("topology", 0) >= 3)
    table = full["run_table"]
    # rival's topology, and grower's batches after its first: each one refused, nothing else.
    assert full["rejected_by_reason"] == {"memory_budget": 4}, full["rejected_by_reason"]
    assert full["accepted_total"] == 3
    assert full["runs"] == 3  # big, small and grower; rival was never admitted
    assert table["memory_budget_bytes"] == budget
    assert table["memory_used_bytes"] == big + small + grown
    assert table["nodes"] == 200 + 10 + 50, table  # grower kept the layers that fitted (its first batch)
    assert after["rejected_total"] == 4 and after["runs"] == 3
    assert after["run_table"]["nodes"] == 10 + 50 + 200
