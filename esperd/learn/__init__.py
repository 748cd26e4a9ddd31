"""Learning from outcomes: rewards, experience, buffers, PPO, IMPALA, the learner. Knows nothing of NATS."""

from __future__ import annotations

from typing import TYPE_CHECKING

from esperd.lazy import lazy_exports

if TYPE_CHECKING:
    from esperd.learn.algorithms import ImpalaAlgorithm, PPOAlgorithm
    from esperd.learn.buffers import ReplayBuffer, RolloutBuffer, SampledBatch
    from esperd.learn.config import BreakerConfig, ImpalaConfig, LearnerConfig, PPOConfig, RewardConfig
    from esperd.learn.experience import Transition
    from esperd.learn.gae import compute_gae
    from esperd.learn.impala import ImpalaUpdater
    from esperd.learn.learner import Learner, LearnerStatus
    from esperd.learn.persist import BufferFileError, load_experience, save_experience
    from esperd.learn.ppo import NonFiniteError, PPOUpdater, UpdateStats
    from esperd.learn.recorder import Recorder, RecorderStats
    from esperd.learn.rewards import RewardStep, RewardTracker
    from esperd.learn.vtrace import VTraceReturns, from_importance_weights

_EXPORTS = {
    "BreakerConfig": "config",
    "BufferFileError": "persist",
    "ImpalaAlgorithm": "algorithms",
    "ImpalaConfig": "config",
    "ImpalaUpdater": "impala",
    "Learner": "learner",
    "LearnerConfig": "config",
    "LearnerStatus": "learner",
    "NonFiniteError": "ppo",
    "PPOAlgorithm": "algorithms",
    "PPOConfig": "config",
    "PPOUpdater": "ppo",
    "Recorder": "recorder",
    "RecorderStats": "recorder",
    "ReplayBuffer": "buffers",
    "RewardConfig": "config",
    "RewardStep": "rewards",
    "RewardTracker": "rewards",
    "RolloutBuffer": "buffers",
    "SampledBatch": "buffers",
    "Transition": "experience",
    "UpdateStats": "ppo",
    "VTraceReturns": "vtrace",
    "compute_gae": "gae",
    "from_importance_weights": "vtrace",
    "load_experience": "persist",
    "save_experience": "persist",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)
