"""The one loop that lets a policy act in the simulator, shared by training, warm start and evaluation.

`play` steps a SimEnv with an actor's decisions, forgets the runs whose episodes ended (a
recurrent policy's or the heuristic's per-run memory; a new episode runs under a new id) and
yields each step. What a caller keeps differs: `esperd.train` and `esperd.train.warmstart` turn steps
into Transitions (`step_transitions`), `esperd.sim.evaluate` keeps the finished episodes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from esperd.analyzer.observation import Observation
from esperd.learn.experience import Transition
from esperd.sim.env import EpisodeResult, SimEnv


class Actor(Protocol):
    """Anything with `act(observations, deterministic)`: a PolicyBundle or an esperd.sim.policies policy."""

    def act(self, observations: Sequence[Observation], deterministic: bool = ...) -> Any: ...


def action_rows(result: Any) -> np.ndarray:
    """int64 [B, ACTION_WIDTH] from an ActResult (a PolicyBundle) or action rows (esperd.sim policies)."""
    actions = getattr(result, "actions", result)
    return np.asarray(actions.numpy() if hasattr(actions, "numpy") else actions, dtype=np.int64)


@dataclass
class SimStep:
    """One step of every env: what the actor saw and chose, and what followed."""

    observations: list[Observation]  # what the actor decided on
    result: Any  # what `act` returned (an ActResult, or action rows)
    actions: np.ndarray  # int64 [E, ACTION_WIDTH], the rows of `result`
    following: list[Observation]  # each env's next observation (a new episode's first, after a done)
    rewards: np.ndarray  # [E]
    dones: np.ndarray  # [E] the episode ended with this step
    episodes: list[EpisodeResult]  # the episodes that ended with this step, in env order


def play(
    env: SimEnv,
    actor: Actor,
    observations: list[Observation],
    *,
    deterministic: bool,
    apply_rows: bool = False,
    levers: frozenset[str] | None = None,
) -> Iterator[SimStep]:
    """Step `env` from `observations` with `actor`'s decisions, one SimStep per step, for as long
    as the caller takes them (the actor is asked only when the next step is taken).

    `apply_rows`: step the env with the action rows (what a Transition records) rather than with
    what `act` returned (a PolicyBundle's decisions), `levers` being the optional levers the
    actor sets (PolicyConfig.levers; None: all): the others its rows leave to the host."""
    forget = getattr(actor, "forget", None)
    while True:
        result = actor.act(observations, deterministic)
        actions = action_rows(result)
        stepped = env.step(actions, levers=levers) if apply_rows else env.step(result)
        following, rewards, dones, infos = stepped
        episodes = [info.episode for info in infos if info.episode is not None]
        if episodes and forget is not None:
            forget([episode.run_id for episode in episodes])
        yield SimStep(observations, result, actions, following, rewards, dones, episodes)
        observations = following


def step_transitions(
    step: SimStep,
    *,
    policy_version: int = 0,
    log_probs: Sequence[float] | None = None,
    values: Sequence[float] | None = None,
    hidden: np.ndarray | None = None,
) -> list[Transition]:
    """One Transition per env of `step`: terminal when its episode ended (no next_obs), else its
    next_obs is the env's next observation. Without log_probs and values (a reference policy has
    none) both are 0."""
    transitions = []
    for e, obs in enumerate(step.observations):
        done = bool(step.dones[e])
        transitions.append(
            Transition(
                obs=obs,
                action=step.actions[e].copy(),
                log_prob=0.0 if log_probs is None else log_probs[e],
                value=0.0 if values is None else values[e],
                policy_version=policy_version,
                reward=float(step.rewards[e]),
                done=done,
                next_obs=None if done else step.following[e],
                hidden=None if hidden is None else hidden[e].copy(),
            )
        )
    return transitions
