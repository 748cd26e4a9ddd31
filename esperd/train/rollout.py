"""The training policy acting in the simulator: transitions for the learner."""

from __future__ import annotations

from collections.abc import Callable

from esperd.analyzer.observation import Observation
from esperd.learn.experience import Transition
from esperd.policy.base import PolicyBundle
from esperd.sim.env import SimEnv


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
    for _ in range(steps):
        result = policy.act(observations)
        following, rewards, dones, infos = env.step(result)
        actions = result.actions.numpy()
        log_probs, values = result.log_probs.tolist(), result.values.tolist()
        hidden = None if result.hidden is None else result.hidden.numpy()
        finished = []
        for e, obs in enumerate(observations):
            done = bool(dones[e])
            transitions.append(
                Transition(
                    obs=obs,
                    action=actions[e].copy(),
                    log_prob=log_probs[e],
                    value=values[e],
                    policy_version=policy.version,
                    reward=float(rewards[e]),
                    done=done,
                    next_obs=None if done else following[e],
                    hidden=None if hidden is None else hidden[e].copy(),
                )
            )
            episode = infos[e].episode
            if episode is not None:
                finished.append(episode.run_id)
                if on_episode is not None:
                    on_episode(episode.episode_return)
        if finished:
            policy.forget(finished)
        observations = following
    return transitions, observations
