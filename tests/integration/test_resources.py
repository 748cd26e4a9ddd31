"""Bounded resources on a real nats-server: runs come and go without leaving state behind, the
run table is capped, and a publisher flood costs counted drops, not memory.

The long version (minutes of runs starting and ending, RSS sampled over time) is `scripts/soak.py`.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client

from esperd.ops.natsserver import NatsServer
from esperd.service import Service
from esperd_contracts import (
    Codec,
    HealthBatch,
    HealthSignal,
    SeedSlotState,
    SeedStage,
    SystemStatePacket,
)
from tests.integration.helpers import daemon_config, running_daemon, status, wait_for_status
from tests.support.packets import chain_topology

CODEC = Codec()
MIB = 2**20
SCHEDULER = {"min_interval_s": 0.05, "cooldown_s": 0.0, "max_wait_ms": 2.0}
POLICY = {"name": "heuristic", "heuristic": {"min_epoch": 0, "train_dwell_epochs": 3}}


async def publish_short_run(nc: Client, run_id: str, layers: int, done: bool) -> None:
    """A whole (short) training run: topology, health, a state packet that earns a command, maybe `done`."""
    await nc.publish(f"esper.{run_id}.topology", CODEC.encode(chain_topology(layers, layer_type="conv")))
    signals = [HealthSignal(layer_id=i, health_score=0.8) for i in range(layers)]
    await nc.publish(f"esper.{run_id}.health", CODEC.encode(HealthBatch(signals=signals)))
    seeds = [SeedSlotState(layer_id=1, stage=SeedStage.TRAINING, epochs_in_stage=3)]
    await nc.publish(f"esper.{run_id}.state", CODEC.encode(SystemStatePacket(epoch=1, seeds=seeds)))
    if done:
        await nc.publish(f"esper.{run_id}.state", CODEC.encode(SystemStatePacket(epoch=2, done=True)))


def per_run_state(service: Service) -> dict[str, int]:
    """Everything esperd keeps per run, by where it lives (all must drain to zero once runs are gone)."""
    scheduler = service.scheduler
    return {
        "run table": len(service.runs),
        "analyzer": len(service.analyzer),
        "recorder": len(service.recorder),
        "policy memory": service.decisions.policy.tracked_runs,
        "rails": service.decisions.rails.tracked_runs if service.decisions.rails is not None else 0,
        "scheduler.due": len(scheduler._due_at),
        "scheduler.heap": len(scheduler._heap),
        "scheduler.last_decided": len(scheduler._last_decided),
        "scheduler.cooldowns": len(scheduler._cooldowns),
        "scheduler.pending": len(scheduler.pending),
    }


async def test_300_short_runs_are_evicted_and_leave_no_per_run_state(
    nats_server: NatsServer, nats_client: Client, tmp_path: Path
) -> None:
    runs, per_tick, tick_s = 300, 3, 0.1
    config = daemon_config(
        nats_server.url,
        tmp_path,
        analyzer={"idle_ttl_s": 1.0, "max_runs": 128},
        scheduler={**SCHEDULER, "max_pending": 64},
        policy=POLICY,
    )
    async with running_daemon(config) as service:
        samples: list[dict[str, Any]] = []
        started = time.monotonic()
        for tick in range(runs // per_tick):  # ~10 s: 30 runs a second, half `done`, half just going silent
            for k in range(per_tick):
                i = tick * per_tick + k
                await publish_short_run(nats_client, f"short-{i:04d}", layers=4 + i % 13, done=i % 2 == 0)
            if tick % 5 == 0:
                samples.append(await status(nats_client))
                samples[-1]["per_run"] = per_run_state(service)
            await asyncio.sleep(max(0.0, started + (tick + 1) * tick_s - time.monotonic()))
        final = await wait_for_status(
            nats_client, lambda s: s["runs"] == 0 and s["evicted_runs"] >= runs, timeout=8.0
        )
        await asyncio.sleep(0.2)  # the decision loop drops the heap's stale entries when it next looks
        leftovers = per_run_state(service)

    assert final["accepted_total"] == runs * 3 + runs // 2 and final["rejected_total"] == 0, final
    # Runs were really live side by side, received decisions, and stayed within the bounds.
    peak = max(s["runs"] for s in samples)
    assert 10 <= peak <= 128, [s["runs"] for s in samples]
    assert final["commands_total"] >= runs // 2
    assert max(s["scheduler"]["queued"] for s in samples) <= 64
    assert final["scheduler"]["overflow"] == 0
    # Every run was evicted exactly once, and nothing is left of any of them.
    assert final["runs"] == 0 and final["evicted_runs"] == runs
    assert final["scheduler"]["queued"] == 0 and final["scheduler"]["pending_commands"] == 0
    assert final["experience"]["runs"] == 0 and final["experience"]["open_steps"] == 0
    assert leftovers == dict.fromkeys(leftovers, 0), leftovers


async def test_max_runs_caps_the_run_table_and_counts_the_refused(
    nats_server: NatsServer, nats_client: Client, tmp_path: Path
) -> None:
    config = daemon_config(nats_server.url, tmp_path, analyzer={"idle_ttl_s": 1.0, "max_runs": 20})
    health = CODEC.encode(HealthSignal(layer_id=0, health_score=0.5))
    async with running_daemon(config):
        for i in range(50):
            await nats_client.publish(f"esper.crowd-{i:02d}.health", health)
        full = await wait_for_status(nats_client, lambda s: s["accepted_total"] + s["rejected_total"] == 50)
        emptied = await wait_for_status(nats_client, lambda s: s["runs"] == 0, timeout=5.0)
        await nats_client.publish("esper.latecomer.health", health)
        after = await wait_for_status(nats_client, lambda s: s["accepted_total"] == 21)
    assert full["runs"] == 20
    assert full["rejected_by_reason"] == {"too_many_runs": 30}
    assert full["accepted_total"] == 20  # each message counted once: the refused are not accepted too
    assert emptied["runs"] == 0 and emptied["evicted_runs"] == 20
    assert after["runs"] == 1 and after["rejected_total"] == 30  # room again once the idle runs are gone


# ------------------------------------------------------------------------------ publisher flood


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise OSError(pid)


async def flood_esperd(url: str, tmp_path: Path, flood: int, limit: int) -> dict[str, Any]:
    """Start `esperd --config` (nats.max_pending_bytes = `limit`), flood one run with `flood` ~1.8 KiB
    health batches from one publisher as fast as it can send, poll status all along, SIGTERM it.
    Returns the settled status, RSS before and after, status latencies and failures, log lines, exit code."""
    config = tmp_path / "esperd.toml"
    config.write_text(
        f"""
[nats]
servers = ["{url}"]
max_pending_bytes = {limit}
[service]
state_dir = "{tmp_path / "state"}"
drain_timeout_s = 5.0
log_level = "warning"
log_format = "json"
torch_threads = 1
device = "cpu"
""",
        encoding="utf-8",
    )
    log_path = tmp_path / "esperd.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(  # noqa: ASYNC220 - returns at once
            [sys.executable, "-m", "esperd.cli", "--config", str(config)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    out: dict[str, Any] = {"latencies": [], "failures": []}
    try:
        control = await nats.connect(url, name="flood-control")
        up = await wait_for_status(control, lambda s: "version" in s, timeout=30)
        assert up.get("version"), "esperd never answered"
        out["rss_before"] = _rss(proc.pid)
        publisher = await nats.connect(url, name="flood", pending_size=256 * MIB)
        signals = [HealthSignal(layer_id=i, health_score=0.5, activation_variance=0.1 * i) for i in range(24)]
        payload = CODEC.encode(HealthBatch(signals=signals))
        flooding = True

        async def poll() -> None:
            while flooding:
                t = time.perf_counter()
                try:
                    await control.request("esperd.status", b"", timeout=5.0)
                    out["latencies"].append(time.perf_counter() - t)
                except Exception as exc:  # noqa: BLE001 - counted
                    out["failures"].append(type(exc).__name__)
                await asyncio.sleep(0.2)

        poller = asyncio.create_task(poll())
        for _ in range(flood):
            await publisher.publish("esper.flooder.health", payload)
        await publisher.flush(timeout=30)
        out["settled"] = await wait_for_status(
            control,
            lambda s: s["accepted_total"] + s["nats"].get("slow_consumer_drops", 0) >= flood,
            timeout=30,
        )
        out["rss_after"] = _rss(proc.pid)
        flooding = False
        await poller
        await publisher.close()
        await control.close()
        out["alive"] = proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out["exit"] = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out["exit"] = proc.wait()
    out["log"] = log_path.read_text(errors="replace").splitlines()
    st = out["settled"]
    print(
        f"flood {flood} x {len(payload)} B, max_pending_bytes {limit}: accepted {st['accepted_total']}, "
        f"drops {st['nats'].get('slow_consumer_drops')}, nats {st['nats']}, RSS "
        f"{out['rss_before'] / MIB:.1f} -> "
        f"{out['rss_after'] / MIB:.1f} MiB, status max {max(out['latencies'], default=0) * 1000:.0f} ms "
        f"({len(out['latencies'])} polls, failures {out['failures']}), log lines {len(out['log'])}"
    )
    return out


def assert_flood_counted(out: dict[str, Any], flood: int, rss_bound: int) -> None:
    st = out["settled"]
    drops = st["nats"].get("slow_consumer_drops", 0)
    assert out["alive"], "esperd died under the flood"
    assert drops > 0, st["nats"]  # esperd could not keep up, and says so
    assert st["accepted_total"] + drops == flood, (
        st["accepted_total"],
        drops,
    )  # each one: handled or counted
    assert st["nats"]["connected"] and st["nats"]["disconnects"] == 0, st[
        "nats"
    ]  # never cut off by the broker
    assert st["nats"]["errors"] == 0 and st["rejected_total"] == 0
    assert out["rss_after"] - out["rss_before"] < rss_bound, (out["rss_before"] / MIB, out["rss_after"] / MIB)
    assert not out["failures"] and out["latencies"], out["failures"]  # status answered all along
    slow = [line for line in out["log"] if "slow consumer" in line]
    assert 1 <= len(slow) <= 10, len(slow)  # rate-limited, not one line per dropped message
    assert all(json.loads(line)["level"] != "error" for line in out["log"] if line.startswith("{"))
    assert out["exit"] == 0, out["log"][-5:]


async def test_a_publisher_flood_is_dropped_and_counted_not_queued(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """50,000 messages (~90 MiB) to one run as fast as one publisher sends them, esperd as a process
    with a 64 KiB pending limit: what it cannot keep up with is dropped by the client and counted
    (nats.slow_consumer_drops), memory stays flat, status keeps answering, the log gets one line per
    10 s rather than one per dropped message, and SIGTERM still exits 0."""
    out = await flood_esperd(nats_server.url, tmp_path, flood=50_000, limit=64 * 1024)
    assert_flood_counted(out, 50_000, rss_bound=24 * MIB)


async def test_a_flood_beyond_the_brokers_max_pending_is_dropped_by_esperd_not_by_the_broker(
    tmp_path: Path,
) -> None:
    """The same flood against a broker whose per-client max_pending (24 MiB) is well under the flood.

    esperd's own limit (8 MiB) must be what applies: its reader keeps pace with the socket and the
    overflow is dropped and counted in esperd. Were the handler to hog the event loop, the reader
    would fall behind, the broker would buffer for esperd until its max_pending and then cut the
    connection (every run's messages lost uncounted, status unanswered until the reconnect).
    """
    server = NatsServer(work_dir=tmp_path / "nats", config_text="max_pending: 25165824\n")
    server.start()
    try:
        out = await flood_esperd(server.url, tmp_path, flood=50_000, limit=8 * MIB)
    finally:
        server.stop()
    broker_log = (tmp_path / "nats" / "nats-server.log").read_text(errors="replace")
    assert "Slow Consumer" not in broker_log
    assert_flood_counted(out, 50_000, rss_bound=48 * MIB)
