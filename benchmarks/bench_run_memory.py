"""What one tracked run costs in memory, against the run table's estimate (esperd.runs.estimated_bytes).

    .venv/bin/python benchmarks/bench_run_memory.py [--policies heuristic,gnn,lstm] [--strict]

For each policy and graph size, a fresh child process builds a Service (no broker: messages go
through its real handler, intake included; commands are not published), feeds one warm-up run,
then `runs` runs of the same size (a topology, a health batch over every layer, a state packet
that earns a decision) and decides them, so that every per-run owner holds its state: analyzer
tables and windows, the policy's per-run caches, the recorder's open step. It prints the RSS and
the tracemalloc growth per run, the estimate, and estimate / RSS. `--strict` exits 1 if the
estimate is below the measured RSS anywhere (the budget would then under-count).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import subprocess
import sys
import tempfile
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# (layers, edges, runs): small, typical, large, and the per-message limits (4,096 layers, 65,536 edges).
SIZES = [(1, 0, 300), (64, 127, 100), (256, 255, 40), (256, 16_384, 20), (4096, 4095, 8), (4096, 65_536, 8)]


def rss() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmRSS")


def messages(layers: int, edges: int) -> list[tuple[str, bytes]]:
    """(channel, payload) for one run: topology, health over every layer, a state packet."""
    from esperd_contracts import (
        Codec,
        HealthBatch,
        HealthSignal,
        SeedSlotState,
        SeedStage,
        SystemStatePacket,
        TopologyNode,
        TopologyPacket,
    )

    pairs: list[tuple[int, int]] = []
    step = 1
    while len(pairs) < edges and step < layers:  # a DAG: i -> i + step, nearest first
        pairs += [(i, i + step) for i in range(layers - step)][: edges - len(pairs)]
        step += 1
    codec = Codec()
    nodes = [TopologyNode(layer_id=i, layer_type="conv", params=1000, seed_slots=1) for i in range(layers)]
    signals = [HealthSignal(layer_id=i, health_score=0.5) for i in range(layers)]
    seeds = [SeedSlotState(layer_id=min(1, layers - 1), stage=SeedStage.TRAINING, epochs_in_stage=3)]
    return [
        ("topology", codec.encode(TopologyPacket(nodes=nodes, edges=pairs))),
        ("health", codec.encode(HealthBatch(signals=signals))),
        ("state", codec.encode(SystemStatePacket(epoch=1, seeds=seeds))),
    ]


async def measure(policy: str, layers: int, edges: int, runs: int) -> dict[str, float]:
    from esperd.config import config_from_dict
    from esperd.runs import estimated_bytes
    from esperd.service import Service

    async def no_publish(command: object) -> None:
        return None

    with tempfile.TemporaryDirectory() as state_dir:
        config = config_from_dict(
            {
                "service": {"state_dir": state_dir, "device": "cpu", "torch_threads": 1},
                "policy": {"name": policy},
                "analyzer": {"max_runs": 4096, "memory_budget_mb": 1e6},
                "scheduler": {"min_interval_s": 0.0, "max_batch": 8},
            }
        )
        service = Service(config, env={})
        service.decisions.publish = no_publish
        payloads = messages(layers, edges)

        async def feed(run_id: str) -> None:
            for channel, data in payloads:
                await service._on_raw(f"esper.{run_id}.{channel}", data, None)
            await service.decisions.decide_once()

        await feed("warm-up")
        gc.collect()
        rss_before = rss()
        tracemalloc.start()
        traced_before = tracemalloc.get_traced_memory()[0]
        for k in range(runs):
            await feed(f"run-{k}")
        gc.collect()
        traced = (tracemalloc.get_traced_memory()[0] - traced_before) / runs
        measured = (rss() - rss_before) / runs
        tracemalloc.stop()
        assert len(service.runs) == runs + 1 and service.intake.rejected_total == 0
        return {"rss": measured, "traced": traced, "estimate": float(estimated_bytes(layers, edges))}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--policies", default="heuristic,gnn,lstm")
    parser.add_argument("--strict", action="store_true")
    parser.add_argument(
        "--one", nargs=4, metavar=("POLICY", "LAYERS", "EDGES", "RUNS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.one:
        policy, layers, edges, runs = args.one
        print(json.dumps(asyncio.run(measure(policy, int(layers), int(edges), int(runs)))))
        return 0
    print(
        "| policy | layers | edges | runs | RSS KiB/run | traced KiB/run | estimate KiB/run | estimate / RSS "
        "|"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    under = []
    for policy in args.policies.split(","):
        for layers, edges, runs in SIZES:
            out = subprocess.run(
                [sys.executable, __file__, "--one", policy, str(layers), str(edges), str(runs)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            m = json.loads(out.strip().splitlines()[-1])
            ratio = m["estimate"] / max(m["rss"], 1.0)
            print(
                f"| {policy} | {layers} | {edges} | {runs} | {m['rss'] / 1024:.1f} | "
                f"{m['traced'] / 1024:.1f} | "
                f"{m['estimate'] / 1024:.1f} | {ratio:.2f} |",
                flush=True,
            )
            if ratio < 1.0:
                under.append(f"{policy} {layers}x{edges}")
    print(
        f"{'FAIL' if under else 'PASS'}: the estimate bounds the measured RSS per "
        f"run{': ' + ', '.join(under) if under else ''}"
    )
    return 1 if under and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
