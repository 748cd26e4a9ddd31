"""The random legal controller: a baseline that acts without looking at anything but the masks.

Per run and decision it draws uniformly among WAIT (counted once) and every legal (layer, op)
pair of the observation; a GERMINATE draws its blueprint uniformly among those that fit the
layer and its other levers uniformly, a SET_ALPHA_TARGET its alpha levers. Masks make every
command it sends legal for the stage esperd last saw. It is the "random legal controller" of
the evidence rules: a learned policy or the heuristic that does not beat it has learned nothing
about where or when.

`[policy] init_seed` seeds its generator (None: fresh entropy), so a benchmark can replay it.
Not learnable: log_prob and value are 0, and `evaluate` raises NotImplementedError.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from esperd.analyzer.observation import LEVERS, OP_INDEX, Observation
from esperd.policy.base import (
    ACTION_COLUMN,
    ACTION_WIDTH,
    BLUEPRINT,
    ActResult,
    EvalResult,
    build_decisions,
    legal_action_row,
    pad_action,
)
from esperd.policy.config import PolicyConfig
from esperd.policy.registry import register_policy
from esperd_contracts import Op

_WAIT = OP_INDEX[Op.WAIT]
_GERMINATE = OP_INDEX[Op.GERMINATE]


def random_legal_action(obs: Observation, rng: np.random.Generator) -> list[int]:
    """One uniformly drawn legal action row (base.ACTION_FIELDS) for `obs`: WAIT counted once, each
    legal (node, op) pair once, then each lever that op samples uniformly (blueprints among those
    that fit the layer); the others are 0."""
    mask = obs.op_mask.copy()
    mask[:, _WAIT] = False
    nodes, ops = np.nonzero(mask)
    choice = int(rng.integers(nodes.size + 1))
    if choice == nodes.size:  # the one WAIT action
        return pad_action([0, _WAIT])
    node, op = int(nodes[choice]), int(ops[choice])
    row = pad_action([node, op])
    if op == _GERMINATE:
        blueprints = np.flatnonzero(obs.blueprint_mask[node])
        if blueprints.size == 0:  # nothing fits this layer: a germination here could only be rejected
            return pad_action([0, _WAIT])
        row[BLUEPRINT] = int(rng.choice(blueprints))
    for name, choices in LEVERS[1:]:  # uniform; legal_action_row keeps those the op samples
        row[ACTION_COLUMN[name]] = int(rng.integers(len(choices)))
    return legal_action_row(row)


@register_policy("random")
class RandomLegalPolicy:
    """Uniform over each observation's legal actions. `act` is safe to call from any thread."""

    name = "random"
    is_learnable = False
    is_recurrent = False
    network = None
    runs_inline = True  # tens of µs per observation: cheaper than a hop to the policy thread

    def __init__(self, config: PolicyConfig | None = None, device: torch.device | str = "cpu") -> None:
        self.config = config if config is not None else PolicyConfig(name="random")
        self.device = torch.device(device)
        self._version = 1
        self._rng = np.random.default_rng(self.config.init_seed)
        self._lock = threading.Lock()

    @property
    def version(self) -> int:
        return self._version

    @version.setter
    def version(self, value: int) -> None:
        self._version = int(value)

    def act(
        self,
        observations: Sequence[Observation],
        deterministic: bool = False,
        hidden: torch.Tensor | None = None,
    ) -> ActResult:
        """One uniformly drawn legal action per observation (`deterministic`, `hidden` are ignored)."""
        with self._lock:
            rows = [random_legal_action(obs, self._rng) for obs in observations]
        actions = torch.tensor(rows, dtype=torch.int64).reshape(-1, ACTION_WIDTH)
        ones, zeros = torch.ones(len(rows)), torch.zeros(len(rows))
        return ActResult(
            actions=actions,
            log_probs=zeros,
            values=zeros.clone(),
            confidences=ones,
            urgencies=ones.clone(),
            decisions=build_decisions(
                observations,
                actions,
                confidences=ones,
                urgencies=ones,
                log_probs=zeros,
                values=zeros,
                policy=self.name,
                version=self._version,
                levers=frozenset(self.config.levers),
            ),
        )

    def evaluate(
        self,
        observations: Sequence[Observation],
        actions: torch.Tensor,
        hidden: torch.Tensor | None = None,
        sequences: Sequence[Sequence[int]] | None = None,
    ) -> EvalResult:
        """Not learnable: a learner must check `is_learnable` first."""
        raise NotImplementedError("the random policy is not learnable; it has no log-probs to evaluate")

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor], version: int | None = None) -> None:
        if state:
            raise ValueError(f"the random policy has no weights; got keys {sorted(state)[:5]}")
        if version is not None:
            self._version = int(version)

    def parameters(self) -> Iterator[nn.Parameter]:
        return iter(())

    def forget(self, run_ids: Sequence[str]) -> None:
        """Nothing is kept per run."""
        del run_ids
