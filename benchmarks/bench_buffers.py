"""Experience buffers: add/sample throughput, save/load, and memory per transition.

    .venv/bin/python benchmarks/bench_buffers.py [--transitions 100000] [--nodes 20] [--runs 200]
                                                 [--reps 9] [--naive 10000] [--strict]

Builds `--transitions` transitions of `--nodes`-node graphs the way the recorder closes them
(`--runs` runs interleaved, each step's next_obs is the run's next obs object, topology arrays
shared per run), then measures:

  * add: a 100k-capacity ReplayBuffer, prioritized vs uniform, and a RolloutBuffer (per add);
  * sample: `sample(B)` for B in 32/256, prioritized vs uniform, `update_priorities(256)`, and
    `sample_sequences(32, 20)` (median of --reps rounds of 200 calls);
  * save/load of the full buffer: wall time, file size, bytes per transition on disk;
  * memory: bytes per transition held (tracemalloc, everything the buffer keeps alive) against a
    naive layout that copies every array per transition, topology included, for obs and next_obs.

Absolute times are for this machine; compare ratios.
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.support (not installed)
from esperd.analyzer.observation import ACTION_WIDTH, Observation
from esperd.learn.buffers import ReplayBuffer, RolloutBuffer
from esperd.learn.experience import Transition
from tests.support.observations import make_observation, random_stages

MEMORY_BUDGET_BYTES = 1 << 30  # 100k transitions of 20-node graphs must fit in 1 GiB
SAMPLE_BUDGET_US = 2000.0  # prioritized sample(256) median


def generate(count: int, nodes: int, runs: int, seed: int = 0) -> Iterator[Transition]:
    """Transitions as the recorder closes them: per-step arrays fresh, topology shared per run."""
    rng = np.random.default_rng(seed)
    bases = [make_observation(f"run-{r}", nodes, seed=r, stages=random_stages(nodes, r)) for r in range(runs)]
    current = [step(b, rng, 0) for b in bases]
    for i in range(count):
        r = i % runs
        obs = current[r]
        nxt = step(bases[r], rng, i // runs + 1)
        current[r] = nxt
        yield Transition(
            obs=obs,
            action=rng.integers(0, 4, ACTION_WIDTH).astype(np.int64),
            log_prob=float(-rng.random()),
            value=float(rng.normal()),
            policy_version=i // 10_000,
            reward=float(rng.normal()),
            next_obs=nxt,
        )


def step(base: Observation, rng: np.random.Generator, epoch: int) -> Observation:
    return msgspec.structs.replace(
        base,
        node_features=rng.random(base.node_features.shape, dtype=np.float32),
        global_features=rng.random(base.global_features.shape, dtype=np.float32),
        op_mask=base.op_mask.copy(),
        stages=base.stages.copy(),
        epoch=epoch,
        timestamp=float(epoch),
    )


def naive_copy(t: Transition) -> Transition:
    """The baseline: every array of obs and next_obs copied per transition, topology included."""

    def copy(obs: Observation | None) -> Observation | None:
        if obs is None:
            return None
        return msgspec.structs.replace(
            obs,
            **{
                f: getattr(obs, f).copy()
                for f in (
                    "layer_ids",
                    "node_features",
                    "edge_index",
                    "gcn_edge_index",
                    "gcn_edge_weight",
                    "global_features",
                    "op_mask",
                    "blueprint_mask",
                    "stages",
                )
            },
        )

    return msgspec.structs.replace(t, obs=copy(t.obs), next_obs=copy(t.next_obs), action=t.action.copy())


def traced_bytes(build: Callable[[], object]) -> tuple[int, object]:
    gc.collect()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        kept = build()
        gc.collect()
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return after - before, kept


def median_us(fn: Callable[[], object], reps: int, calls: int) -> float:
    fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter_ns()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter_ns() - start) / calls / 1e3)
    return statistics.median(samples)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--transitions", type=int, default=100_000)
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--naive", type=int, default=10_000, help="transitions for the naive baseline")
    parser.add_argument("--strict", action="store_true", help="exit 1 on a FAIL")
    args = parser.parse_args()
    n, cap = args.transitions, max(args.transitions, 100_000)
    print(
        f"python {platform.python_version()}, numpy {np.__version__}, "
        f"{platform.machine()} {platform.system()}"
    )
    print(f"{n} transitions of {args.nodes}-node graphs over {args.runs} runs; replay capacity {cap}\n")
    failures = 0

    # ---- memory: build the data straight into a buffer, so the traced bytes are what it keeps.
    def fill() -> ReplayBuffer:
        buf = ReplayBuffer(capacity=cap, seed=0)
        for t in generate(n, args.nodes, args.runs):
            buf.add(t)
        return buf

    t0 = time.perf_counter()
    used, kept = traced_bytes(fill)
    replay: ReplayBuffer = kept  # type: ignore[assignment]
    print(f"built and stored in {time.perf_counter() - t0:.1f} s (tracemalloc on)")
    m = min(args.naive, n)
    naive_used, naive_kept = traced_bytes(lambda: [naive_copy(t) for t in generate(m, args.nodes, args.runs)])
    del naive_kept
    sample_obs = replay[0].obs
    per_step = sum(
        getattr(sample_obs, f).nbytes for f in ("node_features", "op_mask", "stages", "global_features")
    )
    topology = sum(
        getattr(sample_obs, f).nbytes
        for f in ("layer_ids", "edge_index", "gcn_edge_index", "gcn_edge_weight", "blueprint_mask")
    )
    ours, naive = used / n, naive_used / m
    print("memory per transition (tracemalloc):")
    print(f"  shared layout      {ours:8.0f} B   ({used / 2**20:.0f} MiB for {n})")
    print(
        f"  naive copies       {naive:8.0f} B   ({naive * 100_000 / 2**20:.0f} MiB per 100k; measured on {m})"
    )
    print(
        f"  ratio              {naive / ours:8.2f}x  "
        f"(array data per step {per_step} B, topology {topology} B)"
    )
    projected = ours * 100_000
    ok = projected <= MEMORY_BUDGET_BYTES
    failures += not ok
    print(
        f"{'PASS' if ok else 'FAIL'}  100k transitions ~{projected / 2**20:.0f} MiB <= "
        f"{MEMORY_BUDGET_BYTES / 2**20:.0f} MiB\n"
    )

    transitions = replay.transitions()

    # ---- add throughput
    print("add (per transition, whole set, median of 3):")
    for name, make in (
        ("replay prioritized", lambda: ReplayBuffer(capacity=cap, prioritized=True)),
        ("replay uniform", lambda: ReplayBuffer(capacity=cap, prioritized=False)),
        ("rollout", lambda: RolloutBuffer(capacity=cap)),
    ):
        times = []
        for _ in range(3):
            buf = make()
            add = buf.add
            start = time.perf_counter_ns()
            for t in transitions:
                add(t)
            times.append((time.perf_counter_ns() - start) / len(transitions) / 1e3)
            del buf
        us = statistics.median(times)
        print(f"  {name:20s} {us:7.2f} us   {1e6 / us:10,.0f} /s")

    # ---- sampling throughput
    uniform = ReplayBuffer(capacity=cap, prioritized=False, seed=0)
    uniform.extend(transitions)
    rng = np.random.default_rng(0)
    replay.update_priorities(np.arange(len(replay)), rng.exponential(1.0, len(replay)))
    print(f"\nsample (median of {args.reps} x 200 calls):")
    results = {}
    for batch in (32, 256):
        for name, buf in (("prioritized", replay), ("uniform", uniform)):
            us = median_us(lambda b=buf, k=batch: b.sample(k, rng), args.reps, 200)
            results[(name, batch)] = us
            print(f"  sample({batch:3d}) {name:12s} {us:8.1f} us   {batch * 1e6 / us:12,.0f} transitions/s")
    idx = replay.sample(256, rng).indices
    td = rng.normal(size=256)
    us = median_us(lambda: replay.update_priorities(idx, td), args.reps, 200)
    print(f"  update_priorities(256)   {us:8.1f} us")
    us = median_us(lambda: replay.sample_sequences(32, 20, rng), args.reps, 50)
    print(f"  sample_sequences(32, 20) {us:8.1f} us (prioritized starts)")
    ratio = results[("prioritized", 256)] / results[("uniform", 256)]
    print(f"  prioritized / uniform at 256: {ratio:.2f}x")
    ok = results[("prioritized", 256)] <= SAMPLE_BUDGET_US
    failures += not ok
    print(
        f"{'PASS' if ok else 'FAIL'}  prioritized sample(256) {results[('prioritized', 256)]:.0f} us "
        f"<= {SAMPLE_BUDGET_US:.0f} us\n"
    )

    # ---- persistence
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "replay.safetensors"
        start = time.perf_counter()
        size = replay.save(path)
        save_s = time.perf_counter() - start
        back = ReplayBuffer(capacity=cap)
        start = time.perf_counter()
        loaded = back.load(path)
        load_s = time.perf_counter() - start
        assert loaded == len(replay)
        roll = RolloutBuffer(capacity=cap)
        roll.extend(transitions)
        rpath = Path(tmp) / "rollout.safetensors"
        start = time.perf_counter()
        rsize = roll.save(rpath)
        rsave_s = time.perf_counter() - start
    print(f"persistence ({len(replay)} transitions, safetensors, CRC32-checked, fsync'd):")
    print(
        f"  replay save  {save_s:6.2f} s   load {load_s:6.2f} s   file {size / 2**20:7.1f} MiB "
        f"({size / len(replay):.0f} B/transition)"
    )
    print(f"  rollout save {rsave_s:6.2f} s   file {rsize / 2**20:7.1f} MiB")
    return 1 if failures and args.strict else 0


if __name__ == "__main__":
    raise SystemExit(main())
