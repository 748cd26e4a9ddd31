"""Micro-timings behind choices the code makes, each against the alternative it avoids.

    .venv/bin/python benchmarks/bench_micro.py [--reps 301] [--threads 1]

Code comments used to quote these figures; they now say why and point to
benchmarks/RESULTS.md, and this script measures them again. Every line times both sides in
this run (median µs per call, time.perf_counter_ns, garbage collector paused, the two sides
alternated every repeat), so compare the ratio, not the absolute time:

  - gc.collect() with torch and a GNN policy loaded, before and after gc.freeze() (service.py
    freezes at READY);
  - the heuristic's active-stage lookup table vs np.isin on 20 nodes (policy/heuristic.py);
  - one GCN layer's adjacency product, dense [N, N] vs CSR, H = 128 (policy/batch.py's
    DENSE_ADJACENCY_MAX_NODES);
  - torch.multinomial at B = 1 (policy/heads.py samples without it);
  - the serving sampler's Python path vs its batched tensor path on 20-node graphs
    (policy/heads.py's _SMALL_BATCH);
  - one item read and write, Python list vs numpy array (learn/buffers.py's successor links);
  - a sum-tree leaf set with a Python loop up the tree vs SumTree.set (learn/sumtree.py);
  - loading weights into an existing GNN bundle vs building one (learn/learner.py);
  - a numpy per-element read and write vs a row write (analyzer/run.py);
  - the reference host's per-layer unit correlations, batched matmul vs np.einsum
    (examples/host/telemetry.py).

No budgets: nothing here PASSes or FAILs.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.support (not installed)
from esperd.analyzer.observation import STAGE_INDEX
from esperd.learn.sumtree import SumTree
from esperd.policy import PolicyConfig, create_policy
from esperd.policy.batch import collate
from esperd.policy.heads import FactoredDistribution, _sample_small
from esperd.policy.heuristic import _ACTIVE_STAGE
from tests.support.observations import make_observation, random_stages

Timed = Callable[[], object]


def paired_us(fns: list[Timed], reps: int, inner: int = 1) -> list[float]:
    """Median µs per call of each fn; every repeat runs all of them in turn."""
    times: list[list[float]] = [[] for _ in fns]
    gc.disable()
    try:
        for _ in range(reps):
            for k, fn in enumerate(fns):
                start = time.perf_counter_ns()
                for _ in range(inner):
                    fn()
                times[k].append((time.perf_counter_ns() - start) / inner / 1e3)
    finally:
        gc.enable()
    return [statistics.median(t) for t in times]


def line(name: str, ours: str, ours_us: float, other: str, other_us: float) -> None:
    ratio = other_us / ours_us
    print(f"  {name:<34} {ours:<26} {ours_us:>10.2f}   {other:<26} {other_us:>10.2f}   {ratio:>6.2f}x")


def gc_collect(reps: int) -> None:
    policy = create_policy("gnn", PolicyConfig(name="gnn"))  # noqa: F841 - alive while collecting
    gc.collect()
    unfrozen = statistics.median(_time_once(gc.collect) for _ in range(max(3, reps // 50)))
    gc.freeze()
    frozen = statistics.median(_time_once(gc.collect) for _ in range(max(3, reps // 50)))
    gc.unfreeze()
    line("full gc.collect(), torch + GNN", "after gc.freeze()", frozen, "unfrozen", unfrozen)


def _time_once(fn: Timed) -> float:
    start = time.perf_counter_ns()
    fn()
    return (time.perf_counter_ns() - start) / 1e3


def active_stages(reps: int) -> None:
    stages = np.array([STAGE_INDEX[s] for s in random_stages(20, 0)], dtype=np.int64)
    active = np.flatnonzero(_ACTIVE_STAGE)
    table, isin = paired_us([lambda: _ACTIVE_STAGE[stages], lambda: np.isin(stages, active)], reps, 20)
    line("active seeds, 20 nodes", "lookup table", table, "np.isin", isin)


def chain_adjacency(n: int) -> torch.Tensor:
    """A chain with skips, symmetrized with self loops and normalized, as a dense [n, n]."""
    a = torch.eye(n)
    idx = torch.arange(n - 1)
    a[idx, idx + 1] = a[idx + 1, idx] = 1.0
    skip = torch.arange(0, n - 2, 2)
    a[skip, skip + 2] = a[skip + 2, skip] = 1.0
    d = a.sum(1).rsqrt()
    return d[:, None] * a * d[None, :]


def adjacency_product(reps: int) -> None:
    for n in (20, 48, 128, 1280):
        dense = chain_adjacency(n)
        csr = dense.to_sparse_csr()
        h = torch.randn(n, 128)
        fns: list[Timed] = [lambda d=dense, x=h: d @ x, lambda c=csr, x=h: c @ x]
        with torch.inference_mode():
            d_us, c_us = paired_us(fns, reps if n < 1000 else reps // 10)
        line(f"GCN adjacency product, {n} nodes", "dense", d_us, "CSR", c_us)


def multinomial(reps: int) -> None:
    probs = torch.softmax(torch.randn(1, 35), dim=1)
    gumbel = torch.empty(1, 35)

    def gumbel_max() -> object:
        return (probs.log() - gumbel.exponential_().log()).argmax(1)

    g_us, m_us = paired_us([gumbel_max, lambda: torch.multinomial(probs, 1)], reps, 10)
    line("one categorical draw, B = 1", "Gumbel-max (argmax)", g_us, "torch.multinomial", m_us)


def sampler(reps: int) -> None:
    policy = create_policy("gnn", PolicyConfig(name="gnn"))
    for graphs in (1, 8, 32, 64):
        obs = [make_observation(f"r{i}", 20, seed=i) for i in range(graphs)]
        batch = collate(obs, policy.device)
        with torch.no_grad():
            node_out = policy._forward(batch, None)[0]
            small, tensor = paired_us(
                [
                    lambda b=batch, o=node_out: _sample_small(b, o, False),
                    lambda b=batch, o=node_out: FactoredDistribution(b, o).sample_scored(False),
                ],
                reps,
            )
        line(f"sample actions, {graphs} graphs", "Python floats", small, "batched tensors", tensor)


def list_vs_numpy(reps: int) -> None:
    links_list = [-1] * 100_000
    links_np = np.full(100_000, -1, dtype=np.int64)

    def on_list() -> None:
        links_list[4242] = links_list[777] + 1

    def on_numpy() -> None:
        links_np[4242] = links_np[777] + 1

    lst, arr = paired_us([on_list, on_numpy], reps, 100)
    line("one item read + write", "Python list", lst, "numpy array", arr)


def sum_tree(reps: int) -> None:
    tree = SumTree(100_000)
    heap = np.zeros(2 * 131_072, dtype=np.float64)

    def python_walk() -> None:
        node = 131_072 + 4242
        heap[node] = 0.5
        node //= 2
        while node:
            heap[node] = heap[2 * node] + heap[2 * node + 1]
            node //= 2

    deferred, walk = paired_us([lambda: tree.set(4242, 0.5), python_walk], reps, 20)
    line("sum tree add, 100k leaves", "SumTree.set (deferred)", deferred, "Python walk to root", walk)


def bundle_reuse(reps: int) -> None:
    config = PolicyConfig(name="gnn")
    bundle = create_policy("gnn", config)
    state = create_policy("gnn", config).state_dict()
    load, build = paired_us(
        [lambda: bundle.load_state_dict(state), lambda: create_policy("gnn", config)], reps // 10
    )
    line("GNN bundle for a swap", "load into a retired one", load, "build a new one", build)


def numpy_elements(reps: int) -> None:
    table = np.zeros((64, 24), dtype=np.float32)
    row = tuple(float(i) for i in range(24))

    def per_element() -> None:
        table[7, 3] = table[7, 3] + 1.0

    def whole_row() -> None:
        table[7, :] = row

    elem, full = paired_us([per_element, whole_row], reps, 100)
    line("table access", "one element read + write", elem, "one 24-wide row write", full)


def correlations(reps: int) -> None:
    rng = np.random.default_rng(0)
    z = rng.standard_normal((7, 32, 64))  # layers x units x samples, as the reference host has

    def matmul() -> object:
        return np.abs(z @ z.transpose(0, 2, 1)).sum(axis=(1, 2))

    def einsum() -> object:
        return np.abs(np.einsum("lus,lvs->luv", z, z)).sum(axis=(1, 2))

    mm, es = paired_us([matmul, einsum], reps)
    line("unit correlations, 7 x 32 x 64", "batched matmul", mm, "np.einsum", es)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=301)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
        f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s), "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"\n  {'median µs per call':<34} {'the code':<26} {'µs':>10}   {'instead of':<26} {'µs':>10}   ratio"
    )
    for measure in (
        gc_collect,
        active_stages,
        adjacency_product,
        multinomial,
        sampler,
        list_vs_numpy,
        sum_tree,
        bundle_reuse,
        numpy_elements,
        correlations,
    ):
        measure(args.reps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
