"""Warm start for `esperd train --warm-start REFERENCE`: clone a reference policy in the simulator.

    esperd train --algo ppo --sim --warm-start heuristic --warm-start-steps 8192 ...

Before the first RL update the reference policy (`heuristic`: the daemon's rule-based policy,
the one a learned policy has to beat; `scripted`: esperd.sim.ScriptedPolicy, better rules that
use telemetry the heuristic ignores) plays `steps` simulator steps on hosts of its own (sim seed
`seed` + 30,000, so neither the training hosts nor the evaluation hosts), with the training
reward; `esperd.learn.imitation.fit_imitation` then fits the policy's decision heads to the
reference's decisions and its value head to the returns the reference earned. Every tenth run
of those demonstrations is held out to report how often the fitted policy's greedy decision is
the reference's (`agreement_after`).

This module sits beside esperd.train because it needs both the simulator and the learner
(esperd.learn must not import esperd.sim, which imports esperd.learn.rewards).
"""

from __future__ import annotations

from collections.abc import Sequence

from esperd.learn.config import ImitationConfig
from esperd.learn.experience import Transition
from esperd.learn.imitation import ImitationStats, fit_imitation
from esperd.policy.base import PolicyBundle
from esperd.policy.config import PolicyConfig
from esperd.policy.registry import create_policy
from esperd.sim.config import SimConfig
from esperd.sim.env import SimEnv
from esperd.sim.policies import ScriptedPolicy
from esperd.sim.rollout import Actor, play, step_transitions

__all__ = ["REFERENCES", "WARM_START_SEED_OFFSET", "record_demonstrations", "reference_policy", "warm_start"]

REFERENCES = ("heuristic", "scripted")
WARM_START_SEED_OFFSET = 30_000
HOLDOUT_EVERY = 10  # every tenth demonstrated run is held out to measure agreement


def reference_policy(name: str) -> Actor:
    """A fresh reference policy by name (one of REFERENCES)."""
    if name == "heuristic":
        return create_policy("heuristic", PolicyConfig(name="heuristic"), "cpu")  # type: ignore[return-value]
    if name == "scripted":
        return ScriptedPolicy()
    raise ValueError(f"warm start reference must be one of {', '.join(REFERENCES)}, not {name!r}")


def record_demonstrations(reference: Actor, env: SimEnv, rounds: int) -> list[Transition]:
    """`rounds` steps of every env of `env` (freshly reset) decided by `reference`, in step order.

    The reference acts deterministically; log_prob and value are 0 (it has none)."""
    steps = play(env, reference, env.reset(), deterministic=True, apply_rows=True)
    transitions: list[Transition] = []
    for _ in range(rounds):
        transitions.extend(step_transitions(next(steps)))
    env.close()
    return transitions


def split_runs(transitions: Sequence[Transition]) -> tuple[list[Transition], list[Transition]]:
    """(train, held-out): every HOLDOUT_EVERY-th run, in order of first appearance, is held out."""
    order = {run: i for i, run in enumerate(dict.fromkeys(t.run_id for t in transitions))}
    held = {run for run, i in order.items() if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1}
    return [t for t in transitions if t.run_id not in held], [t for t in transitions if t.run_id in held]


def warm_start(
    policy: PolicyBundle,
    reference: str,
    *,
    steps: int,
    sim_config: SimConfig,
    envs: int = 8,
    seed: int = 0,
    config: ImitationConfig | None = None,
) -> tuple[ImitationStats, list[Transition]]:
    """Fit `policy` in place to `reference`'s decisions over ~`steps` simulator steps (module doc);
    (what the fit did, the demonstrations it learned from)."""
    actor = reference_policy(reference)
    env = SimEnv(envs, sim_config, seed=seed + WARM_START_SEED_OFFSET)
    demonstrations = record_demonstrations(actor, env, max(1, -(-steps // envs)))
    train_part, held = split_runs(demonstrations)
    return fit_imitation(policy, train_part, config, holdout=held), train_part
