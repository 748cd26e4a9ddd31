"""Policy decision latency: one batched forward for B runs vs one forward per run in a loop.

    .venv/bin/python benchmarks/bench_policy.py [--reps 21] [--device cpu|cuda|all] [--threads 1] [--strict]

For gnn, lstm and heuristic, graphs of ~12 and ~64 nodes, B in 1/8/32/64 runs, it
prints the median wall time of `policy.act(batch)` (whole batch, collation and
decision building included) and of `for obs in batch: policy.act([obs])`, per
batch and per decision, and the loop/batched ratio. Also times our numpy
collation against torch_geometric's Batch.from_data_list. The seed documents'
budget is < 10 ms per decision: PASS/FAIL lines check the batched per-decision
median (`--strict` exits 1 on a FAIL). Absolute numbers are for this machine only.

One intra-op thread by default: on a small shared machine, torch's default (one
thread per core) makes OpenMP workers wait on descheduled peers and single
decisions swing widely (benchmarks/RESULTS.md); pass --threads 0 to see torch's default.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.support (not installed)
from esperd.analyzer.observation import Observation
from esperd.policy import PolicyConfig, create_policy
from esperd.policy.batch import collate
from tests.support.observations import make_observation, random_stages

POLICIES = ("gnn", "lstm", "heuristic")
NODES = (12, 64)
BATCHES = (1, 8, 32, 64)
BUDGET_MS = 10.0


def observations(num_nodes: int, count: int) -> list[Observation]:
    """`count` runs of about `num_nodes` layers (sizes vary +-25 %), mixed seed stages."""
    out = []
    for i in range(count):
        n = max(2, num_nodes + (i % 7 - 3) * num_nodes // 12)
        out.append(make_observation(f"run-{i}", n, seed=i, stages=random_stages(n, 1000 + i)))
    return out


def median_ms(fn: Callable[[], object], reps: int, sync: Callable[[], None]) -> float:
    return interleaved_medians([fn], reps, sync)[0]


def interleaved_medians(
    fns: Sequence[Callable[[], object]], reps: int, sync: Callable[[], None]
) -> list[float]:
    """Median ms of each fn; reps alternate between the fns so background load hits all alike."""
    for fn in fns:  # warm-up (allocator, lazy init)
        fn()
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, out in zip(fns, times, strict=True):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            out.append(time.perf_counter() - start)
    return [statistics.median(t) * 1e3 for t in times]


def bench_collate(obs: Sequence[Observation], reps: int) -> tuple[float, float]:
    from torch_geometric.data import Batch, Data

    def pyg() -> object:
        data = [
            Data(
                x=torch.from_numpy(o.node_features),
                edge_index=torch.from_numpy(o.gcn_edge_index),
                edge_weight=torch.from_numpy(o.gcn_edge_weight),
            )
            for o in obs
        ]
        return Batch.from_data_list(data)

    cpu = torch.device("cpu")
    nosync = lambda: None  # noqa: E731
    return median_ms(lambda: collate(obs, cpu), reps, nosync), median_ms(pyg, reps, nosync)


def run(device: torch.device, reps: int) -> list[tuple[str, float]]:
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    print(f"\n== device {device} ==")
    header = ("policy", "nodes", "B", "batched ms", "per dec", "loop ms", "per dec", "loop/batched")
    widths = (-10, 6, 5, 12, 10, 11, 10, 14)
    print("".join(f"{h:<{-w}}" if w < 0 else f"{h:>{w}}" for h, w in zip(header, widths, strict=True)))
    budget: list[tuple[str, float]] = []
    for name in POLICIES:
        policy = create_policy(name, PolicyConfig(name=name), device)
        for nodes in NODES:
            pool = observations(nodes, max(BATCHES))
            for b in BATCHES:
                batch = pool[:b]
                batched, looped = interleaved_medians(
                    [
                        lambda p=policy, obs=batch: p.act(obs),
                        lambda p=policy, obs=batch: [p.act([o]) for o in obs],
                    ],
                    reps,
                    sync,
                )
                print(
                    f"{name:<10}{nodes:>6}{b:>5}{batched:>12.3f}{batched / b:>10.3f}"
                    f"{looped:>11.3f}{looped / b:>10.3f}{looped / batched:>13.1f}x"
                )
                budget.append((f"{device.type} {name} {nodes} nodes B={b}", batched / b))
    return budget


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=21)
    parser.add_argument("--device", choices=("cpu", "cuda", "all"), default="all")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (default 1; 0 keeps torch's default)"
    )
    parser.add_argument("--strict", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, {platform.machine()}, "
        f"{torch.get_num_threads()} threads; median of {args.reps} reps; default PolicyConfig "
        "(hidden 128, 3 GCN layers, LSTM 128); synthetic observations (tests/support/observations.py)"
    )
    for nodes in NODES:
        ours, pyg = bench_collate(observations(nodes, 64), args.reps)
        print(
            f"collate 64 graphs x ~{nodes} nodes: numpy {ours:.3f} ms, "
            f"Batch.from_data_list {pyg:.3f} ms ({pyg / ours:.1f}x)"
        )

    devices = []
    if args.device in ("cpu", "all"):
        devices.append(torch.device("cpu"))
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    elif args.device == "cuda":
        print("CUDA not available")
        return 1
    checks = [item for device in devices for item in run(device, args.reps)]

    print()
    failed = False
    for label, per_decision in checks:
        ok = per_decision < BUDGET_MS
        failed |= not ok
        if not ok or label.endswith("B=1") or label.endswith("B=64"):
            verdict = "PASS" if ok else "FAIL"
            print(f"{verdict}  {label}: {per_decision:.3f} ms/decision < {BUDGET_MS} ms (seed docs)")
    return 1 if failed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
