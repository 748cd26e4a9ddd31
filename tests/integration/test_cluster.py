"""Instances on one real broker share the runs through JetStream key-value leases (in-process daemons).

The frozen-instance (SIGSTOP) scenarios with real esperd processes are in test_split_brain.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client
from nats.js.api import KeyValueConfig, StorageType

from esperd.config import Config
from esperd.ops.cluster import ClusterError, LeaseRecord, MemberRecord
from esperd.ops.natsserver import NatsServer
from esperd.ops.ownership import partition_of, targets
from esperd.service import Service
from esperd_contracts import Codec
from tests.integration.helpers import daemon_config, running_daemon
from tests.support.timing import until

RUNS = [f"c{i}" for i in range(24)]
P = 16
CODEC = Codec()


SCHEDULER = {"min_interval_s": 0.05, "cooldown_s": 60.0, "max_wait_ms": 2.0}
POLICY = {"name": "heuristic", "heuristic": {"min_epoch": 3, "train_dwell_epochs": 3, "probation_epochs": 1}}


def cluster_config(url: str, state: Path, name: str, bucket: str, **sections: dict[str, Any]) -> Config:
    cluster = {
        "enabled": True,
        "instance_id": name,
        "heartbeat_s": 0.2,
        "dead_after_s": 1.0,
        "settle_s": 0.3,
        "partitions": P,
        "bucket": bucket,
    }
    return daemon_config(url, state / name, cluster=cluster, **sections)


def fresh_bucket() -> str:
    return f"t{uuid.uuid4().hex[:12]}"  # the session broker outlives each test: no leases shared


async def publish_health(nc: Client, layer: int) -> None:
    for run in RUNS:
        await nc.publish(f"esper.{run}.health", b'{"kind":"health","layer_id":%d,"health_score":0.8}' % layer)
    await nc.flush()


def held(service: Service) -> dict[int, int]:
    assert service.cluster is not None
    return {p: lease.epoch for p, lease in service.cluster.leases.held.items()}


async def test_two_instances_split_the_partitions_and_take_over_on_a_clean_stop(
    nats_server: NatsServer, nats_client: Client, tmp_path: Path
) -> None:
    bucket = fresh_bucket()
    async with running_daemon(cluster_config(nats_server.url, tmp_path, "alpha", bucket)) as alpha:
        bravo_ctx = running_daemon(cluster_config(nats_server.url, tmp_path, "bravo", bucket))
        bravo = await bravo_ctx.__aenter__()
        try:
            await until(lambda: len(held(alpha)) + len(held(bravo)) == P and held(bravo))
            a_parts, b_parts = set(held(alpha)), set(held(bravo))
            assert a_parts == targets("alpha", ["bravo"], P) and b_parts == targets("bravo", ["alpha"], P)
            bravo_epochs = held(bravo)
            await publish_health(nats_client, 0)
            await until(lambda: len(alpha.analyzer) + len(bravo.analyzer) == len(RUNS))
            owned_a, owned_b = set(alpha.analyzer.run_ids()), set(bravo.analyzer.run_ids())
            assert owned_a and owned_b and not owned_a & owned_b
            assert all(partition_of(r, P) in a_parts for r in owned_a)
            assert all(partition_of(r, P) in b_parts for r in owned_b)
            assert alpha.cluster.foreign_messages == len(owned_b)  # type: ignore[union-attr]
            assert bravo.cluster.foreign_messages == len(owned_a)  # type: ignore[union-attr]
            # alpha's view of bravo is as of bravo's last renewal: at most a heartbeat or two behind.
            await until(lambda: alpha.status().cluster.view.members[-1].runs == len(owned_b), timeout=2)  # type: ignore[union-attr]
            view = alpha.status().cluster.view  # type: ignore[union-attr]
            assert [m.instance for m in view.members] == ["alpha", "bravo"]
            assert view.members[1].partitions == sorted(b_parts) and view.unowned_partitions == []
            assert not any(m.stale for m in view.members)
        finally:
            with contextlib.suppress(Exception):
                await bravo_ctx.__aexit__(None, None, None)
        # bravo gave its leases back as it stopped: alpha takes them at its next tick, not after a TTL.
        await until(lambda: len(held(alpha)) == P, timeout=1.0)
        assert all(held(alpha)[p] > bravo_epochs[p] for p in b_parts)  # a newer lease, a newer epoch
        await publish_health(nats_client, 1)
        await until(lambda: len(alpha.analyzer) == len(RUNS))
        status = alpha.status()
        assert status.cluster is not None and status.cluster.members == ["alpha"]
        assert status.cluster.view.left == ["bravo"] and status.cluster.view.gone == []


async def test_a_silent_member_s_leases_expire_and_move_with_newer_epochs(
    nats_server: NatsServer, nats_client: Client, tmp_path: Path
) -> None:
    """A peer that took its partitions and then went silent (as SIGKILL would leave it)."""
    bucket = fresh_bucket()
    js = nats_client.jetstream()
    kv = await js.create_key_value(
        KeyValueConfig(bucket=bucket, history=1, ttl=1.0, storage=StorageType.FILE)
    )
    ghost_parts = targets("ghost", ["solo"], P)
    await kv.put("members.ghost", msgspec.json.encode(MemberRecord(instance="ghost", partition_count=P)))
    ghost_epochs = {p: await kv.create(f"partitions.{p}", b'{"owner":"ghost"}') for p in ghost_parts}
    async with running_daemon(cluster_config(nats_server.url, tmp_path, "solo", bucket)) as solo:
        # solo takes its own share at once; ghost's stay ghost's until they expire at the broker.
        assert set(held(solo)) == set(range(P)) - ghost_parts
        assert "ghost" in solo.cluster.members  # type: ignore[union-attr]
        await until(lambda: len(held(solo)) == P, timeout=5)
        assert all(held(solo)[p] > ghost_epochs[p] for p in ghost_parts)
        assert solo.cluster.members == ["solo"]  # type: ignore[union-attr]
        await publish_health(nats_client, 0)
        await until(lambda: len(solo.analyzer) == len(RUNS))
        record = LeaseRecord(**json.loads((await kv.get(f"partitions.{min(ghost_parts)}")).value))
        assert record.owner == "solo"


async def test_commands_carry_the_epoch_of_their_partition(
    nats_server: NatsServer, nats_client: Client, tmp_path: Path
) -> None:
    commands: list[Any] = []

    async def keep(msg: Any) -> None:
        commands.append(CODEC.decode_command(msg.data, None))

    await nats_client.subscribe("esper.*.command", cb=keep)
    config = cluster_config(
        nats_server.url, tmp_path, "solo", fresh_bucket(), scheduler=SCHEDULER, policy=POLICY
    )
    async with running_daemon(config) as solo:
        await send_germination_bait(nats_client, "fenced-run")
        await until(lambda: bool(commands), timeout=10)
        status = solo.status()
    assert status.cluster is not None
    epoch = status.cluster.partitions[partition_of("fenced-run", P)]
    assert epoch > 0 and {c.epoch for c in commands} == {epoch}


async def test_without_cluster_mode_commands_carry_epoch_zero(
    nats_server: NatsServer, nats_client: Client, tmp_path: Path
) -> None:
    commands: list[Any] = []

    async def keep(msg: Any) -> None:
        commands.append(CODEC.decode_command(msg.data, None))

    await nats_client.subscribe("esper.*.command", cb=keep)
    config = daemon_config(nats_server.url, tmp_path / "single", scheduler=SCHEDULER, policy=POLICY)
    async with running_daemon(config):
        await send_germination_bait(nats_client, "single-run")
        await until(lambda: bool(commands), timeout=10)
    assert {c.epoch for c in commands} == {0}


async def test_each_instance_answers_on_its_own_status_subject(
    nats_server: NatsServer, nats_client: Client, tmp_path: Path
) -> None:
    config = cluster_config(nats_server.url, tmp_path, "statusy", fresh_bucket())
    async with running_daemon(config):
        own = json.loads((await nats_client.request("esperd.status.statusy", b"", timeout=2)).data)
        shared = json.loads((await nats_client.request("esperd.status", b"", timeout=2)).data)
        ping = json.loads((await nats_client.request("$SRV.PING.esperd", b"", timeout=2)).data)
    assert own["instance"] == shared["instance"] == "statusy"
    assert len(own["cluster"]["partitions"]) == P
    assert [m["instance"] for m in own["cluster"]["view"]["members"]] == ["statusy"]
    assert ping["metadata"]["instance"] == "statusy"


async def test_an_instance_with_another_partition_count_refuses_to_start(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """Partition 3 of 16 and partition 3 of 8 hold different runs: both could own one run."""
    bucket = fresh_bucket()
    async with running_daemon(cluster_config(nats_server.url, tmp_path, "sixteen", bucket)) as first:
        odd = cluster_config(nats_server.url, tmp_path, "eight", bucket)
        odd = msgspec.structs.replace(odd, cluster=msgspec.structs.replace(odd.cluster, partitions=8))
        with pytest.raises(ClusterError, match="every instance must use the same number"):
            await Service(odd, env={}).run()
        assert len(held(first)) == P  # the first one was not disturbed
        # The refused one removed its record on the way out.
        await until(lambda: first.cluster.members == ["sixteen"], timeout=2)  # type: ignore[union-attr]
        assert len(held(first)) == P


async def test_cluster_mode_on_a_broker_without_jetstream_fails_clearly(tmp_path: Path) -> None:
    with NatsServer(work_dir=tmp_path / "plain") as plain:  # no store dir: JetStream off
        service = Service(cluster_config(plain.url, tmp_path, "nojs", fresh_bucket()), env={})
        with pytest.raises(ClusterError, match="needs JetStream"):
            await service.run()


async def send_germination_bait(nc: Client, run: str) -> None:
    """Telemetry that makes the heuristic germinate layer 1 (unhealthy and declining, epoch 5)."""
    await nc.publish(
        f"esper.{run}.topology",
        b'{"kind":"topology","nodes":[{"layer_id":0,"name":"stem","layer_type":"conv"},'
        b'{"layer_id":1,"name":"block1","layer_type":"conv"},{"layer_id":2,"name":"head","layer_type":"linear"}],'
        b'"edges":[[0,1],[1,2],[0,2]]}',
    )
    for signals in ([(1, 0.5)], [(0, 0.9), (1, 0.4)], [(1, 0.3)], [(2, 0.95), (1, 0.2)]):
        batch = {"kind": "health_batch", "signals": [{"layer_id": i, "health_score": h} for i, h in signals]}
        await nc.publish(f"esper.{run}.health", json.dumps(batch).encode())
    await nc.publish(f"esper.{run}.state", b'{"kind":"state","epoch":5,"val_accuracy":0.61,"val_loss":1.2}')
    await nc.flush()


def test_the_process_exits_69_with_one_line_when_the_broker_has_no_jetstream(tmp_path: Path) -> None:
    with NatsServer(work_dir=tmp_path / "plain") as plain:
        config = tmp_path / "esperd.toml"
        config.write_text(
            f'[nats]\nservers = ["{plain.url}"]\n[service]\nstate_dir = "{tmp_path / "state"}"\n'
            'log_format = "json"\n[cluster]\nenabled = true\n',
            encoding="utf-8",
        )
        done = subprocess.run(
            [sys.executable, "-m", "esperd.cli", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 69  # ExitCode.UNAVAILABLE: it will not fix itself
    errors = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    failures = [e for e in errors if e["level"] == "error"]
    assert [e["event"] for e in failures] == ["could not start"]
    assert "needs JetStream" in failures[0]["error"]
    assert "Traceback" not in done.stdout + done.stderr


async def test_esperd_status_lists_every_member(nats_server: NatsServer, tmp_path: Path) -> None:
    bucket = fresh_bucket()
    async with (
        running_daemon(cluster_config(nats_server.url, tmp_path, "one", bucket)) as one,
        running_daemon(cluster_config(nats_server.url, tmp_path, "two", bucket)) as two,
    ):
        await until(lambda: len(held(one)) + len(held(two)) == P and bool(held(two)))
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "esperd.cli", "status", "--server", nats_server.url, "--json"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 0, done.stdout + done.stderr
    members = json.loads(done.stdout)["members"]
    assert [m["instance"] for m in members] == ["one", "two"]
    assert all(m["status"]["instance"] == m["instance"] for m in members)
    assert sum(len(m["status"]["cluster"]["partitions"]) for m in members) == P


async def test_esperd_status_of_a_single_cluster_member_prints_its_whole_status(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    config = cluster_config(nats_server.url, tmp_path, "lonely", fresh_bucket())
    async with running_daemon(config):
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "esperd.cli", "status", "--server", nats_server.url],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("esperd ") and "NATS connected" in lines[0]
    assert any(line.split() == ["instance", "lonely"] for line in lines), done.stdout
