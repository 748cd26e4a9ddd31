"""Decisions end to end on a real nats-server, the daemon in-process.

Hosts publish topology, health and state (hand-typed JSON without headers, and msgpack through
HostClient); each must get the heuristic's commands for its own run and layers within a deadline;
cooldowns hold while a command is applied, a rejected or timed-out command frees its layer, and
status counts commands by op, acks by outcome, unknown acks, batches and the serving policy.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from nats.aio.client import Client
from nats.aio.msg import Msg

from esperd.client import HostClient
from esperd.ops.natsserver import NatsServer
from esperd_contracts import (
    AdaptationCommand,
    BlueprintFamily,
    Codec,
    HealthSignal,
    Op,
    SeedSlotState,
    SeedStage,
    SystemStatePacket,
    TopologyNode,
    TopologyPacket,
)
from tests.integration.helpers import daemon_config, running_daemon, status, wait_for_status
from tests.support.packets import seed, state
from tests.support.timing import until

CODEC = Codec()
DEADLINE_S = 5.0
SCHEDULER = {"min_interval_s": 0.05, "cooldown_s": 60.0, "max_wait_ms": 2.0}
POLICY = {"name": "heuristic", "heuristic": {"min_epoch": 3, "train_dwell_epochs": 3, "probation_epochs": 1}}

# Exactly what `nats pub` sends: typed bytes, no headers. Layer 1 (conv) is unhealthy and declining.
JSON_RUN = "typed"
JSON_TOPOLOGY = (
    b'{"kind":"topology","nodes":[{"layer_id":0,"name":"stem","layer_type":"conv"},'
    b'{"layer_id":1,"name":"block1","layer_type":"conv"},{"layer_id":2,"name":"head","layer_type":"linear"}],'
    b'"edges":[[0,1],[1,2],[0,2]]}'
)
JSON_PACKETS = [
    ("health", b'{"kind":"health","layer_id":1,"health_score":0.5}'),
    (
        "health",
        (
            b'{"kind":"health_batch","signals":[{"layer_id":0,"health_score":0.9},'
            b'{"layer_id":1,"health_score":0.4}]}'
        ),
    ),
    ("health", b'{"kind":"health","layer_id":1,"health_score":0.3}'),
    (
        "health",
        (
            b'{"kind":"health_batch","signals":[{"layer_id":2,"health_score":0.95},'
            b'{"layer_id":1,"health_score":0.2}]}'
        ),
    ),
    ("state", b'{"kind":"state","epoch":5,"val_accuracy":0.61,"val_loss":1.2}'),
]


def layered_topology(kinds: list[str]) -> TopologyPacket:
    """A chain with a skip over every other layer."""
    nodes = [
        TopologyNode(layer_id=i, name=f"l{i}", layer_type=k, params=1000 * (i + 1))
        for i, k in enumerate(kinds)
    ]
    edges = [(i, i + 1) for i in range(len(kinds) - 1)] + [(i, i + 2) for i in range(0, len(kinds) - 2, 2)]
    return TopologyPacket(nodes=nodes, edges=edges)


class Tap:
    """Every command the daemon publishes on any run, with the subject it came on."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, AdaptationCommand]] = []

    async def on_msg(self, msg: Msg) -> None:
        content_type = msg.headers.get("Content-Type") if msg.headers else None
        self.seen.append((msg.subject, CODEC.decode_command(msg.data, content_type)))

    def for_run(self, run_id: str) -> list[AdaptationCommand]:
        return [c for subject, c in self.seen if subject == f"esper.{run_id}.command"]


async def tap_commands(nc: Client) -> Tap:
    tap = Tap()
    await nc.subscribe("esper.*.command", cb=tap.on_msg)
    await nc.flush()
    return tap


@contextlib.asynccontextmanager
async def hosts(url: str, *run_ids: str) -> AsyncIterator[list[HostClient]]:
    clients = [await HostClient.connect(url, run_id) for run_id in run_ids]
    try:
        yield clients
    finally:
        for client in clients:
            await client.close()


async def next_command(host: HostClient, timeout: float = DEADLINE_S) -> AdaptationCommand:
    return await asyncio.wait_for(host.commands.get(), timeout)


def training_state(epoch: int, layer: int, epochs_in_stage: int = 3) -> SystemStatePacket:
    """A state packet whose seed on `layer` has trained `epochs_in_stage` epochs."""
    return state(
        epoch, val_accuracy=0.7, seeds=[seed(layer, SeedStage.TRAINING, epochs_in_stage=epochs_in_stage)]
    )


# ------------------------------------------------------------------ three runs, each its own commands


async def test_three_runs_get_commands_for_their_own_layers_by_the_heuristics_rules(
    nats_server: NatsServer, nats_client: Client, tmp_path: Path
) -> None:
    config = daemon_config(nats_server.url, tmp_path, scheduler=SCHEDULER, policy=POLICY)
    async with running_daemon(config), hosts(nats_server.url, "grow", "settle") as (grow, settle):
        tap = await tap_commands(nats_client)
        loop = asyncio.get_running_loop()
        started = loop.time()

        # Topologies first, as hosts announce them at start (the daemon reads each channel on its
        # own subscription, so a topology published right before health is not ordered with it).
        kinds = ["conv", "conv", "conv", "attention", "attention", "attention", "mlp", "linear"]
        await nats_client.publish(f"esper.{JSON_RUN}.topology", JSON_TOPOLOGY)
        grow.send_topology(layered_topology(kinds))
        settle.send_topology(layered_topology(["conv"] * 6))
        await wait_for_status(nats_client, lambda s: s["accepted_by_kind"].get("topology", 0) >= 3)

        # Run 1, hand-typed JSON: conv layer 1 declines -> GERMINATE there with a CNN blueprint.
        for channel, data in JSON_PACKETS:
            await nats_client.publish(f"esper.{JSON_RUN}.{channel}", data)
        # Run 2, msgpack: attention layer 5 of 8 declines -> GERMINATE there, transformer blueprint.
        for health in (0.5, 0.4, 0.3, 0.2):
            grow.send_health(
                [HealthSignal(layer_id=i, health_score=health if i == 5 else 0.9) for i in range(8)]
            )
        grow.send_state(SystemStatePacket(epoch=6, val_accuracy=0.7, val_loss=0.9))
        # Run 3, msgpack: a seed on probation that helped -> FOSSILIZE it.
        helped = SeedSlotState(
            layer_id=1,
            stage=SeedStage.PROBATIONARY,
            epochs_in_stage=2,
            counterfactual=0.02,
            total_improvement=0.03,
        )
        settle.send_state(SystemStatePacket(epoch=10, val_accuracy=0.8, seeds=[helped]))

        grown = await next_command(grow)
        settled = await next_command(settle)
        await until(lambda: tap.for_run(JSON_RUN))
        assert loop.time() - started < DEADLINE_S
        typed = tap.for_run(JSON_RUN)[0]

        assert (typed.run_id, typed.layer_id, typed.op) == (JSON_RUN, 1, Op.GERMINATE)
        assert typed.blueprint is not None and typed.blueprint.family is BlueprintFamily.CNN
        assert (grown.run_id, grown.layer_id, grown.op) == ("grow", 5, Op.GERMINATE)
        assert grown.blueprint is not None and grown.blueprint.family is BlueprintFamily.TRANSFORMER
        assert (settled.run_id, settled.layer_id, settled.op) == ("settle", 1, Op.FOSSILIZE)
        for command in (typed, grown, settled):
            assert command.policy == "heuristic" and command.policy_version == 1
            assert command.command_id and command.issued_at > 0 and command.reason
            assert 0.0 < command.confidence <= 1.0 and 0.0 < command.urgency <= 1.0
        for command in (typed, grown):
            assert command.blend is not None and command.tempo is not None

        # The host applies the fossilization; the next seed on probation hurt -> PRUNE it.
        settle.ack(settled, applied=True)
        hurt = SeedSlotState(
            layer_id=3,
            stage=SeedStage.PROBATIONARY,
            epochs_in_stage=1,
            counterfactual=0.01,
            total_improvement=-0.02,
        )
        done = SeedSlotState(layer_id=1, stage=SeedStage.FOSSILIZED)
        settle.send_state(SystemStatePacket(epoch=11, val_accuracy=0.8, seeds=[done, hurt]))
        pruned = await next_command(settle)
        assert (pruned.run_id, pruned.layer_id, pruned.op) == ("settle", 3, Op.PRUNE)

        # The germinated seed trains past its dwell time -> ADVANCE on the same layer.
        grow.ack(grown, applied=True)
        grow.send_state(training_state(epoch=9, layer=5, epochs_in_stage=3))
        await asyncio.sleep(0.3)
        # Layer 5 is still cooling down after the applied GERMINATE: nothing may come for it.
        assert grow.commands.empty()

        # Every command went to its own run's subject, about its own layers, and nobody else's.
        await asyncio.sleep(0.2)
        for subject, command in tap.seen:
            assert subject == f"esper.{command.run_id}.command"
        assert {c.run_id for _, c in tap.seen} == {JSON_RUN, "grow", "settle"}
        assert [c.layer_id for c in tap.for_run("settle")] == [1, 3]
        assert [c.layer_id for c in tap.for_run("grow")] == [5]
        assert [c.layer_id for c in tap.for_run(JSON_RUN)] == [1]

        st = await wait_for_status(nats_client, lambda s: s["acks_by_status"].get("applied", 0) >= 2)
    assert st["runs"] == 3
    assert st["commands_total"] == 4
    assert st["decisions"]["commands_by_op"] == {"germinate": 2, "fossilize": 1, "prune": 1}
    assert st["acks_by_status"] == {"applied": 2}
    assert st["decisions"]["batches"] >= 1 and st["decisions"]["batch_size_max"] >= 1
    assert st["decisions"]["latency_ms_p99"] > 0.0
    assert st["decisions"]["failures"] == 0
    assert st["policy"]["name"] == "heuristic" and st["policy"]["version"] == 1
    assert st["scheduler"]["pending_commands"] == 2  # the typed run's GERMINATE and the PRUNE
    assert st["rejected_total"] == 0


# ------------------------------------------------------------------ cooldowns and acks


async def test_cooldown_holds_while_applied_and_a_rejection_frees_the_layer(
    nats_server: NatsServer, nats_client: Client, tmp_path: Path
) -> None:
    config = daemon_config(nats_server.url, tmp_path, scheduler=SCHEDULER, policy=POLICY)
    async with running_daemon(config), hosts(nats_server.url, "keep", "retry") as (keep, retry):
        for host in (keep, retry):
            host.send_topology(layered_topology(["conv"] * 4))
            host.send_state(training_state(epoch=8, layer=2))
        kept, first = await next_command(keep), await next_command(retry)
        assert (kept.layer_id, kept.op) == (2, Op.ADVANCE)
        assert (first.layer_id, first.op) == (2, Op.ADVANCE)

        # Unacked: the layer cools (60 s); re-sent state packets are decided, and decided WAIT.
        before = (await status(nats_client))["decisions"]["waits"]
        for epoch in (9, 10):
            keep.send_state(training_state(epoch=epoch, layer=2))
            retry.send_state(training_state(epoch=epoch, layer=2))
            await asyncio.sleep(0.15)  # > min_interval_s, so each packet gets its own decision
        st = await wait_for_status(nats_client, lambda s: s["decisions"]["waits"] >= before + 4)
        assert st["decisions"]["waits"] >= before + 4
        assert keep.commands.empty() and retry.commands.empty()

        # Applied keeps the cooldown; rejected frees the layer at once.
        keep.ack(kept, applied=True)
        retry.ack(first, applied=False, reason="out of memory")
        await wait_for_status(nats_client, lambda s: sum(s["acks_by_status"].values()) >= 2)
        keep.send_state(training_state(epoch=11, layer=2))
        retry.send_state(training_state(epoch=11, layer=2))
        second = await next_command(retry)
        assert (second.run_id, second.layer_id, second.op) == ("retry", 2, Op.ADVANCE)
        assert second.command_id != first.command_id
        await asyncio.sleep(0.3)
        assert keep.commands.empty()  # still cooling: the applied ADVANCE holds it for 60 s

        # An ack nobody asked for (unknown id) is counted, and frees nothing.
        await nats_client.publish(
            "esper.keep.ack", b'{"kind":"ack","command_id":"no-such-command","status":"rejected"}'
        )
        st = await wait_for_status(nats_client, lambda s: s["scheduler"]["unknown_acks"] >= 1)
        keep.send_state(training_state(epoch=12, layer=2))
        await asyncio.sleep(0.3)
        assert keep.commands.empty()
    assert st["scheduler"]["unknown_acks"] == 1
    assert st["acks_by_status"] == {"applied": 1, "rejected": 1}
    assert st["decisions"]["commands_by_op"] == {"advance": 3}
    assert st["commands_total"] == 3
    assert st["scheduler"]["pending_commands"] == 1  # `second`, not acked


async def test_unacked_command_times_out_and_frees_its_layer(
    nats_server: NatsServer, nats_client: Client, tmp_path: Path
) -> None:
    scheduler = {**SCHEDULER, "ack_timeout_s": 0.3}
    config = daemon_config(nats_server.url, tmp_path, scheduler=scheduler, policy=POLICY)
    async with running_daemon(config), hosts(nats_server.url, "silent") as (silent,):
        silent.send_topology(layered_topology(["conv"] * 4))
        silent.send_state(training_state(epoch=8, layer=1))
        first = await next_command(silent)
        assert (first.layer_id, first.op) == (1, Op.ADVANCE)
        # Never acked: housekeeping (once a second) expires it after ack_timeout_s, 60 s cooldown or not.
        st = await wait_for_status(
            nats_client, lambda s: s["acks_by_status"].get("timed_out", 0) >= 1, timeout=4
        )
        assert st["acks_by_status"] == {"timed_out": 1}
        assert st["scheduler"]["expired_commands"] == 1 and st["scheduler"]["pending_commands"] == 0
        silent.send_state(training_state(epoch=9, layer=1))
        second = await next_command(silent)
        assert (second.layer_id, second.op) == (1, Op.ADVANCE)
        # A late ack for the expired command is unknown now.
        silent.ack(first, applied=True)
        st = await wait_for_status(nats_client, lambda s: s["scheduler"]["unknown_acks"] >= 1)
    assert st["scheduler"]["unknown_acks"] == 1
    assert "applied" not in st["acks_by_status"]
