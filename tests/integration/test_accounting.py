"""Every message counted once, and acks matched on (run, command id): a real nats-server, the daemon
in-process.

Regression tests for issue 13: a message the analyzer or the run table refused was counted as
accepted *and* rejected; an ack published on another run's subject settled that run's command
(releasing its cooldown and charging the rejection to the wrong run).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import nats
from nats.aio.client import Client

from esperd.ops.natsserver import NatsServer
from esperd_contracts import AckStatus, Codec, CommandAck, HealthSignal, TopologyNode, TopologyPacket
from tests.integration.helpers import daemon_config, running_daemon, status, wait_for_status
from tests.integration.test_run_lifecycle import (
    POLICY,
    commands_of,
    next_command,
    publish_topology,
    publish_training,
)

CODEC = Codec()
HEALTH = CODEC.encode(HealthSignal(layer_id=0, health_score=0.5))


async def test_a_message_refused_after_intake_is_one_rejection_not_also_an_acceptance(
    nats_server: NatsServer, nats_client: Client, tmp_path: Path
) -> None:
    cycle = TopologyPacket(nodes=[TopologyNode(layer_id=0), TopologyNode(layer_id=1)], edges=[(0, 1), (1, 0)])
    config = daemon_config(nats_server.url, tmp_path, analyzer={"max_runs": 1})
    async with running_daemon(config):
        await nats_client.publish("esper.first.health", HEALTH)  # accepted: the one run there is room for
        await nats_client.publish("esper.first.topology", CODEC.encode(cycle))  # refused by the analyzer
        await nats_client.publish("esper.second.health", HEALTH)  # refused by the run table
        st = await wait_for_status(nats_client, lambda s: s["accepted_total"] + s["rejected_total"] >= 3)
        await asyncio.sleep(0.2)
        st = await status(nats_client)
    assert st["rejected_by_reason"] == {"cycle": 1, "too_many_runs": 1}
    assert (st["accepted_total"], st["rejected_total"]) == (1, 2)
    assert st["accepted_by_kind"] == {"health": 1}
    assert st["runs"] == 1


async def test_an_ack_on_another_runs_subject_is_rejected_and_settles_nothing(
    nats_server: NatsServer, nats_client: Client, tmp_path: Path
) -> None:
    reports: list[dict[str, object]] = []

    async def on_report(msg: nats.aio.msg.Msg) -> None:
        reports.append(json.loads(msg.data))

    await nats_client.subscribe("esperd.rejected", cb=on_report)
    scheduler = {"min_interval_s": 0.05, "cooldown_s": 60.0, "max_wait_ms": 2.0}
    config = daemon_config(nats_server.url, tmp_path, scheduler=scheduler, policy=POLICY)
    async with running_daemon(config):
        async with commands_of(nats_client, "victim") as queue:
            await publish_topology(nats_client, "victim")
            await publish_training(nats_client, "victim", epoch=1)
            command = await next_command(queue)
        await publish_topology(nats_client, "intruder")
        # The intruder answers the victim's command with a rejection, on its own subject.
        forged = CommandAck(command_id=command.command_id, status=AckStatus.REJECTED, reason="forged")
        await nats_client.publish("esper.intruder.ack", CODEC.encode(forged))
        refused = await wait_for_status(nats_client, lambda s: s["rejected_total"] >= 1)
        await asyncio.sleep(0.2)
        refused = await status(nats_client)
        # The victim's own ack still settles the command.
        own = CommandAck(command_id=command.command_id, status=AckStatus.APPLIED)
        await nats_client.publish("esper.victim.ack", CODEC.encode(own))
        settled = await wait_for_status(nats_client, lambda s: s["acks_by_status"].get("applied", 0) >= 1)
    assert refused["rejected_by_reason"] == {"ack_run_mismatch": 1}
    assert refused["accepted_by_kind"].get("ack", 0) == 0
    assert refused["acks_by_status"] == {}  # the victim's command was not settled ...
    assert refused["scheduler"]["pending_commands"] == 1  # ... so it still waits, its layer still cooling
    assert refused["experience"]["rejections"] == 0  # and no run was charged a rejection
    assert any(r["reason"] == "ack_run_mismatch" and r["run_id"] == "intruder" for r in reports), reports
    assert settled["acks_by_status"] == {"applied": 1} and settled["scheduler"]["pending_commands"] == 0
    assert settled["accepted_by_kind"]["ack"] == 1 and settled["scheduler"]["unknown_acks"] == 0
