"""A vectorized simulator of host training runs speaking the daemon's observations and actions.

numpy + `contracts` + the analyzer and rewards (no NATS, no torch); the NATS host lives in
`esperd.sim.host` and `python -m esperd.sim` runs it against a live esperd.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from esperd.lazy import lazy_exports

if TYPE_CHECKING:
    from esperd.sim.config import SimConfig
    from esperd.sim.dynamics import Command, HostBatch
    from esperd.sim.env import EpisodeResult, SimEnv, StepInfo
    from esperd.sim.evaluate import Score, run_episodes, score
    from esperd.sim.policies import RandomPolicy, ScriptedPolicy, WaitPolicy

_EXPORTS = {
    "Command": "dynamics",
    "EpisodeResult": "env",
    "HostBatch": "dynamics",
    "RandomPolicy": "policies",
    "Score": "evaluate",
    "ScriptedPolicy": "policies",
    "SimConfig": "config",
    "SimEnv": "env",
    "StepInfo": "env",
    "WaitPolicy": "policies",
    "run_episodes": "evaluate",
    "score": "evaluate",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)
