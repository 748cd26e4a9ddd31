"""How `esperd train` judges a policy: on a held-out part of the experience, and in the simulator.

The metrics are described in docs/training.md ("Evaluation").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from esperd.learn.experience import Transition
from esperd.learn.imitation import discounted_returns
from esperd.learn.ppo import stack_hidden
from esperd.policy.base import PolicyBundle
from esperd.sim.config import SimConfig

EVAL_SEED_OFFSET = 10_000  # the evaluation's simulator hosts: seed + this, never the training ones


@dataclass
class HeldOut:
    """Held-out transitions with their observed discounted returns (fixed for the whole run)."""

    transitions: list[Transition]
    returns: np.ndarray  # float32 [n], observed discounted return from each step
    value_mask: np.ndarray  # bool [n], steps whose return reaches the episode's end
    value_targets: str  # "complete" | "truncated"

    def __len__(self) -> int:
        return len(self.transitions)


def split_holdout(
    transitions: Sequence[Transition], fraction: float, seed: int
) -> tuple[list[Transition], list[Transition]]:
    """(train, held-out): whole runs held out (a shuffled `fraction` of the run ids, at least one
    when fraction > 0 and there are two or more runs); with one run, its last `fraction` of steps."""
    if fraction <= 0 or not transitions:
        return list(transitions), []
    runs = sorted({t.run_id for t in transitions})
    if len(runs) >= 2:
        rng = np.random.default_rng(seed)
        count = min(max(1, round(fraction * len(runs))), len(runs) - 1)
        held = set(rng.permutation(runs)[:count].tolist())
        return [t for t in transitions if t.run_id not in held], [t for t in transitions if t.run_id in held]
    cut = len(transitions) - max(1, round(fraction * len(transitions)))
    if cut < 1:
        return list(transitions), []
    return list(transitions[:cut]), list(transitions[cut:])


def make_heldout(transitions: Sequence[Transition], gamma: float) -> HeldOut:
    """Observed discounted returns per contiguous run sequence (see the module doc)."""
    returns, complete = discounted_returns(transitions, gamma)
    if complete.any():
        mask, targets = complete, "complete"
    else:
        mask, targets = np.ones(len(transitions), dtype=bool), "truncated"
    return HeldOut(list(transitions), returns, mask, targets)


@torch.no_grad()
def evaluate_heldout(policy: PolicyBundle, heldout: HeldOut, batch_size: int = 256) -> dict[str, float]:
    """Decision accuracies, NLL and value error of `policy` on the held-out set (module doc)."""
    if not len(heldout):
        return {}
    device = torch.device(policy.device)
    agree_row = agree_pair = agree_op = 0
    nll = 0.0
    values = np.zeros(len(heldout), dtype=np.float64)
    items = heldout.transitions
    for begin in range(0, len(items), batch_size):
        chunk = items[begin : begin + batch_size]
        observations = [t.obs for t in chunk]
        actions = torch.from_numpy(np.stack([np.asarray(t.action, dtype=np.int64) for t in chunk])).to(device)
        hidden = stack_hidden(policy, chunk, device)
        result = policy.evaluate(observations, actions, hidden)
        dist = policy.distribution(observations, hidden)  # type: ignore[attr-defined]
        greedy = dist.sample(deterministic=True)
        flat = dist.batch.ptr[:-1] + actions[:, 0]
        op_at_recorded = dist.op_probs()[flat].argmax(-1)
        agree_row += int((greedy == actions).all(-1).sum())
        agree_pair += int((greedy[:, :2] == actions[:, :2]).all(-1).sum())
        agree_op += int((op_at_recorded == actions[:, 1]).sum())
        nll -= float(result.log_probs.double().sum())
        values[begin : begin + len(chunk)] = result.values.double().cpu().numpy()
    n = len(heldout)
    err = (values - heldout.returns)[heldout.value_mask]
    return {
        "heldout": float(n),
        "action_accuracy": agree_row / n,
        "node_op_accuracy": agree_pair / n,
        "op_accuracy": agree_op / n,
        "nll": nll / n,
        "value_mse": float(np.mean(err**2)) if err.size else float("nan"),
    }


@torch.no_grad()
def evaluate_sim(
    policy: PolicyBundle,
    episodes: int,
    config: SimConfig,
    *,
    seed: int,
    num_envs: int = 8,
    deterministic: bool = True,
) -> tuple[float, float]:
    """(mean, sd) episode return of `episodes` simulator episodes on the hosts of `seed`.

    Runs in a torch RNG fork so evaluating never changes the training run's random stream."""
    from esperd.sim.evaluate import run_episodes

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        results = run_episodes(
            policy,
            episodes,
            num_envs=max(1, min(num_envs, episodes)),
            config=config,
            seed=seed,
            deterministic=deterministic,
        )
    forget = getattr(policy, "forget", None)
    if forget is not None:
        forget([r.run_id for r in results])
    returns = np.array([r.episode_return for r in results], dtype=np.float64)
    return float(returns.mean()), float(returns.std())
