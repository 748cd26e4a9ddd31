"""One step of experience, as every part of the learner sees it.

A Transition references Observations instead of copying them: an Observation's
topology arrays (layer ids, edges, normalized adjacency, blueprint mask) are shared
read-only per run and topology version, and `next_obs` is the very object the next
transition holds as `obs`. So a buffer stores the topology once per run and version
and per-step feature arrays, never a Python object per node.
"""

from __future__ import annotations

import msgspec
import numpy as np

from esperd.analyzer.observation import Observation


class Transition(msgspec.Struct, kw_only=True, gc=False):
    """The decision made for one run at one step, and what came of it.

    Not tracked by the garbage collector (`gc=False`): its fields are arrays, numbers and
    frozen Observations, so it can never be part of a reference cycle, and a replay buffer of
    100,000 tracked transitions would make every full collection, which stalls decisions, walk
    all of them."""

    obs: Observation  # what the policy saw (cooldown masks applied)
    action: np.ndarray  # int64 [ACTION_WIDTH]: node, op, then each lever (observation.ACTION_FIELDS)
    log_prob: float  # behaviour log-probability at decision time
    value: float  # behaviour value estimate at decision time
    policy_version: int
    reward: float = 0.0
    done: bool = False  # the episode ended after this step (terminal: no bootstrap)
    truncated: bool = False  # the episode was cut here (eviction): bootstrap from next_obs / value
    next_obs: Observation | None = None  # the next decision's observation (None when done)
    hidden: np.ndarray | None = None  # recurrent policies: float32 [2, H] state the step started from

    @property
    def run_id(self) -> str:
        return self.obs.run_id
