"""The training policy acting in the simulator (esperd.sim.rollout.play): transitions for the learner."""

from __future__ import annotations

from collections.abc import Callable

from esperd.analyzer.observation import Observation
from esperd.learn.experience import Transition
from esperd.policy.base import PolicyBundle
from esperd.sim.env import SimEnv
from esperd.sim.rollout import play, step_transitions


def collect(
    env: SimEnv,
    policy: PolicyBundle,
    observations: list[Observation],
    steps: int,
    on_episode: Callable[[float], None] | None = None,
) -> tuple[list[Transition], list[Observation]]:
    """`steps` steps of every env with the sampling policy; (transitions in step order, next observations).

    A finished episode's last step is terminal (done, no next_obs); the last step of the batch is
    not (its next_obs is the observation the next batch starts from, for bootstrapping)."""
    transitions: list[Transition] = []
    play_steps = play(env, policy, observations, deterministic=False)
    for _ in range(steps):
        step = next(play_steps)
        result = step.result
        transitions += step_transitions(
            step,
            policy_version=policy.version,
            log_probs=result.log_probs.tolist(),
            values=result.values.tolist(),
            hidden=None if result.hidden is None else result.hidden.numpy(),
        )
        if on_episode is not None:
            for episode in step.episodes:
                on_episode(episode.episode_return)
        observations = step.following
    return transitions, observations
