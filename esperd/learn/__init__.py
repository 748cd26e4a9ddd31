"""Learning from outcomes: rewards, experience, buffers, PPO, IMPALA, the learner. Knows nothing of NATS."""

from __future__ import annotations

from esperd.learn.buffers import ReplayBuffer, RolloutBuffer, SampledBatch
from esperd.learn.experience import Transition
from esperd.learn.gae import compute_gae
from esperd.learn.impala import ImpalaConfig, ImpalaLearner
from esperd.learn.learner import BreakerConfig, Learner, LearnerConfig, LearnerStatus
from esperd.learn.persist import BufferFileError, load_experience, save_experience
from esperd.learn.ppo import NonFiniteError, PPOConfig, PPOLearner, UpdateStats
from esperd.learn.recorder import Recorder, RecorderStats
from esperd.learn.rewards import RewardConfig, RewardStep, RewardTracker
from esperd.learn.vtrace import VTraceReturns, from_importance_weights

__all__ = [
    "BreakerConfig",
    "BufferFileError",
    "ImpalaConfig",
    "ImpalaLearner",
    "Learner",
    "LearnerConfig",
    "LearnerStatus",
    "NonFiniteError",
    "PPOConfig",
    "PPOLearner",
    "Recorder",
    "RecorderStats",
    "ReplayBuffer",
    "RewardConfig",
    "RewardStep",
    "RewardTracker",
    "RolloutBuffer",
    "SampledBatch",
    "Transition",
    "UpdateStats",
    "VTraceReturns",
    "compute_gae",
    "from_importance_weights",
    "load_experience",
    "save_experience",
]
