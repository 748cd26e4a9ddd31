"""The daemon in-process against a real nats-server: intake, status, rejections, micro service."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import msgspec
import nats
from nats.aio.client import Client

from esperd.ops.natsserver import NatsServer
from esperd_contracts import Codec, HealthBatch, HealthSignal, SeedSlotState, SeedStage, SystemStatePacket
from tests.integration.helpers import daemon_config, running_daemon, status, wait_for_status

# Exactly what `nats pub SUBJECT 'JSON'` sends: the typed bytes, no headers.
HAND_TYPED = [
    (
        "esper.r1.topology",
        b'{"kind":"topology","nodes":[{"layer_id":0,"name":"stem","layer_type":"conv"},'
        b'{"layer_id":1,"name":"block1","layer_type":"conv"},{"layer_id":2,"name":"head","layer_type":"linear"}],'
        b'"edges":[[0,1],[1,2],[0,2]]}',
    ),
    ("esper.r1.health", b'{"kind":"health","layer_id":1,"health_score":0.2}'),
    (
        "esper.r1.health",
        b'{"kind":"health_batch","signals":[{"layer_id":0,"health_score":0.9},'
        b'{"layer_id":1,"health_score":0.25}]}',
    ),
    ("esper.r1.state", b'{"kind":"state","epoch":3,"val_accuracy":0.61,"val_loss":1.2}'),
    ("esper.r1.ack", b'{"kind":"ack","command_id":"c-1","status":"applied"}'),
]

BAD = [
    ("esper.r2.health", b"\x00\xffgarbage", "malformed"),
    ("esper.r2.health", b'{"kind":"health","layer_id":1,"health_score":1.5}', "invalid"),
    ("esper.r2.health", b'{"kind":"health","layer_id":-3,"health_score":0.5}', "invalid"),
    ("esper.r2.health", b'{"kind":"teleport","layer_id":1}', "unknown_kind"),
    ("esper.r2.state", b'{"kind":"health","layer_id":1,"health_score":0.5}', "wrong_channel"),
    ("esper.bad!run.health", b'{"kind":"health","layer_id":1,"health_score":0.5}', "bad_subject"),
]


async def test_hand_typed_json_is_accepted_and_counted(
    nats_server: NatsServer, nats_client: Client, tmp_path: Path
) -> None:
    async with running_daemon(daemon_config(nats_server.url, tmp_path)):
        for subject, data in HAND_TYPED:
            await nats_client.publish(subject, data)
        st = await wait_for_status(nats_client, lambda s: s["accepted_total"] >= len(HAND_TYPED))
    assert st["accepted_total"] == len(HAND_TYPED)
    assert st["rejected_total"] == 0
    assert st["accepted_by_kind"] == {"topology": 1, "health": 1, "health_batch": 1, "state": 1, "ack": 1}
    assert st["runs"] == 1
    for key in ("version", "uptime_s", "commands_total", "rejected_by_reason", "policy"):
        assert key in st
    assert set(st["policy"]) >= {"name", "version"}


async def test_msgpack_with_header_is_accepted(
    nats_server: NatsServer, nats_client: Client, tmp_path: Path
) -> None:
    codec = Codec()
    batch = HealthBatch(signals=[HealthSignal(layer_id=i, health_score=0.5) for i in range(16)])
    state = SystemStatePacket(
        epoch=4, val_accuracy=0.7, seeds=[SeedSlotState(layer_id=1, stage=SeedStage.TRAINING)]
    )
    async with running_daemon(daemon_config(nats_server.url, tmp_path)):
        await nats_client.publish(
            "esper.mp.health", codec.encode(batch), headers={"Content-Type": "application/msgpack"}
        )
        await nats_client.publish("esper.mp.state", codec.encode(state))  # sniffed, no header
        st = await wait_for_status(nats_client, lambda s: s["accepted_total"] >= 2)
    assert st["accepted_by_kind"] == {"health_batch": 1, "state": 1}
    assert st["rejected_total"] == 0


async def test_bad_input_is_rejected_counted_and_reported(
    nats_server: NatsServer, nats_client: Client, tmp_path: Path
) -> None:
    reports: list[dict[str, object]] = []

    async def on_report(msg: nats.aio.msg.Msg) -> None:
        reports.append(json.loads(msg.data))

    await nats_client.subscribe("esperd.rejected", cb=on_report)
    async with running_daemon(daemon_config(nats_server.url, tmp_path)):
        for subject, data, _ in BAD:
            await nats_client.publish(subject, data)
        # A good run keeps flowing in between bad messages.
        await nats_client.publish("esper.good.health", b'{"kind":"health","layer_id":0,"health_score":0.8}')
        st = await wait_for_status(nats_client, lambda s: s["rejected_total"] >= len(BAD))
        await asyncio.sleep(0.2)
    expected: dict[str, int] = {}
    for _, _, reason in BAD:
        expected[reason] = expected.get(reason, 0) + 1
    assert st["rejected_by_reason"] == expected
    assert st["accepted_total"] == 1
    reported = {r["reason"] for r in reports}
    assert reported == set(expected)
    sample = next(r for r in reports if r["reason"] == "malformed")
    assert sample["subject"] == "esper.r2.health" and sample["run_id"] == "r2"
    assert "garbage" in str(sample["first_bytes"])


async def test_huge_payload_rejected_others_unaffected(
    nats_server: NatsServer, nats_client: Client, tmp_path: Path
) -> None:
    config = daemon_config(
        nats_server.url, tmp_path, limits={"max_payload_bytes": 1024, "max_batch_signals": 4}
    )
    big = Codec().encode(
        HealthBatch(signals=[HealthSignal(layer_id=i, health_score=0.5) for i in range(200)])
    )
    over = Codec().encode(HealthBatch(signals=[HealthSignal(layer_id=i, health_score=0.5) for i in range(5)]))
    async with running_daemon(config):
        await nats_client.publish("esper.a.health", big)
        await nats_client.publish("esper.a.health", over)
        await nats_client.publish("esper.b.health", b'{"kind":"health","layer_id":0,"health_score":0.8}')
        st = await wait_for_status(nats_client, lambda s: s["accepted_total"] + s["rejected_total"] >= 3)
    assert st["rejected_by_reason"] == {"too_large": 1, "over_limit": 1}
    assert st["accepted_total"] == 1


async def test_micro_service_answers_ping_info_stats(
    nats_server: NatsServer, nats_client: Client, tmp_path: Path
) -> None:
    async with running_daemon(daemon_config(nats_server.url, tmp_path)):
        ping = json.loads((await nats_client.request("$SRV.PING.esperd", b"", timeout=2)).data)
        info = json.loads((await nats_client.request("$SRV.INFO.esperd", b"", timeout=2)).data)
        await status(nats_client)
        stats = json.loads((await nats_client.request("$SRV.STATS.esperd", b"", timeout=2)).data)
    assert ping["name"] == "esperd"
    assert "esperd.status" in [e["subject"] for e in info["endpoints"]]
    assert sum(e["num_requests"] for e in stats["endpoints"]) >= 1


async def test_survives_broker_restart(tmp_path: Path) -> None:
    server = NatsServer(work_dir=tmp_path / "nats")
    server.start()
    try:
        async with running_daemon(daemon_config(server.url, tmp_path / "state")) as service:
            nc = await nats.connect(server.url, reconnect_time_wait=0.2, max_reconnect_attempts=-1)
            await nc.publish("esper.x.health", b'{"kind":"health","layer_id":0,"health_score":0.5}')
            first = await wait_for_status(nc, lambda s: s["accepted_total"] >= 1)
            assert first["accepted_total"] == 1

            server.kill()  # SIGKILL: the broker vanishes mid-stream
            await asyncio.sleep(0.5)
            server.start()  # same port
            # Wait for both clients to be back before publishing again.
            for _ in range(100):
                if nc.is_connected and service.bus.connected and service.bus.reconnects >= 1:
                    break
                await asyncio.sleep(0.1)
            assert service.bus.reconnects >= 1
            await nc.publish("esper.x.health", b'{"kind":"health","layer_id":1,"health_score":0.6}')
            st = await wait_for_status(nc, lambda s: s["accepted_total"] >= 2)
            await nc.close()
        assert st["accepted_total"] == 2
        assert st["nats"]["reconnects"] >= 1
    finally:
        server.stop()


async def test_every_section_of_a_real_status_reply_matches_the_published_schema(
    nats_server: NatsServer, nats_client: Client, tmp_path: Path
) -> None:
    """A daemon with every optional section present (learner, cluster): its reply validates against
    contracts/schema/status.json with the `jsonschema` package (helpers.status checks it), and the
    learner reports its own breaker state."""
    config = daemon_config(
        nats_server.url,
        tmp_path,
        policy={"name": "gnn", "hidden_size": 64, "gnn_layers": 1},
        learner={"algorithm": "ppo", "worker": "thread"},
        cluster={"enabled": True, "instance_id": "solo", "settle_s": 0.0},
    )
    async with running_daemon(config):
        for subject, data in HAND_TYPED:
            await nats_client.publish(subject, data)
        st = await wait_for_status(nats_client, lambda s: s["accepted_total"] >= len(HAND_TYPED))
    assert st["learner"]["algorithm"] == "ppo" and st["learner"]["breaker"] == "closed"
    assert st["cluster"]["instance"] == "solo" and st["cluster"]["members"] == ["solo"]
    assert st["run_table"]["tracked"] == 1 and set(st["tasks"]) >= {"decisions", "learner", "cluster"}
    assert st["scheduler"]["unknown_acks"] == 1  # the hand-typed ack answers no command


async def test_status_round_trips_through_msgspec(
    nats_server: NatsServer, nats_client: Client, tmp_path: Path
) -> None:
    from esperd_contracts.status import Status

    async with running_daemon(daemon_config(nats_server.url, tmp_path)):
        reply = await nats_client.request("esperd.status", b"", timeout=2)
    decoded = msgspec.json.decode(reply.data, type=Status)
    assert decoded.version and decoded.stopping is False


async def test_status_reports_each_runs_analysis(
    nats_server: NatsServer, nats_client: Client, tmp_path: Path
) -> None:
    # Issue 16 item 5: the per-run analysis summary (problematic, needs attention, clusters).
    async with running_daemon(daemon_config(nats_server.url, tmp_path)):
        for subject, data in HAND_TYPED:
            await nats_client.publish(subject, data)
        sick = HealthBatch(signals=[HealthSignal(layer_id=i, health_score=0.1) for i in range(3)])
        await nats_client.publish("esper.r9.health", Codec().encode_json(sick))
        st = await wait_for_status(
            nats_client, lambda s: s["accepted_total"] >= len(HAND_TYPED) + 1 and s["analysis"]["runs"] == 2
        )
    analysis = st["analysis"]
    assert analysis["runs_with_problems"] == 2 and analysis["problematic_layers"] == 4
    r9, r1 = analysis["per_run"]  # the most problematic run first
    assert r9["run_id"] == "r9" and r9["problematic_layers"] == [0, 1, 2]
    assert r9["cluster_layers"] == [[0, 1, 2]]  # an inferred chain: the three are one cluster
    assert r1["run_id"] == "r1" and r1["problematic_layers"] == [1] and r1["clusters"] == 1
