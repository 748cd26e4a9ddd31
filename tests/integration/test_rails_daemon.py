"""Evidence for the rails (issue 17): a deliberately bad policy, one that germinates at every
decision with full confidence, driven through a real daemon and a real nats-server against
simulated hosts. Commands per run stay within the rate cap, the parameters seeds add stay within
the budget, and status, metrics and the `esperd.blocked` reports agree on what was blocked."""

from __future__ import annotations

import asyncio
import collections
import json
import urllib.request
from pathlib import Path

from nats.aio.client import Client
from nats.aio.msg import Msg

from esperd.cli.watch import blocked_line
from esperd.client import HostClient
from esperd.ops.natsserver import NatsServer
from esperd.sim import SimConfig
from esperd.sim.host import SimHosts
from esperd_contracts import BLOCKED_SUBJECT, Codec, Op, SystemStatePacket
from esperd_examples.host.tasks import benchmark_task
from esperd_examples.host.train import HostRun
from tests.integration.helpers import daemon_config, running_daemon, status, wait_for_status
from tests.support import badpolicy  # registers "always_germinate"

assert badpolicy.AlwaysGerminate.name == "always_germinate"

SIM = SimConfig(
    epochs=30, onset_fraction=0.0, degrade_epochs=2, min_deficits=2, max_deficits=3, report_budget=False
)
CAP = 6
BUDGET = 0.1


async def test_a_policy_that_always_germinates_stays_on_the_rails(
    nats_server: NatsServer, nats_client: Client, tmp_path: Path
) -> None:
    sections = {
        "scheduler": {"min_interval_s": 0.0, "cooldown_s": 0.0, "max_wait_ms": 1.0},
        "policy": {"name": "always_germinate"},
        "learner": {"algorithm": "off"},
        "metrics": {"listen": "127.0.0.1:0"},
        # A window longer than the test: the cap bounds every run's whole episode.
        "rails": {"max_commands_per_window": CAP, "command_window_s": 600.0, "param_budget": BUDGET},
    }
    growth: dict[str, float] = collections.defaultdict(float)
    reports: list[dict[str, object]] = []
    codec = Codec()

    async def on_state(msg: Msg) -> None:
        packet = codec.decode(msg.data, msg.headers.get("Content-Type") if msg.headers else None)
        if isinstance(packet, SystemStatePacket) and packet.host_params:
            run = msg.subject.split(".")[1]
            added = (packet.total_params - packet.host_params) / packet.host_params
            growth[run] = max(growth[run], added)

    async def on_blocked(msg: Msg) -> None:
        reports.append(json.loads(msg.data))

    await nats_client.subscribe("esper.*.state", cb=on_state)
    await nats_client.subscribe(BLOCKED_SUBJECT, cb=on_blocked)
    await nats_client.flush()
    commands: collections.Counter[str] = collections.Counter()
    async with running_daemon(daemon_config(nats_server.url, tmp_path, **sections)) as service:
        hosts = SimHosts(
            nats_server.url,
            4,
            config=SIM,
            seed=3,
            epoch_s=0.05,
            episodes=1,
            session="",
            on_command=lambda run, command, applied, reason: commands.update([run]),
        )
        stats = await asyncio.wait_for(hosts.run(), timeout=60)
        st = await wait_for_status(
            nats_client,
            lambda s: (
                sum(s["acks_by_status"].values()) >= stats.commands
                and len(reports) >= s["rails"]["blocked_total"]
            ),
            timeout=10,
        )
        assert service._metrics is not None
        port = service._metrics.port
        metrics = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        )
        st = await status(nats_client)
    rails = st["rails"]
    # The policy never stops asking: without the rails every decision would be a command.
    assert stats.by_op.get("germinate", 0) == stats.commands > 0
    assert rails["blocked_total"] > stats.commands, (rails, stats)
    # A tight budget (10% of the host): the parameter rail binds, as do the others.
    assert {"param_budget", "command_rate"} <= set(rails["blocked_by_rail"]), rails
    # Commands per run within the cap; added parameters within the budget.
    assert commands and set(commands) <= {f"sim-{i}-0" for i in range(4)}
    assert max(commands.values()) <= CAP, commands
    assert growth and max(growth.values()) <= BUDGET, dict(growth)
    # The counters match: status by rail, the reports `esperd watch` shows, the metrics, and
    # what the decision loop did (every blocked decision became a WAIT, none was sent).
    assert sum(rails["blocked_by_rail"].values()) == rails["blocked_total"] == len(reports)
    assert collections.Counter(r["rail"] for r in reports) == rails["blocked_by_rail"]
    assert {r["op"] for r in reports} == {"germinate"}
    assert st["decisions"]["waits"] >= rails["blocked_total"]
    assert st["commands_total"] == stats.commands == sum(commands.values())
    for rail, count in rails["blocked_by_rail"].items():
        assert (
            f'esperd_rail_blocks_total{{esperd_instance="{service.instance}",rail="{rail}"}} {float(count)}'
            in metrics
        )


LIVE = {"germinated", "training", "blending", "probationary"}


async def test_runs_share_a_seed_pool_through_a_real_daemon(
    nats_server: NatsServer, nats_client: Client, tmp_path: Path
) -> None:
    """Four runs, a policy that always germinates, a pool of two seeds across them: at no report
    do the runs hold more than two live seeds between them (without the pool: 16), and the pool
    is what blocks."""
    pool = 2
    sections = {
        "scheduler": {"min_interval_s": 0.0, "cooldown_s": 0.0, "max_wait_ms": 1.0},
        "policy": {"name": "always_germinate"},
        "learner": {"algorithm": "off"},
        "rails": {"max_seeds_total": pool, "param_budget": 1.0, "max_active_seeds": 4},
    }
    live: dict[str, int] = {}
    most_live = 0
    codec = Codec()
    reports: list[dict[str, object]] = []

    async def on_blocked(msg: Msg) -> None:
        reports.append(json.loads(msg.data))

    async def on_state(msg: Msg) -> None:
        nonlocal most_live
        packet = codec.decode(msg.data, msg.headers.get("Content-Type") if msg.headers else None)
        if isinstance(packet, SystemStatePacket):
            live[msg.subject.split(".")[1]] = sum(s.stage.value in LIVE for s in packet.seeds)
            most_live = max(most_live, sum(live.values()))

    await nats_client.subscribe("esper.*.state", cb=on_state)
    await nats_client.subscribe(BLOCKED_SUBJECT, cb=on_blocked)
    await nats_client.flush()
    async with running_daemon(daemon_config(nats_server.url, tmp_path, **sections)):
        hosts = SimHosts(nats_server.url, 4, config=SIM, seed=5, epoch_s=0.05, episodes=1, session="")
        stats = await asyncio.wait_for(hosts.run(), timeout=60)
        st = await wait_for_status(
            nats_client,
            lambda s: (
                sum(s["acks_by_status"].values()) >= stats.commands
                and len(reports) >= s["rails"]["blocked_total"]
            ),
            timeout=10,
        )
    rails = st["rails"]
    assert stats.by_op.get("germinate", 0) == stats.commands > 0
    assert 0 < most_live <= pool, (most_live, live)
    assert rails["seed_pool"] == pool and rails["seed_pool_live"] <= pool
    assert rails["blocked_by_rail"].get("seed_pool", 0) + rails["masked_by_rail"].get("seed_pool", 0) > 0
    # `esperd watch` sees every block the status counts, by the rail that made it.
    assert collections.Counter(r["rail"] for r in reports) == rails["blocked_by_rail"]
    pool_lines = [blocked_line(r) for r in reports if r["rail"] == "seed_pool"]
    assert all(f"(pool of {pool})" in line for line in pool_lines), pool_lines[:3]


async def test_the_budget_holds_on_a_real_host_whose_seeds_outsize_their_layers(
    nats_server: NatsServer, nats_client: Client, tmp_path: Path
) -> None:
    # The MLP student's layers are 8 wide: an `mlp` seed there has 8x its layer's parameters,
    # far above the rails' estimate. The host enforces each GERMINATE's max_seed_params.
    budget = 0.5
    sections = {
        "scheduler": {"min_interval_s": 0.0, "cooldown_s": 0.0, "max_wait_ms": 1.0},
        "policy": {"name": "always_germinate"},
        "learner": {"algorithm": "off"},
        "rails": {"param_budget": budget, "max_active_seeds": 3},
    }
    config = benchmark_task("teacher").config(0, epochs=4, epoch_pause_s=0.3, log=None)
    async with running_daemon(daemon_config(nats_server.url, tmp_path, **sections)):
        client = await HostClient.connect(nats_server.url, "narrow")
        try:
            report = await asyncio.wait_for(HostRun(config, link=client).run(), timeout=60)
        finally:
            await client.close()
    germinations = [r for r in report.commands if r.command.op is Op.GERMINATE]
    assert germinations and all(r.command.max_seed_params > 0 for r in germinations)
    assert any(r.applied for r in germinations), [r.reason for r in germinations]
    oversized = [r for r in germinations if "over the command's max_seed_params" in r.reason]
    assert oversized, [r.reason for r in germinations]  # the estimate alone would have let them in
    final = report.final
    assert final.total_params - final.host_params <= budget * final.host_params, final
