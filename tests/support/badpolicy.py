"""A deliberately bad policy for the rails tests: it germinates at every decision.

It ignores every mask but the stage (a host refuses GERMINATE on a live slot, so it picks a
dormant layer whose family some blueprint fits) and claims full confidence and urgency, so
only the rails (esperd.rails) stand between it and the host. Registered as "always_germinate".
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from esperd.analyzer.observation import OP_INDEX, STAGE_INDEX, Observation
from esperd.policy.base import ACTION_WIDTH, BLUEPRINT, ActResult, EvalResult, build_decisions, pad_action
from esperd.policy.config import PolicyConfig
from esperd.policy.registry import register_policy, registered_policies
from esperd_contracts import Op, SeedStage

_GERMINATE = OP_INDEX[Op.GERMINATE]
_WAIT = OP_INDEX[Op.WAIT]
_DORMANT = STAGE_INDEX[SeedStage.DORMANT]


def germinate_anywhere(obs: Observation) -> list[int]:
    """GERMINATE on the first dormant layer some blueprint fits (rails' masks ignored); else WAIT."""
    fits = obs.blueprint_mask.any(axis=1) & (obs.stages == _DORMANT)
    nodes = np.flatnonzero(fits)
    if nodes.size == 0:
        return pad_action([0, _WAIT])
    node = int(nodes[0])
    row = pad_action([node, _GERMINATE])
    row[BLUEPRINT] = int(np.flatnonzero(obs.blueprint_mask[node])[0])
    return row


class AlwaysGerminate:
    """Germinates whenever any layer is dormant, sure of itself every time."""

    name = "always_germinate"
    is_learnable = False
    is_recurrent = False
    runs_inline = False
    network = None

    def __init__(self, config: PolicyConfig | None = None, device: torch.device | str = "cpu") -> None:
        self.config = config if config is not None else PolicyConfig(name=self.name)
        self.device = torch.device(device)
        self.version = 1

    def act(
        self,
        observations: Sequence[Observation],
        deterministic: bool = False,
        hidden: torch.Tensor | None = None,
    ) -> ActResult:
        rows = [germinate_anywhere(obs) for obs in observations]
        actions = torch.tensor(rows, dtype=torch.int64).reshape(-1, ACTION_WIDTH)
        ones, zeros = torch.ones(len(rows)), torch.zeros(len(rows))
        decisions = build_decisions(
            observations,
            actions,
            confidences=ones,
            urgencies=ones,
            log_probs=zeros,
            values=zeros,
            policy=self.name,
            version=self.version,
        )
        return ActResult(actions, zeros, zeros.clone(), ones, ones.clone(), decisions)

    def evaluate(
        self,
        observations: Sequence[Observation],
        actions: torch.Tensor,
        hidden: torch.Tensor | None = None,
        sequences: Sequence[Sequence[int]] | None = None,
    ) -> EvalResult:
        raise NotImplementedError("not learnable")

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor], version: int | None = None) -> None:
        if version is not None:
            self.version = int(version)

    def parameters(self) -> Iterator[nn.Parameter]:
        return iter(())

    def forget(self, run_ids: Sequence[str]) -> None:
        del run_ids


if AlwaysGerminate.name not in registered_policies():
    register_policy(AlwaysGerminate.name)(AlwaysGerminate)
