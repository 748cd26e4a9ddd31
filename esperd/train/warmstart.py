"""Warm start for `esperd train --warm-start REFERENCE`: clone a reference policy in the simulator.

    esperd train --algo ppo --sim --warm-start heuristic --warm-start-steps 8192 ...

Before the first RL update the reference policy (`heuristic`: the daemon's rule-based policy,
the one a learned policy has to beat; `scripted`: esperd.sim.ScriptedPolicy, better rules that
use telemetry the heuristic ignores) plays `steps` simulator steps on hosts of its own (sim seed
`seed` + 30,000, so neither the training hosts nor the evaluation hosts), with the training
reward (the heuristic leaves to the host the optional levers the policy leaves to it, `[policy]
levers`, so it demonstrates what the policy can do); `esperd.learn.imitation.fit_imitation` then
fits the policy's decision heads to the reference's decisions and its value head to the returns
the reference earned. Every tenth run of those demonstrations is held out to report how often the
fitted policy's greedy decision is the reference's (`agreement_after`).

This module sits beside esperd.train because it needs both the simulator and the learner
(esperd.learn must not import esperd.sim, which imports esperd.learn.rewards).
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from esperd.learn.config import ImitationConfig
from esperd.learn.experience import Transition
from esperd.learn.imitation import ImitationStats, fit_imitation
from esperd.policy.base import PolicyBundle
from esperd.policy.config import ALL_OPTIONAL_LEVERS, PolicyConfig
from esperd.policy.registry import create_policy
from esperd.sim.config import SimConfig
from esperd.sim.env import SimEnv
from esperd.sim.policies import ScriptedPolicy
from esperd.sim.rollout import Actor, play, step_transitions

__all__ = ["REFERENCES", "WARM_START_SEED_OFFSET", "record_demonstrations", "reference_policy", "warm_start"]

REFERENCES = ("heuristic", "scripted")
WARM_START_SEED_OFFSET = 30_000
HOLDOUT_EVERY = 10  # every tenth demonstrated run is held out to measure agreement


def reference_policy(name: str, levers: frozenset[str] | None = None) -> Actor:
    """A fresh reference policy by name (one of REFERENCES); `levers`: the optional levers the
    heuristic sets (None: all; the scripted policy sets its own)."""
    if name == "heuristic":
        config = PolicyConfig(name="heuristic")
        if levers is not None:
            chosen = tuple(lever for lever in ALL_OPTIONAL_LEVERS if lever in levers)
            config = msgspec.structs.replace(config, levers=chosen)
        return create_policy("heuristic", config, "cpu")  # type: ignore[return-value]
    if name == "scripted":
        return ScriptedPolicy()
    raise ValueError(f"warm start reference must be one of {', '.join(REFERENCES)}, not {name!r}")


def record_demonstrations(
    reference: Actor, env: SimEnv, rounds: int, levers: frozenset[str] | None = None
) -> list[Transition]:
    """`rounds` steps of every env of `env` (freshly reset) decided by `reference`, in step order.

    The reference acts deterministically; log_prob and value are 0 (it has none). `levers`: the
    optional levers its action rows set (None: all; see rollout.play)."""
    steps = play(env, reference, env.reset(), deterministic=True, apply_rows=True, levers=levers)
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
    levers = getattr(policy, "levers", None) if reference == "heuristic" else None
    actor = reference_policy(reference, levers)
    env = SimEnv(envs, sim_config, seed=seed + WARM_START_SEED_OFFSET)
    demonstrations = record_demonstrations(actor, env, max(1, -(-steps // envs)), levers)
    train_part, held = split_runs(demonstrations)
    return fit_imitation(policy, train_part, config, holdout=held), train_part
