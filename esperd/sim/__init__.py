"""A vectorized simulator of host training runs speaking the daemon's observations and actions.

numpy + `contracts` + the analyzer and rewards (no NATS, no torch); the NATS host lives in
`esperd.sim.host` and `python -m esperd.sim` runs it against a live esperd.
"""

from __future__ import annotations

from esperd.sim.config import SimConfig
from esperd.sim.dynamics import Command, HostBatch
from esperd.sim.env import EpisodeResult, SimEnv, StepInfo
from esperd.sim.evaluate import Score, run_episodes, score
from esperd.sim.policies import RandomPolicy, ScriptedPolicy, WaitPolicy

__all__ = [
    "Command",
    "EpisodeResult",
    "HostBatch",
    "RandomPolicy",
    "Score",
    "ScriptedPolicy",
    "SimConfig",
    "SimEnv",
    "StepInfo",
    "WaitPolicy",
    "run_episodes",
    "score",
]
