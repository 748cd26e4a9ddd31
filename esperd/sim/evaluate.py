"""Play whole episodes with any policy and summarize them (mean +- sd episode return, accuracy, params)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import msgspec

from esperd.sim.config import SimConfig
from esperd.sim.env import EpisodeResult, SimEnv
from esperd.sim.rollout import Actor, play


class Score(msgspec.Struct, kw_only=True):
    """Summary of episodes played by one policy."""

    policy: str
    episodes: int
    mean_return: float
    sd_return: float
    mean_accuracy: float
    mean_added_params: float
    mean_germinated: float
    mean_spikes: float

    def line(self) -> str:
        return (
            f"{self.policy:<10} return {self.mean_return:+7.3f} ± {self.sd_return:6.3f}  "
            f"accuracy {self.mean_accuracy:.4f}  added params {self.mean_added_params:9.0f}  "
            f"seeds {self.mean_germinated:5.2f}  spikes {self.mean_spikes:4.2f}  (n={self.episodes})"
        )


def run_episodes(
    policy: Actor,
    episodes: int,
    *,
    num_envs: int = 8,
    config: SimConfig | None = None,
    seed: int | None = 0,
    deterministic: bool = True,
) -> list[EpisodeResult]:
    """Play until `episodes` episodes have finished; results in finishing order (env order on ties)."""
    env = SimEnv(num_envs, config, seed)
    steps = play(env, policy, env.reset(), deterministic=deterministic)
    results: list[EpisodeResult] = []
    while len(results) < episodes:
        results.extend(next(steps).episodes)
    env.close()
    return results[:episodes]


def score(name: str, results: Sequence[EpisodeResult]) -> Score:
    """Mean and (population) standard deviation of the episodes' returns, and other means."""
    n = len(results)
    if n == 0:
        raise ValueError("no episodes to score")
    returns = [r.episode_return for r in results]
    mean = sum(returns) / n
    return Score(
        policy=name,
        episodes=n,
        mean_return=mean,
        sd_return=math.sqrt(sum((x - mean) ** 2 for x in returns) / n),
        mean_accuracy=sum(r.final_accuracy for r in results) / n,
        mean_added_params=sum(r.added_params for r in results) / n,
        mean_germinated=sum(r.germinated for r in results) / n,
        mean_spikes=sum(r.spikes for r in results) / n,
    )
