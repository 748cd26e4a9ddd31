"""Analyzer cost: per-signal ingest (queued and applied in one vectorized pass, as the daemon does, or
one message at a time), the O(1) trend against np.polyfit per signal, and observe() (cached vs
recomputed GCN adjacency), for a 64-layer and a 1024-layer run with skip connections.

    .venv/bin/python benchmarks/bench_analyzer.py [--reps 31] [--block 2000] [--strict]

Prints medians over `reps` timed blocks, the ratios, and PASS/FAIL budget lines
(`--strict` exits 1 on a FAIL). Absolute numbers are for this machine only.
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

import numpy as np

from esperd.analyzer import Analyzer, AnalyzerConfig, SlidingTrend
from esperd_contracts import HealthBatch, HealthSignal, SeedStage, TopologyNode, TopologyPacket

SIZES = (64, 1024)
RUN = "bench"


class Trend(Protocol):
    def push(self, y: float) -> None: ...
    @property
    def slope(self) -> float: ...


class PolyfitTrend:
    """Baseline: keep the window, refit a least-squares line with np.polyfit on every signal."""

    __slots__ = ("_alpha", "_ewma", "_slope", "_window")

    def __init__(self, size: int, alpha: float) -> None:
        self._window: deque[float] = deque(maxlen=size)
        self._alpha = alpha
        self._ewma = 0.0
        self._slope = 0.0

    def push(self, y: float) -> None:
        self._ewma = y if not self._window else self._ewma + self._alpha * (y - self._ewma)
        self._window.append(y)
        n = len(self._window)
        self._slope = (
            float(np.polyfit(np.arange(n), np.fromiter(self._window, float, n), 1)[0]) if n > 1 else 0.0
        )

    @property
    def slope(self) -> float:
        return self._slope

    @property
    def ewma(self) -> float:
        return self._ewma


def resnet_topology(n: int) -> TopologyPacket:
    """A chain with a skip over every other layer, conv and attention layers mixed."""
    edges = [(i, i + 1) for i in range(n - 1)] + [(i, i + 2) for i in range(0, n - 2, 2)]
    nodes = [
        TopologyNode(layer_id=i, layer_type="conv2d" if i % 3 else "attention", params=10_000 * (i + 1))
        for i in range(n)
    ]
    return TopologyPacket(nodes=nodes, edges=edges)


def signals(n: int, count: int, seed: int) -> list[HealthSignal]:
    """Realistic seed-aware signals for random layers, timestamps increasing."""
    rng = np.random.default_rng(seed)
    layers = rng.integers(0, n, count).tolist()
    health = rng.random(count).tolist()
    return [
        HealthSignal(
            layer_id=layer,
            health_score=h,
            activation_variance=0.4,
            dead_neuron_ratio=0.05,
            avg_correlation=0.2,
            execution_latency_us=850.0,
            error_count=1,
            active_seeds=1,
            total_seeds=1,
            timestamp=1.0 + k,
            gradient_norm=2.5,
            seed_gradient_ratio=0.3,
            seed_stage=SeedStage.TRAINING,
            alpha=0.0,
            epochs_in_stage=2,
        )
        for k, (layer, h) in enumerate(zip(layers, health, strict=True))
    ]


def analyzer_for(n: int) -> Analyzer:
    """A run with the topology loaded and every window already full (the steady state)."""
    a = Analyzer(AnalyzerConfig(max_nodes_per_run=4096), clock=time.monotonic)
    a.ingest_topology(RUN, resnet_topology(n))
    warm = HealthBatch(signals=[HealthSignal(layer_id=i, health_score=0.8, total_seeds=1) for i in range(n)])
    for _ in range(12):
        a.ingest_health(RUN, warm)
    return a


def median_us(samples_ns: list[float]) -> float:
    return statistics.median(samples_ns) / 1000.0


def time_queued_ingest(a: Analyzer, sigs: list[HealthSignal], reps: int, block: int) -> float:
    """Median µs per signal when single-signal messages are queued and applied a block at a time (the
    daemon's path: it applies what arrived since it last let the event loop run)."""
    queue, now = a.queue_health, 1.0
    samples = []
    for r in range(reps):
        chunk = sigs[(r * block) % len(sigs) :][:block]
        t0 = time.perf_counter_ns()
        for s in chunk:
            queue(RUN, s, now)
        a.flush()
        samples.append((time.perf_counter_ns() - t0) / len(chunk))
    return median_us(samples)


def time_trend(factory: Callable[[int, float], Trend], values: list[float], reps: int) -> float:
    """Median µs per push (and slope read) of one layer's trend window."""
    samples = []
    for _ in range(reps):
        trend = factory(10, 0.3)
        t0 = time.perf_counter_ns()
        for y in values:
            trend.push(y)
            _ = trend.slope
        samples.append((time.perf_counter_ns() - t0) / len(values))
    return median_us(samples)


def time_single_ingest(a: Analyzer, sigs: list[HealthSignal], reps: int, block: int) -> float:
    """Median µs per ingest_health(run, HealthSignal) call, each applied at once."""
    ingest, now = a.ingest_health, 1.0
    samples = []
    for r in range(reps):
        chunk = sigs[(r * block) % len(sigs) :][:block]
        t0 = time.perf_counter_ns()
        for s in chunk:
            ingest(RUN, s, now)
        samples.append((time.perf_counter_ns() - t0) / len(chunk))
    return median_us(samples)


def time_batch_ingest(a: Analyzer, n: int, reps: int) -> float:
    """Median µs per signal when a whole step arrives as one HealthBatch of n signals."""
    batches = [HealthBatch(signals=signals(n, n, seed)) for seed in range(8)]
    samples = []
    for r in range(reps):
        batch = batches[r % len(batches)]
        t0 = time.perf_counter_ns()
        a.ingest_health(RUN, batch, 1.0)
        samples.append((time.perf_counter_ns() - t0) / n)
    return median_us(samples)


def time_observe(a: Analyzer, reps: int, recompute_adjacency: bool) -> float:
    """Median µs per observe(); the baseline drops the cached adjacency before each call."""
    run = a.get_run(RUN)
    samples = []
    for _ in range(reps):
        if recompute_adjacency:
            run._gcn = None  # private on purpose: the baseline is exactly "no cache"
        t0 = time.perf_counter_ns()
        a.observe(RUN, 2.0)
        samples.append(time.perf_counter_ns() - t0)
    return median_us(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=31, help="timed blocks per figure (median taken)")
    parser.add_argument("--block", type=int, default=2000, help="single-signal ingests per timed block")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a budget line says FAIL")
    args = parser.parse_args()
    print(
        f"python {platform.python_version()}, numpy {np.__version__}, {platform.machine()}, "
        f"reps={args.reps}, block={args.block}, window=10"
    )
    gc.disable()  # keep collector pauses out of microsecond timings
    results: dict[int, dict[str, float]] = {}
    values = np.random.default_rng(0).random(args.block).tolist()
    trend = {
        "o1": time_trend(SlidingTrend, values, args.reps),
        "polyfit": time_trend(PolyfitTrend, values, max(args.reps // 3, 5)),
    }
    for n in SIZES:
        sigs = signals(n, args.block * 4, seed=n)
        a = analyzer_for(n)
        results[n] = {
            "queued": time_queued_ingest(a, sigs, args.reps, args.block),
            "ingest": time_single_ingest(a, sigs, max(args.reps // 3, 5), args.block // 10),
            "batch": time_batch_ingest(a, n, args.reps),
            "observe": time_observe(a, args.reps * 5, recompute_adjacency=False),
            "observe_recompute": time_observe(a, args.reps * 5, recompute_adjacency=True),
        }
    gc.enable()

    print("\nper health signal (µs, median)          queued, one pass   one message at a time")
    for n in SIZES:
        r = results[n]
        print(f"  {n:5d} layers, single-signal messages   {r['queued']:10.2f}   {r['ingest']:18.2f}")
        print(f"  {n:5d} layers, one batch per step       {'':10}   {r['batch']:18.2f}")
    big, small = SIZES[-1], SIZES[0]
    print(
        f"  size independence: {big}-layer / {small}-layer queued single-signal cost = "
        f"{results[big]['queued'] / results[small]['queued']:.2f}"
    )
    print(
        f"\none layer's trend, per push + slope (µs, median): O(1) window {trend['o1']:.3f}, "
        f"np.polyfit over the window {trend['polyfit']:.3f} ({trend['polyfit'] / trend['o1']:.1f}x)"
    )

    print("\nobserve() (µs, median)              cached adj.  recomputed adj.   speed-up")
    for n in SIZES:
        r = results[n]
        print(
            f"  {n:5d} layers                   {r['observe']:10.1f}   {r['observe_recompute']:14.1f}"
            f"   {r['observe_recompute'] / r['observe']:7.2f}x"
        )

    print()
    ok = all(
        [
            budget(
                "per-signal cost independent of run size",
                results[big]["queued"] / results[small]["queued"],
                1.5,
            ),
            budget("queued single-signal ingest, 1024 layers (µs)", results[big]["queued"], 10.0),
            budget("O(1) / polyfit trend per push", trend["o1"] / trend["polyfit"], 0.5),
            budget("cached / recomputed observe(), 1024 layers", r["observe"] / r["observe_recompute"], 0.8),
        ]
    )
    if args.strict and not ok:
        raise SystemExit(1)


def budget(label: str, value: float, limit: float) -> bool:
    """Print a PASS/FAIL line for value <= limit."""
    passed = value <= limit
    print(f"{'PASS' if passed else 'FAIL'}  {label}: {value:.2f} <= {limit:g}")
    return passed


if __name__ == "__main__":
    main()
