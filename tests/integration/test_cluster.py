"""Two esperd instances on one real broker share the runs; a stopped one's runs move over."""

from __future__ import annotations

import contextlib
from pathlib import Path

from nats.aio.client import Client

from esperd.natsserver import NatsServer
from tests.integration.helpers import daemon_config, running_daemon
from tests.support.timing import until

RUNS = [f"c{i}" for i in range(24)]


async def publish_health(nc: Client, layer: int) -> None:
    for run in RUNS:
        await nc.publish(f"esper.{run}.health", b'{"kind":"health","layer_id":%d,"health_score":0.8}' % layer)
    await nc.flush()


async def test_two_instances_split_runs_and_take_over(
    nats_server: NatsServer, nats_client: Client, tmp_path: Path
) -> None:
    def config(name: str):  # type: ignore[no-untyped-def]
        return daemon_config(
            nats_server.url,
            tmp_path / name,
            cluster={
                "enabled": True,
                "instance_id": name,
                "heartbeat_s": 0.2,
                "dead_after_s": 1.0,
                "settle_s": 0.3,
            },
        )

    async with running_daemon(config("alpha")) as alpha:
        bravo_ctx = running_daemon(config("bravo"))
        bravo = await bravo_ctx.__aenter__()
        try:
            await until(lambda: alpha.cluster.membership.members == ("alpha", "bravo"))
            await publish_health(nats_client, 0)
            await until(lambda: len(alpha.analyzer) + len(bravo.analyzer) == len(RUNS))
            owned_a, owned_b = set(alpha.analyzer.run_ids()), set(bravo.analyzer.run_ids())
            assert owned_a and owned_b and not owned_a & owned_b
            assert owned_a | owned_b == set(RUNS)
            assert alpha.foreign_messages == len(owned_b) and bravo.foreign_messages == len(owned_a)
        finally:
            with contextlib.suppress(Exception):
                await bravo_ctx.__aexit__(None, None, None)
        # bravo left cleanly: alpha owns everything at once and takes bravo's runs from their next packets.
        await until(lambda: alpha.cluster.membership.members == ("alpha",))
        await publish_health(nats_client, 1)
        await until(lambda: len(alpha.analyzer) == len(RUNS))
        status = alpha.status()
        assert status.cluster is not None and status.cluster.members == ["alpha"]


async def test_a_silent_instance_is_declared_dead(
    nats_server: NatsServer, nats_client: Client, tmp_path: Path
) -> None:
    config = daemon_config(
        nats_server.url,
        tmp_path / "solo",
        cluster={
            "enabled": True,
            "instance_id": "solo",
            "heartbeat_s": 0.2,
            "dead_after_s": 0.8,
            "settle_s": 0.1,
        },
    )
    async with running_daemon(config) as solo:
        # A peer that announces itself once and then dies without saying goodbye (as SIGKILL would).
        await nats_client.publish("esperd.cluster.heartbeat", b'{"instance_id":"ghost","started_at":0}')
        await nats_client.flush()
        await until(lambda: "ghost" in solo.cluster.membership.members, 3)
        ghost_runs = [r for r in RUNS if not solo.cluster.membership.owns(r)]
        assert ghost_runs
        await until(lambda: solo.cluster.membership.members == ("solo",), 5)
        await publish_health(nats_client, 0)
        await until(lambda: len(solo.analyzer) == len(RUNS))
