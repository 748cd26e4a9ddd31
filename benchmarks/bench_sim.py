"""Simulator throughput (environment steps per second per core) and episode returns per policy.

    .venv/bin/python benchmarks/bench_sim.py [--steps 200] [--reps 3] [--seeds 5] [--episodes 32] [--strict]

Throughput: `SimEnv.step` for 1, 16 and 64 envs (an env step = one run advancing one epoch:
dynamics, real contracts packets, Analyzer ingest and observe, rewards), driven by a cheap
random-legal policy so the policy is not what is measured; then the same with the heuristic
policy deciding. Reported per wall second and per CPU second of this process (one thread:
`torch.set_num_threads(1)`), median of `reps` blocks of `steps` calls. Baseline in the same
run: the bare dynamics (`HostBatch.advance` + telemetry, no packets or analyzer).

Returns: mean ± sd episode return of random, wait (never act), heuristic and scripted
(observation-only rules, see esperd.sim.policies) over `seeds` seeds x `episodes` episodes
(basic reward, default SimConfig); the same hosts for every policy within a seed.

Budget (PASS/FAIL, `--strict` exits 1 on a FAIL): >= 1,000 env steps per CPU second with the
random policy at 16 envs; heuristic > random; scripted > heuristic.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from esperd.policy import PolicyConfig, create_policy
from esperd.sim import HostBatch, RandomPolicy, ScriptedPolicy, SimConfig, SimEnv, WaitPolicy, run_episodes
from esperd.sim.packets import telemetry

BUDGET_STEPS_PER_S = 1_000.0
ENV_COUNTS = (1, 16, 64)


def timed(block: Callable[[], None], reps: int) -> tuple[float, float]:
    """Median (wall seconds, CPU seconds) of `reps` calls of `block`, after one warm-up call."""
    block()
    walls, cpus = [], []
    for _ in range(reps):
        w, c = time.perf_counter(), time.process_time()
        block()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus)


def env_rate(num_envs: int, policy: object, steps: int, reps: int) -> tuple[float, float]:
    env = SimEnv(num_envs, SimConfig(), seed=0)
    state = {"obs": env.reset()}
    act = policy.act  # type: ignore[attr-defined]

    def block() -> None:
        obs = state["obs"]
        for _ in range(steps):
            obs, _, _, _ = env.step(act(obs))
        state["obs"] = obs

    wall, cpu = timed(block, reps)
    return num_envs * steps / wall, num_envs * steps / cpu


def dynamics_rate(num_envs: int, steps: int, reps: int) -> tuple[float, float]:
    hosts = HostBatch(num_envs, SimConfig(), np.random.default_rng(0))
    hosts.reset(np.arange(num_envs))

    def block() -> None:
        for _ in range(steps):
            hosts.advance()
            telemetry(hosts)

    wall, cpu = timed(block, reps)
    return num_envs * steps / wall, num_envs * steps / cpu


def returns(seeds: int, episodes: int) -> dict[str, np.ndarray]:
    """[seeds, episodes] episode returns per policy."""
    policies: dict[str, Callable[[int], object]] = {
        "random": lambda s: RandomPolicy(seed=1000 + s),
        "wait": lambda s: WaitPolicy(),
        "heuristic": lambda s: create_policy("heuristic", PolicyConfig(name="heuristic")),
        "scripted": lambda s: ScriptedPolicy(),
    }
    out = {}
    for name, make in policies.items():
        out[name] = np.array(
            [
                [r.episode_return for r in run_episodes(make(s), episodes, num_envs=16, seed=s)]  # type: ignore[arg-type]
                for s in range(seeds)
            ]
        )
    return out


def check(label: str, passed: bool, detail: str) -> bool:
    print(f"{'PASS' if passed else 'FAIL'}  {label}: {detail}")
    return passed


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=200, help="step() calls per timed block")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--episodes", type=int, default=32, help="episodes per policy and seed")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a budget line says FAIL")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        f"python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}, "
        f"{platform.machine()}, 1 thread; episode {SimConfig().epochs} epochs\n"
    )

    print(
        "env steps per second (median of blocks)   wall       CPU   vs 1 env (CPU)   vs bare dynamics (CPU)"
    )
    rates: dict[tuple[str, int], float] = {}
    heuristic = create_policy("heuristic", PolicyConfig(name="heuristic"))
    for label, policy in (("random policy", RandomPolicy(seed=0)), ("heuristic policy", heuristic)):
        for n in ENV_COUNTS:
            steps = max(args.steps // n, 5) if n > 16 else args.steps
            wall, cpu = env_rate(n, policy, steps, args.reps)
            bare = dynamics_rate(n, steps, args.reps)[1]
            rates[(label, n)] = cpu
            print(
                f"  {label:<17} {n:>3} envs          {wall:9.0f} {cpu:9.0f}   "
                f"{cpu / rates[(label, 1)]:10.2f}x   {cpu / bare:12.3f}x (bare {bare:,.0f}/s)"
            )

    print(
        f"\nepisode return, basic reward, {args.seeds} seeds x {args.episodes} episodes (same hosts per seed)"
    )
    table = returns(args.seeds, args.episodes)
    seed_means = {name: r.mean(axis=1) for name, r in table.items()}
    print("  policy      mean ± sd over seeds    mean ± sd over episodes   minus heuristic (paired)")
    for name, r in table.items():
        diff = r - table["heuristic"]
        print(
            f"  {name:<10} {seed_means[name].mean():+8.3f} ± {seed_means[name].std(ddof=1):5.3f}"
            f"        {r.mean():+8.3f} ± {r.std(ddof=1):5.3f}"
            f"        {diff.mean():+7.3f} ± {diff.std(ddof=1):5.3f}"
        )

    print()
    ok = check(
        "steps per CPU second, random policy, 16 envs",
        rates[("random policy", 16)] >= BUDGET_STEPS_PER_S,
        f"{rates[('random policy', 16)]:,.0f} >= {BUDGET_STEPS_PER_S:,.0f}",
    )
    h, r, s = (float(seed_means[k].mean()) for k in ("heuristic", "random", "scripted"))
    ok &= check("heuristic beats random", h > r, f"{h:+.3f} > {r:+.3f}")
    ok &= check("heuristic is beatable (scripted beats it)", s > h, f"{s:+.3f} > {h:+.3f}")
    return 1 if args.strict and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
