"""Decisions per second at saturation: the daemon's decision loop against the policy's own batched act.

    .venv/bin/python benchmarks/bench_saturation.py [--policy gnn] [--runs 1024] [--layers 20]
                                                    [--batch 64] [--rounds 5] [--threads 1] [--strict]

One process, a real nats-server for the commands. The daemon is `esperd.service.Service` (policy
`--policy` with its default config, untrained weights; scheduler `max_batch = --batch`,
`min_interval_s = cooldown_s = 0`), connected to the broker, with `--runs` runs set up through its
message handler (`Service._on_raw`: a topology of `--layers` layers, a chain with a skip over every
other layer, and a 20-signal health batch each). Every run is due; nothing else runs.

Each round:
  * policy alone: `policy.act(batch)` on the daemon's own observations of `--batch` runs (the
    same graphs, caches warm), repeated over all runs: decisions/s = runs / time;
  * decision loop: every run is made due, and `DecisionLoop.decide_once` runs until none is
    left: observations (analyzer), cooling masks, the same `act`, decisions built, commands
    encoded and published to the broker, the recorder's hook: decisions/s = runs / time;
  * daemon with its input: a state packet per run through the handler (decode, run table,
    analyzer, recorder, scheduler), then the decision loop as above.

Printed: medians over `--rounds`, and each daemon figure / the policy's in the same round.
Budget (PASS/FAIL; `--strict` exits 1 on FAIL): decision loop >= 0.5x the policy's act.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from esperd_contracts import (  # noqa: E402 - after the path set-up, so the script runs from anywhere
    MSGPACK,
    Channel,
    Codec,
    HealthBatch,
    HealthSignal,
    SeedSlotState,
    SeedStage,
    SystemStatePacket,
    TopologyNode,
    TopologyPacket,
    run_subject,
)

BUDGET_RATIO = 0.5


def topology(layers: int) -> TopologyPacket:
    kinds = ["conv", "attention", "mlp"]
    nodes = [
        TopologyNode(layer_id=i, name=f"l{i}", layer_type=kinds[min(i * 3 // layers, 2)], params=50_000)
        for i in range(layers)
    ]
    edges = [(i, i + 1) for i in range(layers - 1)] + [(i, i + 2) for i in range(0, layers - 2, 2)]
    return TopologyPacket(nodes=nodes, edges=edges, topology_version=1)


def health(layers: int, k: int) -> HealthBatch:
    return HealthBatch(
        signals=[
            HealthSignal(
                layer_id=i,
                health_score=0.4 + 0.5 * ((i * 7 + k) % 10) / 10,
                activation_variance=0.5,
                dead_neuron_ratio=0.05,
                gradient_norm=0.8,
                total_seeds=1,
            )
            for i in range(layers)
        ]
    )


def state(epoch: int, layers: int, k: int) -> SystemStatePacket:
    seeds = [SeedSlotState(layer_id=k % layers, stage=SeedStage.TRAINING, epochs_in_stage=4, params=12_000)]
    return SystemStatePacket(
        epoch=epoch,
        train_loss=0.6,
        val_loss=0.7,
        val_accuracy=0.78,
        seeds=seeds,
        host_params=1_000_000,
        total_params=1_012_000,
        total_epochs=100,
    )


def config(url: str, state_dir: str, args: argparse.Namespace) -> Any:
    from esperd.config import config_from_dict

    return config_from_dict(
        {
            "nats": {"servers": [url]},
            "service": {
                "state_dir": state_dir,
                "device": "cpu",
                "torch_threads": args.threads,
                "log_level": "warning",
            },
            "scheduler": {
                "min_interval_s": 0.0,
                "cooldown_s": 0.0,
                "max_batch": args.batch,
                "max_pending": max(4096, args.runs),
            },
            "policy": {"name": args.policy},
            "analyzer": {"max_runs": args.runs + 16, "memory_budget_mb": 1e5},
        }
    )


async def bench(args: argparse.Namespace) -> int:
    from esperd.logs import configure_logging
    from esperd.ops.natsserver import NatsServer
    from esperd.service import Service

    configure_logging("warning", "console", stream=sys.stderr)
    codec = Codec()
    run_ids = [f"sat-{i}" for i in range(args.runs)]
    with tempfile.TemporaryDirectory() as workdir, NatsServer(work_dir=workdir) as server:
        service = Service(config(server.url, os.path.join(workdir, "state"), args), env={})
        await service.bus.connect()
        topo = codec.encode(topology(args.layers))
        for k, run_id in enumerate(run_ids):
            await service._on_raw(run_subject(run_id, Channel.TOPOLOGY), topo, MSGPACK)
            await service._on_raw(
                run_subject(run_id, Channel.HEALTH), codec.encode(health(args.layers, k)), MSGPACK
            )
        rows = []
        for r in range(args.rounds + 1):  # the first is a warm-up
            rows.append(await one_round(service, codec, run_ids, args, epoch=10 + r))
        await service.bus.close(5.0)
        service.decisions.close()
    return report(args, rows[1:])


async def one_round(
    service: Any, codec: Any, run_ids: list[str], args: argparse.Namespace, epoch: int
) -> dict[str, float]:
    decisions, scheduler, policy = service.decisions, service.scheduler, service.decisions.policy
    states = [codec.encode(state(epoch, args.layers, k)) for k in range(len(run_ids))]
    subjects = [run_subject(run_id, Channel.STATE) for run_id in run_ids]
    # Policy alone, on the daemon's own observations.
    observations = service._observe(run_ids)
    started = time.perf_counter()
    for first in range(0, len(observations), args.batch):
        policy.act(observations[first : first + args.batch], False)
    act_s = time.perf_counter() - started
    # The decision loop alone: every run due, decided until none is left.
    before = decisions.stats.decisions
    for run_id in run_ids:
        scheduler.mark_due(run_id)
    started = time.perf_counter()
    while scheduler.queued:
        await decisions.decide_once()
    loop_s = time.perf_counter() - started
    decided = decisions.stats.decisions - before
    # With its input: a state packet per run through the handler, then the loop.
    before = decisions.stats.decisions
    started = time.perf_counter()
    for subject, payload in zip(subjects, states, strict=True):
        await service._on_raw(subject, payload, MSGPACK)
    while scheduler.queued:
        await decisions.decide_once()
    full_s = time.perf_counter() - started
    decided_full = decisions.stats.decisions - before
    await service.bus.nc.flush()
    return {
        "act": len(observations) / act_s,
        "loop": decided / loop_s,
        "full": decided_full / full_s,
        "decided": decided,
        "commands": decisions.stats.commands,
    }


def report(args: argparse.Namespace, rows: list[dict[str, float]]) -> int:
    print(
        f"{args.policy} policy, {args.runs} runs of {args.layers} layers, batches of {args.batch}, "
        f"{args.threads} torch thread(s), load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    print()
    print(f"{'round':>5} {'act/s':>10} {'loop/s':>10} {'loop/act':>9} {'with input/s':>13} {'input/act':>10}")
    for k, row in enumerate(rows):
        print(
            f"{k + 1:>5} {row['act']:>10,.0f} {row['loop']:>10,.0f} {row['loop'] / row['act']:>8.2f}x"
            f" {row['full']:>13,.0f} {row['full'] / row['act']:>9.2f}x"
        )
    act = statistics.median(r["act"] for r in rows)
    loop = statistics.median(r["loop"] for r in rows)
    full = statistics.median(r["full"] for r in rows)
    ratio = statistics.median(r["loop"] / r["act"] for r in rows)
    full_ratio = statistics.median(r["full"] / r["act"] for r in rows)
    print()
    print(
        f"median decisions/s: policy act {act:,.0f}, decision loop {loop:,.0f} ({ratio:.2f}x), "
        f"with the state packets' ingest {full:,.0f} ({full_ratio:.2f}x)"
    )
    print(f"commands published: {int(rows[-1]['commands'])}")
    ok = ratio >= BUDGET_RATIO
    print(f"{'PASS' if ok else 'FAIL'}  decision loop / policy act: {ratio:.2f} >= {BUDGET_RATIO}")
    return 0 if ok or not args.strict else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", default="gnn")
    parser.add_argument("--runs", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64, help="scheduler max_batch (and the act batch)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="[service] torch_threads")
    parser.add_argument("--strict", action="store_true", help="exit 1 on a FAIL")
    args = parser.parse_args()
    print(f"CPython {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs")
    return asyncio.run(bench(args))


if __name__ == "__main__":
    sys.exit(main())
