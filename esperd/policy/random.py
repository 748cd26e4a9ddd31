"""The random legal controller: a baseline that acts without looking at anything but the masks.

Per run and decision it draws uniformly among WAIT (counted once) and every legal (layer, op)
pair of the observation; a GERMINATE draws its blueprint uniformly among those that fit the
layer and its blend and tempo uniformly. Masks make every command it sends legal for the
stage esperd last saw. It is the "random legal controller" of the evidence rules: a learned
policy or the heuristic that does not beat it has learned nothing about where or when.

`[policy] init_seed` seeds its generator (None: fresh entropy), so a benchmark can replay it.
Not learnable: log_prob and value are 0, and `evaluate` raises NotImplementedError.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from contracts import Op
from esperd.analyzer.observation import BLENDS, OP_INDEX, TEMPOS, Observation
from esperd.policy.base import ActResult, EvalResult, build_decisions
from esperd.policy.config import PolicyConfig
from esperd.policy.registry import register_policy

_WAIT = OP_INDEX[Op.WAIT]
_GERMINATE = OP_INDEX[Op.GERMINATE]


def random_legal_action(obs: Observation, rng: np.random.Generator) -> list[int]:
    """One uniformly drawn legal action row [node, op, blueprint, blend, tempo] for `obs`."""
    mask = obs.op_mask.copy()
    mask[:, _WAIT] = False
    nodes, ops = np.nonzero(mask)
    choice = int(rng.integers(nodes.size + 1))
    if choice == nodes.size:  # the one WAIT action
        return [0, _WAIT, 0, 0, 0]
    node, op = int(nodes[choice]), int(ops[choice])
    if op != _GERMINATE:
        return [node, op, 0, 0, 0]
    blueprints = np.flatnonzero(obs.blueprint_mask[node])
    if blueprints.size == 0:  # nothing fits this layer: a germination here could only be rejected
        return [0, _WAIT, 0, 0, 0]
    return [
        node,
        op,
        int(rng.choice(blueprints)),
        int(rng.integers(len(BLENDS))),
        int(rng.integers(len(TEMPOS))),
    ]


@register_policy("random")
class RandomLegalPolicy:
    """Uniform over each observation's legal actions. `act` is safe to call from any thread."""

    name = "random"
    is_learnable = False
    is_recurrent = False
    network = None

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
        actions = torch.tensor(rows, dtype=torch.int64).reshape(-1, 5)
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
            ),
        )

    def evaluate(
        self,
        observations: Sequence[Observation],
        actions: torch.Tensor,
        hidden: torch.Tensor | None = None,
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
