"""Splitting the traffic: a real nats-server partition mapping (the README's, as written), each
instance subscribed only to the partitions it holds a lease on."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client

from esperd.client import HostClient
from esperd.config import Config
from esperd.ops.natsserver import NatsServer
from esperd.ops.ownership import partition_of
from esperd.ops.subjectmap import MappingError, mapping_config
from esperd.service import Service
from tests.integration.helpers import daemon_config, running_daemon
from tests.support.timing import until

ROOT = Path(__file__).resolve().parents[2]
P = 32  # the README's block is written for the default partition count
RUNS = [f"m{i}" for i in range(40)]
SCHEDULER = {"min_interval_s": 0.05, "cooldown_s": 60.0, "max_wait_ms": 2.0}
POLICY = {"name": "heuristic", "heuristic": {"min_epoch": 3, "train_dwell_epochs": 3, "probation_epochs": 1}}


def readme_mapping() -> str:
    """The broker config block of the README's "Splitting the traffic", exactly as written."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"```conf\n(.*?)```", text, flags=re.DOTALL) if "mappings = {" in b]
    assert len(blocks) == 1, "README.md must hold exactly one nats-server mappings block"
    return blocks[0]


@pytest.fixture(scope="module")
def mapped_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A nats-server with JetStream (for the leases) and the README's partition mapping."""
    work = tmp_path_factory.mktemp("mapped")
    server = NatsServer(store_dir=work / "js", work_dir=work, config_text=readme_mapping())
    server.start()
    yield server
    server.stop()


def config(url: str, state: Path, name: str, bucket: str, **cluster: Any) -> Config:
    values = {
        "enabled": True,
        "instance_id": name,
        "heartbeat_s": 0.2,
        "dead_after_s": 1.0,
        "settle_s": 0.3,
        "bucket": bucket,
        "mapped_prefix": "esperd.in",
        **cluster,
    }
    return daemon_config(url, state / name, cluster=values, scheduler=SCHEDULER, policy=POLICY)


def held(service: Service) -> set[int]:
    assert service.cluster is not None
    return set(service.cluster.leases.held)


def received(service: Service) -> int:
    """Every inbound message this instance's handler saw."""
    assert service.cluster is not None
    return service.intake.accepted_total + service.intake.rejected_total + service.cluster.foreign_messages


async def publish_round(nc: Client, layer: int) -> None:
    for run in RUNS:
        await nc.publish(f"esper.{run}.health", b'{"kind":"health","layer_id":%d,"health_score":0.8}' % layer)
    await nc.flush()


def test_the_readme_block_is_what_esperd_writes() -> None:
    assert readme_mapping() == mapping_config("esper", "esperd.in", P)


async def test_the_broker_maps_every_run_where_esperd_computes_it(mapped_server: NatsServer) -> None:
    nc = await nats.connect(mapped_server.url)
    mapped: list[str] = []
    plain: list[str] = []

    async def keep_mapped(msg: Any) -> None:
        mapped.append(msg.subject)

    async def keep_plain(msg: Any) -> None:
        plain.append(msg.subject)

    try:
        await nc.subscribe("esperd.in.>", cb=keep_mapped)
        await nc.subscribe("esper.>", cb=keep_plain)
        await nc.flush()
        runs = [f"run-{i}" for i in range(300)] + ["a", "Z_9", "x" * 64]
        for run in runs:
            await nc.publish(f"esper.{run}.state", b"{}")
        await nc.publish("esper.r1.command", b"{}")
        await nc.flush()
        await until(lambda: len(mapped) == len(runs) and bool(plain), timeout=5, what="every message")
    finally:
        await nc.close()
    got = {s.split(".")[3]: int(s.split(".")[2]) for s in mapped}
    assert got == {run: partition_of(run, P) for run in runs}
    assert plain == ["esper.r1.command"]  # commands are not mapped: hosts get them where they listen


async def test_two_instances_each_receive_only_their_partitions_and_take_over(
    mapped_server: NatsServer, tmp_path: Path
) -> None:
    bucket = f"m{uuid.uuid4().hex[:10]}"
    nc = await nats.connect(mapped_server.url)
    try:
        async with running_daemon(config(mapped_server.url, tmp_path, "a", bucket)) as a:
            b_ctx = running_daemon(config(mapped_server.url, tmp_path, "b", bucket))
            b = await b_ctx.__aenter__()
            try:
                await until(lambda: len(held(a)) + len(held(b)) == P and bool(held(b)), what="the split")
                await until(
                    lambda: (
                        a.bus.partition_subscriptions == sorted(held(a))
                        and b.bus.partition_subscriptions == sorted(held(b))
                    ),
                    timeout=3,
                    what="subscriptions to follow the leases",
                )
                await publish_round(nc, 0)
                await until(lambda: received(a) + received(b) == len(RUNS), what="every message, once")
                a_runs, b_runs = set(a.analyzer.run_ids()), set(b.analyzer.run_ids())
                # Nothing arrived twice or at the wrong instance: the broker sent each its own share.
                assert a.cluster is not None and b.cluster is not None
                assert a.cluster.foreign_messages == 0 and b.cluster.foreign_messages == 0
                assert a_runs == {r for r in RUNS if partition_of(r, P) in held(a)}
                assert b_runs == {r for r in RUNS if partition_of(r, P) in held(b)}
                assert a_runs and b_runs
                # A host still gets its command (commands are not mapped) from the run's owner.
                host = await HostClient.connect(mapped_server.url, "m7")
                try:
                    await send_bait(nc, "m7")
                    command = await asyncio.wait_for(host.commands.get(), 10)
                finally:
                    await host.close()
                owner = a if partition_of("m7", P) in held(a) else b
                assert command.epoch == owner.status().cluster.partitions[partition_of("m7", P)]  # type: ignore[union-attr]
            finally:
                await b_ctx.__aexit__(None, None, None)
            # b left cleanly: a takes its partitions, subscribes to them, and receives everything.
            await until(
                lambda: a.bus.partition_subscriptions == list(range(P)), timeout=3, what="a takes over"
            )
            before = received(a)
            await publish_round(nc, 1)
            await until(lambda: received(a) - before == len(RUNS), what="a receives every run")
            assert a.status().cluster.subscribed == list(range(P))  # type: ignore[union-attr]
    finally:
        await nc.close()


async def test_without_the_mapping_on_the_broker_esperd_refuses_to_start(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """The session broker has JetStream but no mapping: subscribing to partitions would hear nothing."""
    service = Service(config(nats_server.url, tmp_path, "deaf", "nomap"), env={})
    with pytest.raises(MappingError, match="does not map esperd.probe"):
        await service.run()


async def test_a_mapping_with_another_partition_count_is_refused(
    mapped_server: NatsServer, tmp_path: Path
) -> None:
    service = Service(config(mapped_server.url, tmp_path, "sixteen", "wrongcount", partitions=16), env={})
    with pytest.raises(MappingError, match="must equal cluster.partitions"):
        await service.run()


async def send_bait(nc: Client, run: str) -> None:
    """Telemetry that makes the heuristic germinate layer 1 (unhealthy and declining, epoch 5)."""
    topology = {
        "kind": "topology",
        "nodes": [
            {"layer_id": 0, "name": "stem", "layer_type": "conv"},
            {"layer_id": 1, "name": "block1", "layer_type": "conv"},
            {"layer_id": 2, "name": "head", "layer_type": "linear"},
        ],
        "edges": [[0, 1], [1, 2], [0, 2]],
    }
    await nc.publish(f"esper.{run}.topology", json.dumps(topology).encode())
    for signals in ([(1, 0.5)], [(0, 0.9), (1, 0.4)], [(1, 0.3)], [(2, 0.95), (1, 0.2)]):
        batch = {"kind": "health_batch", "signals": [{"layer_id": i, "health_score": h} for i, h in signals]}
        await nc.publish(f"esper.{run}.health", json.dumps(batch).encode())
    await nc.publish(f"esper.{run}.state", b'{"kind":"state","epoch":5,"val_accuracy":0.61,"val_loss":1.2}')
    await nc.flush()
