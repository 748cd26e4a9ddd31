"""Learning curves: the GNN policy trained with PPO and with IMPALA against the simulator.

    .venv/bin/python benchmarks/learning_curves.py [--seeds 5] [--ppo-steps N] [--impala-steps N]
        [--workers 2] [--eval-every-steps 4096] [--eval-episodes 32] [--test-episodes 64]
        [--out benchmarks/results] [--quick]

For each algorithm and seed 0..S-1, `esperd.train.train` trains a fresh GNN policy (hidden 64,
3 GCN layers, weights seeded by the seed) on `SimEnv` (8 envs, default `SimConfig`: 40-epoch
episodes, 6-12-layer CNN / transformer / hybrid hosts) for a fixed budget of environment steps.
Training reward: `shaped` (PPO_REWARD, IMPALA_REWARD below). Every evaluation and the table use
the `basic` reward, the one the baselines' figures in benchmarks/README.md use.

Curve: every ~--eval-every-steps env steps (and before training) the sampling policy plays
--eval-episodes episodes on the seed's validation hosts (sim seed 10,000 + seed; the same hosts at
every evaluation); mean +- sd over the seeds of those means vs environment steps. Horizontal lines:
random, heuristic and scripted (and wait) on the same validation hosts, averaged over the seeds.

Table: per seed, --test-episodes episodes on test hosts no training run or checkpoint choice saw
(sim seed 20,000 + seed), every policy on the same hosts: random, wait, heuristic, scripted, and
for each algorithm its best checkpoint (chosen by validation return) and its last weights, acting
by sampling (as the daemon serves by default) and greedily (`[policy] deterministic = true`).
mean +- sd over seeds of the per-seed means, and the paired difference to the heuristic.

Writes <out>/learning_curves.png, <out>/learning_curves.md and <out>/learning_curves.json (raw).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Hyper-parameters found by a short search (see benchmarks/README.md); everything not named here is
# the seed documents' default.
HIDDEN = 64
ENVS = 8
PPO = {
    "lr": 1e-3,
    "target_kl": 0.05,
    "entropy_coef": 0.0,
    "rollout_size": 1024,
    "minibatch_size": 256,
    "warmup_updates": 0,
}
PPO_REWARD = {"mode": "shaped", "shaping_weight": 0.2}
IMPALA = {"lr": 3e-4}
IMPALA_REPLAY = {"replay_capacity": 2048, "prioritized": False}  # recent experience, uniform
IMPALA_REPLAY_RATIO = 2.0
IMPALA_UNROLL = 8
IMPALA_SEQUENCE = 16  # V-trace over 16-step unrolls (4 per batch of 64)
IMPALA_REWARD = {"mode": "shaped", "shaping_weight": 0.1}

VALIDATION_SEED = 10_000  # + seed (what esperd.train evaluates on)
TEST_SEED = 20_000  # + seed


def _setup_worker() -> None:
    import torch

    torch.set_num_threads(1)


def policy_config(seed: int) -> Any:
    from esperd.policy import PolicyConfig

    return PolicyConfig(name="gnn", hidden_size=HIDDEN, init_seed=seed)


def play(policy: Any, episodes: int, host_seed: int, deterministic: bool, torch_seed: int) -> float:
    """Mean basic-reward return of `episodes` episodes on the hosts of `host_seed`."""
    import torch

    from esperd.sim import SimConfig, run_episodes

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(torch_seed)
        results = run_episodes(
            policy, episodes, num_envs=ENVS, config=SimConfig(), seed=host_seed, deterministic=deterministic
        )
    return statistics.fmean(r.episode_return for r in results)


def train_one(job: dict[str, Any]) -> dict[str, Any]:
    """One (algorithm, seed) training run, its curve and its test returns."""
    _setup_worker()
    import msgspec

    from esperd.learn import ImpalaConfig, LearnerConfig, PPOConfig, RewardConfig
    from esperd.policy import create_policy, load_policy_checkpoint
    from esperd.train import TrainSpec, train

    algo, seed, steps = job["algo"], job["seed"], job["steps"]
    pc = policy_config(seed)
    learner = LearnerConfig(
        ppo=PPOConfig(**PPO),  # type: ignore[arg-type]  (esperd.train decays the LR over the run)
        impala=ImpalaConfig(**IMPALA),  # type: ignore[arg-type]
        rewards=RewardConfig(**(PPO_REWARD if algo == "ppo" else IMPALA_REWARD)),  # type: ignore[arg-type]
        **IMPALA_REPLAY,  # type: ignore[arg-type]
    )
    if algo == "ppo":
        eval_every = max(1, round(job["eval_every_steps"] / PPO["rollout_size"]))
    else:
        per_update = IMPALA_REPLAY_RATIO / ImpalaConfig().batch_size  # updates per env step
        eval_every = max(1, round(job["eval_every_steps"] * per_update))
    fresh = create_policy("gnn", pc, "cpu")
    curve = [(0, play(fresh, job["eval_episodes"], VALIDATION_SEED + seed, False, seed))]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        result = train(
            TrainSpec(
                algo=algo,
                policy="gnn",
                sim=True,
                steps=steps,
                envs=ENVS,
                eval_every=eval_every,
                eval_episodes=job["eval_episodes"],
                eval_deterministic=False,
                out=out,
                device="cpu",
                seed=seed,
                unroll=IMPALA_UNROLL,
                replay_ratio=IMPALA_REPLAY_RATIO,
                sequence_length=IMPALA_SEQUENCE,
                policy_config=pc,
                learner=learner,
                eval_reward=RewardConfig(mode="basic"),
                progress=False,
                log_updates=False,
            )
        )
        seconds = time.perf_counter() - started
        curve += [(r["env_steps"], r["sim_return"]) for r in result.history if "sim_return" in r]
        test: dict[str, float] = {}
        for which in ("best", "last"):
            policy = create_policy("gnn", msgspec.structs.replace(pc, init_seed=seed + 1), "cpu")
            load_policy_checkpoint(getattr(result, f"{which}_path"), policy)
            for mode, det in (("sample", False), ("greedy", True)):
                test[f"{which}_{mode}"] = play(policy, job["test_episodes"], TEST_SEED + seed, det, seed)
    return {
        "algo": algo,
        "seed": seed,
        "curve": curve,
        "test": test,
        "seconds": seconds,
        "updates": result.updates,
        "env_steps": result.env_steps,
        "best_update": result.best_update,
        "best_validation": result.best_value,
    }


def baselines_one(job: dict[str, Any]) -> dict[str, Any]:
    """random / wait / heuristic / scripted on one seed's validation and test hosts."""
    _setup_worker()
    from esperd.policy import PolicyConfig, create_policy
    from esperd.sim import RandomPolicy, ScriptedPolicy, WaitPolicy

    seed = job["seed"]
    out: dict[str, Any] = {"seed": seed, "validation": {}, "test": {}}
    for name in ("random", "wait", "heuristic", "scripted"):
        for split, host_seed, episodes in (
            ("validation", VALIDATION_SEED + seed, job["eval_episodes"]),
            ("test", TEST_SEED + seed, job["test_episodes"]),
        ):
            policy: Any = {
                "random": lambda: RandomPolicy(seed),
                "wait": WaitPolicy,
                "heuristic": lambda: create_policy("heuristic", PolicyConfig(), "cpu"),
                "scripted": ScriptedPolicy,
            }[name]()
            out[split][name] = play(policy, episodes, host_seed, True, seed)
    return out


# ---------------------------------------------------------------- report


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def report(
    runs: list[dict[str, Any]], bases: list[dict[str, Any]], args: argparse.Namespace, wall: float
) -> str:
    seeds = sorted(b["seed"] for b in bases)
    heuristic = {b["seed"]: b["test"]["heuristic"] for b in bases}
    rows: list[tuple[str, list[float]]] = []
    for name in ("random", "wait", "heuristic", "scripted"):
        rows.append((name, [b["test"][name] for b in sorted(bases, key=lambda b: b["seed"])]))
    for algo in ("ppo", "impala"):
        mine = sorted((r for r in runs if r["algo"] == algo), key=lambda r: r["seed"])
        if not mine:
            continue
        for key, label in (
            ("best_sample", "best checkpoint, sampling"),
            ("best_greedy", "best checkpoint, greedy"),
            ("last_sample", "last weights, sampling"),
            ("last_greedy", "last weights, greedy"),
        ):
            rows.append((f"{algo.upper()} {label}", [r["test"][key] for r in mine]))
    lines = [
        "# Learning curves: GNN policy, PPO and IMPALA, simulator",
        "",
        f"Command: `{' '.join(['.venv/bin/python', 'benchmarks/learning_curves.py', *sys.argv[1:]])}`",
        "",
        (
            f"Machine: {platform.machine()}, {os.cpu_count()} cores (shared), python {platform.python_version()}, "
            f"{args.workers} worker processes x 1 torch thread; wall time {wall / 60:.1f} min."
        ),
        "",
        (
            f"Budget per run: PPO {args.ppo_steps:,} env steps, IMPALA {args.impala_steps:,} env steps "
            f"({ENVS} envs); seeds {seeds[0]}-{seeds[-1]}. GNN hidden {HIDDEN}, 3 GCN layers."
        ),
        (
            f"PPO: {PPO}, training reward {PPO_REWARD} (rest: seed-documents defaults; LR decays "
            f"linearly to 0.1x over the run). IMPALA: {IMPALA}, training reward {IMPALA_REWARD}, replay "
            f"{IMPALA_REPLAY}, replay ratio {IMPALA_REPLAY_RATIO} (samples per new transition, batch 64 "
            f"= {64 // IMPALA_SEQUENCE} unrolls of {IMPALA_SEQUENCE} steps), actors {IMPALA_UNROLL} steps "
            "per env per round. All returns below are the **basic** reward (the baselines' figures)."
        ),
        "",
        (
            f"Episode return on test hosts (sim seed {TEST_SEED} + seed, {args.test_episodes} episodes per seed, "
            "every policy on the same hosts; no run or checkpoint choice saw them). mean ± sd over seeds of the "
            "per-seed mean; last column: paired difference to the heuristic, mean ± sd over seeds."
        ),
        "",
        "| policy | return (mean ± sd over seeds) | minus heuristic (paired) | seeds |",
        "|---|---|---|---|",
    ]
    for name, values in rows:
        mean, sd = mean_sd(values)
        diffs = [v - heuristic[s] for v, s in zip(values, seeds, strict=True)]
        dmean, dsd = mean_sd(diffs)
        lines.append(f"| {name} | {mean:+.3f} ± {sd:.3f} | {dmean:+.3f} ± {dsd:.3f} | {len(values)} |")
    lines += [
        "",
        "Training runs:",
        "",
        "| algorithm | seed | updates | env steps | best at update | best validation return | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(runs, key=lambda r: (r["algo"], r["seed"])):
        lines.append(
            f"| {r['algo']} | {r['seed']} | {r['updates']} | {r['env_steps']:,} | {r['best_update']} | "
            f"{r['best_validation']:+.3f} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot(runs: list[dict[str, Any]], bases: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=120)
    colors = {"ppo": "tab:blue", "impala": "tab:orange"}
    for algo in ("ppo", "impala"):
        mine = [r for r in runs if r["algo"] == algo]
        if not mine:
            continue
        # Evaluation points can differ by a few steps between seeds: align them by index.
        length = min(len(r["curve"]) for r in mine)
        steps = np.array([[r["curve"][i][0] for i in range(length)] for r in mine], dtype=float).mean(0)
        values = np.array([[r["curve"][i][1] for i in range(length)] for r in mine], dtype=float)
        mean, sd = values.mean(0), values.std(0, ddof=1) if len(mine) > 1 else np.zeros(length)
        ax.plot(steps, mean, color=colors[algo], lw=2, label=f"{algo.upper()} (mean ± sd, {len(mine)} seeds)")
        ax.fill_between(steps, mean - sd, mean + sd, color=colors[algo], alpha=0.2)
    styles = {
        "random": ("tab:gray", ":"),
        "wait": ("tab:brown", (0, (1, 3))),
        "heuristic": ("tab:red", "--"),
        "scripted": ("tab:green", "-."),
    }
    for name, (color, style) in styles.items():
        level = statistics.fmean(b["validation"][name] for b in bases)
        ax.axhline(level, color=color, ls=style, lw=1.5, label=f"{name} {level:+.2f}")
    ax.set_xlabel("environment steps (run-epochs) per training run")
    ax.set_ylabel("episode return, basic reward (validation hosts, sampling)")
    ax.set_title("GNN policy (hidden 64) trained in the simulator")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--ppo-steps", type=int, default=65_536)
    parser.add_argument("--impala-steps", type=int, default=65_536)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--eval-every-steps", type=int, default=4096)
    parser.add_argument("--eval-episodes", type=int, default=32)
    parser.add_argument("--test-episodes", type=int, default=64)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--algos", default="ppo,impala")
    parser.add_argument("--quick", action="store_true", help="2 seeds, 4k steps: a smoke test of the script")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.ppo_steps, args.impala_steps, args.eval_every_steps = 2, 4096, 2048, 1024
        args.eval_episodes, args.test_episodes = 8, 8
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    algos = [a for a in args.algos.split(",") if a]
    jobs = [
        {
            "algo": algo,
            "seed": seed,
            "steps": args.ppo_steps if algo == "ppo" else args.impala_steps,
            "eval_every_steps": args.eval_every_steps,
            "eval_episodes": args.eval_episodes,
            "test_episodes": args.test_episodes,
        }
        for seed in range(args.seeds)
        for algo in algos
    ]
    base_jobs = [
        {"seed": seed, "eval_episodes": args.eval_episodes, "test_episodes": args.test_episodes}
        for seed in range(args.seeds)
    ]
    started = time.perf_counter()
    runs: list[dict[str, Any]] = []
    with mp.get_context("spawn").Pool(args.workers) as pool:
        pending = pool.map_async(baselines_one, base_jobs)
        for run in pool.imap_unordered(train_one, jobs):
            runs.append(run)
            final = run["curve"][-1][1]
            print(
                f"{run['algo']:<6} seed {run['seed']}: {run['env_steps']:,} steps, {run['updates']} updates in "
                f"{run['seconds']:.0f}s; validation {run['curve'][0][1]:+.3f} -> {final:+.3f}; "
                f"test best/sample {run['test']['best_sample']:+.3f}",
                flush=True,
            )
        bases = pending.get()
    wall = time.perf_counter() - started
    (out / "learning_curves.json").write_text(json.dumps({"runs": runs, "baselines": bases}, indent=1))
    plot(runs, bases, out / "learning_curves.png")
    text = report(runs, bases, args, wall)
    (out / "learning_curves.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
