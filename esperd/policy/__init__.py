"""Tamiyo's policies behind one PolicyBundle interface: heuristic, gnn, lstm, random.

    from esperd.policy import PolicyConfig, create_policy
    policy = create_policy("gnn", PolicyConfig(name="gnn"), "cpu")
    result = policy.act(observations)            # one forward for the whole batch
    for decision in result.decisions: ...        # op WAIT means publish nothing

Imports nothing of NATS or the scheduler; reads only esperd.analyzer.observation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from esperd.lazy import lazy_exports

if TYPE_CHECKING:
    from esperd.policy.base import ACTION_FIELDS, Action, ActResult, Decision, EvalResult, PolicyBundle
    from esperd.policy.checkpoint import (
        CheckpointError,
        CheckpointInfo,
        ServingPolicy,
        build_serving_policy,
        load_policy_checkpoint,
        save_policy_checkpoint,
    )
    from esperd.policy.config import HeuristicConfig, PolicyConfig
    from esperd.policy.gnn import GNNPolicy
    from esperd.policy.heuristic import HeuristicPolicy
    from esperd.policy.lstm import LSTMPolicy
    from esperd.policy.registry import (
        UnknownPolicyError,
        create_policy,
        get_policy_class,
        register_policy,
        registered_policies,
    )

_EXPORTS = {
    "ACTION_FIELDS": "base",
    "ActResult": "base",
    "Action": "base",
    "CheckpointError": "checkpoint",
    "CheckpointInfo": "checkpoint",
    "Decision": "base",
    "EvalResult": "base",
    "GNNPolicy": "gnn",
    "HeuristicConfig": "config",
    "HeuristicPolicy": "heuristic",
    "LSTMPolicy": "lstm",
    "PolicyBundle": "base",
    "PolicyConfig": "config",
    "ServingPolicy": "checkpoint",
    "UnknownPolicyError": "registry",
    "build_serving_policy": "checkpoint",
    "create_policy": "registry",
    "get_policy_class": "registry",
    "load_policy_checkpoint": "checkpoint",
    "register_policy": "registry",
    "registered_policies": "registry",
    "save_policy_checkpoint": "checkpoint",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)
