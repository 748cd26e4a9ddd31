"""The heuristic under `[policy] selection = "pareto"` against `"argmax"`, on the simulator.

    .venv/bin/python benchmarks/heuristic_selection.py [--seeds 0-4] [--episodes 64]

Both play the same test hosts (sim seed 40000 + seed, the test hosts of learning_curves.py),
`--episodes` episodes per seed, greedy. Prints each selection's mean episode return (basic
reward) per seed and the paired difference pareto - argmax with its 95% bootstrap interval over
seeds (benchmarks/hoststats.py). Nothing here is tuned on these hosts.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from hoststats import bootstrap_mean, parse_seeds

from esperd.policy import PolicyConfig, create_policy
from esperd.sim.evaluate import run_episodes

TEST_SIM_SEED = 40_000


def mean_return(selection: str, seed: int, episodes: int) -> float:
    policy = create_policy("heuristic", PolicyConfig(selection=selection))  # type: ignore[arg-type]
    results = run_episodes(policy, episodes, seed=TEST_SIM_SEED + seed)
    return float(np.mean([r.episode_return for r in results]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0-4")
    parser.add_argument("--episodes", type=int, default=64)
    args = parser.parse_args()
    seeds = parse_seeds(args.seeds)
    started = time.perf_counter()
    returns = {sel: [mean_return(sel, s, args.episodes) for s in seeds] for sel in ("pareto", "argmax")}
    print(f"heuristic, {args.episodes} episodes per seed, seeds {args.seeds}")
    for selection, values in returns.items():
        per_seed = " ".join(f"{v:+.3f}" for v in values)
        print(f"  {selection:<7} mean {np.mean(values):+.3f}  per seed {per_seed}")
    diff = bootstrap_mean([p - a for p, a in zip(returns["pareto"], returns["argmax"], strict=True)])
    wins = sum(p > a for p, a in zip(returns["pareto"], returns["argmax"], strict=True))
    print(f"  pareto - argmax {diff.format(scale=1.0, digits=3)}  pareto ahead on {wins}/{len(seeds)} seeds")
    print(f"  wall {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
