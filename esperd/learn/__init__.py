"""Learning from outcomes: rewards (and, later, experience, PPO, IMPALA). Knows nothing of NATS."""

from __future__ import annotations

from esperd.learn.rewards import (
    TERMS,
    LossGovernor,
    RewardConfig,
    RewardMode,
    RewardStep,
    RewardTracker,
    discount,
    episode_flags,
    param_rent,
    stage_potential,
)

__all__ = [
    "TERMS",
    "LossGovernor",
    "RewardConfig",
    "RewardMode",
    "RewardStep",
    "RewardTracker",
    "discount",
    "episode_flags",
    "param_rent",
    "stage_potential",
]
