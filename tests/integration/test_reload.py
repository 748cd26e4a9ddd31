"""SIGHUP reloads: `esperd --config FILE` as a process on a real nats-server, real signals.

What a reload applies live (log level, [scheduler], [limits], a new [policy] checkpoint swapped
in as the next version), what it reports as needing a restart, and what it refuses as a whole
(an invalid file, a corrupt or mismatched checkpoint: the old policy keeps serving). With a
learner, the reloaded weights become the learner's and learning goes on from them. (Before:
SIGHUP killed esperd at once, without a drain or a final checkpoint.)
"""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client

from esperd.ops.natsserver import NatsServer
from esperd.policy import PolicyConfig, create_policy
from esperd.policy.checkpoint import save_policy_checkpoint
from tests.integration.test_faults import (
    PPO_FAST,
    START_TIMEOUT_S,
    Esperd,
    config_dict,
    esperd_process,
    ready,
    sim_hosts,
    wait_status,
    write_config,
)

pytestmark = pytest.mark.timeout(300)

GNN = {"name": "gnn", "hidden_size": 64, "gnn_layers": 2}


def save_gnn(path: Path, version: int, seed: int, hidden: int = 64) -> Path:
    policy = create_policy("gnn", PolicyConfig(name="gnn", hidden_size=hidden, gnn_layers=2, init_seed=seed))
    policy.version = version
    save_policy_checkpoint(path, policy)
    return path


def topology(nodes: int) -> bytes:
    return json.dumps(
        {
            "kind": "topology",
            "nodes": [{"layer_id": i, "name": f"l{i}", "layer_type": "linear"} for i in range(nodes)],
            "edges": [[i, i + 1] for i in range(nodes - 1)],
        }
    ).encode()


def rewrite(config: Path, raw: dict[str, Any] | str) -> None:
    if isinstance(raw, str):
        config.write_text(raw, encoding="utf-8")
    else:
        write_config(config, raw)


async def reload_with(
    nc: Client, daemon: Esperd, config: Path, raw: dict[str, Any] | str, count: str, at_least: int
) -> dict[str, Any]:
    """Write the config (a dict, or raw text), SIGHUP, and wait until status counts the reload."""
    rewrite(config, raw)
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGHUP)
    return await wait_status(
        nc, daemon, lambda s: s.get("reload", {}).get(count, 0) >= at_least, 60, f"reload {count} {at_least}"
    )


async def over_limit_rejections(nc: Client, daemon: Esperd, nodes: int) -> int:
    """Publish a topology of `nodes` nodes; the over_limit count once esperd has judged it."""
    before = await wait_status(nc, daemon, lambda s: True, 10, "status")
    seen = before["accepted_total"] + before["rejected_total"]
    await nc.publish("esper.reload-probe.topology", topology(nodes))
    after = await wait_status(
        nc, daemon, lambda s: s["accepted_total"] + s["rejected_total"] > seen, 10, "the topology judged"
    )
    return int(after["rejected_by_reason"].get("over_limit", 0))


async def test_sighup_applies_live_settings_swaps_checkpoints_and_refuses_bad_ones(
    nats_server: NatsServer, nats_client: Client, tmp_path: Path
) -> None:
    first = save_gnn(tmp_path / "first.safetensors", version=5, seed=1)
    second = save_gnn(tmp_path / "second.safetensors", version=9, seed=2)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00not a safetensors file" * 10)
    mismatched = save_gnn(tmp_path / "wide.safetensors", version=3, seed=1, hidden=128)
    base = config_dict(
        nats_server.url,
        tmp_path / "state",
        policy={**GNN, "checkpoint": str(first)},
        service={"log_level": "warning"},
    )
    path = write_config(tmp_path / "esperd.toml", base)

    async with esperd_process(path, tmp_path / "esperd.log") as daemon:
        start = await wait_status(nats_client, daemon, ready, START_TIMEOUT_S, "esperd ready")
        assert start["policy"] == {"name": "gnn", "version": 5, "fallback_reason": ""}
        assert await over_limit_rejections(nats_client, daemon, 6) == 0

        # 1. Live settings and a new checkpoint; one change that needs a restart.
        changed = config_dict(
            nats_server.url,
            tmp_path / "state",
            policy={**GNN, "checkpoint": str(second)},
            service={"log_level": "info"},
            scheduler={"cooldown_s": 7.0},
            limits={"max_nodes": 4},
            analyzer={"idle_ttl_s": 30.0},
        )
        one = await reload_with(nats_client, daemon, path, changed, "reloads", 1)
        assert one["policy"]["version"] == 6  # the running version + 1, not the file's 9
        assert one["reload"]["applied"] == [
            "limits.max_nodes",
            "policy.checkpoint",
            "scheduler.cooldown_s",
            "service.log_level",
        ]
        assert one["reload"]["needs_restart"] == ["analyzer.idle_ttl_s"]
        assert one["reload"]["last_error"] == "" and one["reload"]["last_at"]
        assert await over_limit_rejections(nats_client, daemon, 6) == 1  # max_nodes 4 applies now
        # At level "warning" this info line would have been dropped: the new level is in force.
        assert daemon.events("config reloaded")
        assert daemon.events("config changes need a restart to apply")[0]["keys"] == ["analyzer.idle_ttl_s"]

        # 2. The same path, new contents: swapped in too. Nothing else changed: no swap without one.
        save_gnn(second, version=1, seed=3)
        two = await reload_with(nats_client, daemon, path, changed, "reloads", 2)
        assert two["policy"]["version"] == 7 and two["reload"]["applied"] == ["policy.checkpoint"]
        three = await reload_with(nats_client, daemon, path, changed, "reloads", 3)
        assert three["policy"]["version"] == 7 and three["reload"]["applied"] == []

        # 3. Refused as a whole: a corrupt checkpoint, a mismatched one, an invalid file.
        relaxed = {**changed, "limits": {"max_nodes": 4096}}
        bad = await reload_with(
            nats_client,
            daemon,
            path,
            {**relaxed, "policy": {**GNN, "checkpoint": str(garbage)}},
            "refused",
            1,
        )
        assert "corrupt or unreadable" in bad["reload"]["last_error"]
        assert bad["policy"]["version"] == 7 and bad["reload"]["reloads"] == 3
        assert await over_limit_rejections(nats_client, daemon, 6) == 2  # max_nodes 4 still: nothing applied
        wide = await reload_with(
            nats_client,
            daemon,
            path,
            {**relaxed, "policy": {**GNN, "checkpoint": str(mismatched)}},
            "refused",
            2,
        )
        assert "architecture" in wide["reload"]["last_error"] and wide["policy"]["version"] == 7
        invalid = await reload_with(nats_client, daemon, path, "[limits\nmax_nodes = 2\n", "refused", 3)
        assert "not valid TOML" in invalid["reload"]["last_error"] and invalid["policy"]["version"] == 7
        assert len(daemon.events("reload refused; nothing changed")) == 3

        code = daemon.sigterm()
    assert code == 0, daemon.tail()


async def test_sighup_while_starting_is_survived_and_handled_once_ready(
    nats_server: NatsServer, nats_client: Client, tmp_path: Path
) -> None:
    path = write_config(tmp_path / "esperd.toml", config_dict(nats_server.url, tmp_path / "state"))
    async with esperd_process(path, tmp_path / "esperd.log") as daemon:
        await asyncio.sleep(0.5)  # still importing torch
        assert daemon.proc is not None and daemon.alive()
        daemon.proc.send_signal(signal.SIGHUP)
        st = await wait_status(
            nats_client,
            daemon,
            lambda s: s.get("reload", {}).get("reloads", 0) == 1,
            START_TIMEOUT_S,
            "reload",
        )
        # The file was read after the signal came: the reload finds nothing new to apply.
        assert st["reload"]["applied"] == [] and st["reload"]["needs_restart"] == []
        assert daemon.sigterm() == 0, daemon.tail()


async def test_sighup_checkpoint_becomes_the_learners_and_learning_goes_on(
    nats_server: NatsServer, nats_client: Client, tmp_path: Path
) -> None:
    outside = save_gnn(tmp_path / "outside.safetensors", version=40, seed=5)
    learner = {"algorithm": "ppo", "checkpoint_interval_s": 3600.0, "ppo": PPO_FAST}
    raw = config_dict(nats_server.url, tmp_path / "state", policy=GNN, learner=learner)
    path = write_config(tmp_path / "esperd.toml", raw)
    async with esperd_process(path, tmp_path / "esperd.log") as daemon:
        await wait_status(nats_client, daemon, ready, START_TIMEOUT_S, "esperd ready")
        async with sim_hosts(nats_server.url, 4, epoch_s=0.05):
            learning = await wait_status(
                nats_client, daemon, lambda s: s["learner"]["updates"] >= 2, 120, "learning"
            )
            reloaded = {**raw, "policy": {**GNN, "checkpoint": str(outside)}}
            after = await reload_with(nats_client, daemon, path, reloaded, "reloads", 1)
            assert after["reload"]["applied"] == ["policy.checkpoint"]
            await wait_status(
                nats_client,
                daemon,
                lambda s: s["learner"]["updates"] >= after["learner"]["updates"] + 3,
                120,
                "learning after the reload",
            )
        code = daemon.sigterm()
    assert code == 0, daemon.tail()
    assert learning["policy"]["version"] >= 2
    swapped_in = daemon.events("policy checkpoint swapped in")
    assert len(swapped_in) == 1
    # Every version the learner served and the one the reload served form one sequence, +1 each:
    # the swap is a learner swap, never two bundles under one number.
    versions = [e["version"] for e in daemon.events() if e.get("event") == "policy swapped"]
    assert versions == list(range(versions[0], versions[0] + len(versions))), versions
    assert swapped_in[0]["version"] in versions and swapped_in[0]["version"] < versions[-1]
    assert swapped_in[0]["version"] != 40  # the running version + 1, not the file's
