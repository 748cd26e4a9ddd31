"""Tamiyo's policies behind one PolicyBundle interface: heuristic, gnn, lstm, random.

    from esperd.policy import PolicyConfig, create_policy
    policy = create_policy("gnn", PolicyConfig(name="gnn"), "cpu")
    result = policy.act(observations)            # one forward for the whole batch
    for decision in result.decisions: ...        # op WAIT means publish nothing

Imports nothing of NATS or the scheduler; reads only esperd.analyzer.observation.
"""

from __future__ import annotations

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

__all__ = [
    "ACTION_FIELDS",
    "ActResult",
    "Action",
    "CheckpointError",
    "CheckpointInfo",
    "Decision",
    "EvalResult",
    "GNNPolicy",
    "HeuristicConfig",
    "HeuristicPolicy",
    "LSTMPolicy",
    "PolicyBundle",
    "PolicyConfig",
    "ServingPolicy",
    "UnknownPolicyError",
    "build_serving_policy",
    "create_policy",
    "get_policy_class",
    "load_policy_checkpoint",
    "register_policy",
    "registered_policies",
    "save_policy_checkpoint",
]
