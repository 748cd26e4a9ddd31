"""The PolicyBundle protocol and the decision types every policy returns.

A bundle wraps one policy (rules or an nn.Module) behind one interface used by
both the serving path (`act`) and the learner (`evaluate`). Decisions are
factored: per run one node (layer), one op, and for GERMINATE three levers.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import msgspec
import torch
from torch import nn

from contracts import BlendAlgorithm, Blueprint, Op, Tempo
from esperd.analyzer.observation import BLENDS, BLUEPRINTS, OPS, TEMPOS, Observation

#: Columns of an action tensor [B, 5]: indices into OPS / BLUEPRINTS / BLENDS / TEMPOS.
ACTION_FIELDS: tuple[str, ...] = ("node", "op", "blueprint", "blend", "tempo")
NODE, OP, BLUEPRINT, BLEND, TEMPO = range(len(ACTION_FIELDS))


class Action(msgspec.Struct, frozen=True, array_like=True):
    """One run's factored action as indices. Levers are 0 (and ignored) unless op is GERMINATE."""

    node: int  # index into the observation's node arrays
    op: int  # index into observation.OPS
    blueprint: int = 0  # index into observation.BLUEPRINTS
    blend: int = 0  # index into observation.BLENDS
    tempo: int = 0  # index into observation.TEMPOS

    def as_list(self) -> list[int]:
        return [self.node, self.op, self.blueprint, self.blend, self.tempo]


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    """One run's decision in wire terms. op WAIT means: publish nothing."""

    run_id: str
    layer_id: int
    op: Op
    action: Action
    blueprint: Blueprint | None = None
    blend: BlendAlgorithm | None = None
    tempo: Tempo | None = None
    confidence: float = 0.0  # in [0, 1]
    urgency: float = 0.0  # in [0, 1]
    log_prob: float = 0.0
    value: float = 0.0
    policy: str = ""
    policy_version: int = 0
    reason: str = ""  # why, in words, when the policy can say (the heuristic can)


@dataclass(frozen=True, slots=True, eq=False)
class ActResult:
    """What `act` returns for a batch of B runs. Tensors live on the CPU and carry no graph.

    `hidden` is the recurrent state the decision was made *from* ([B, 2, H], h and c),
    for recurrent policies only; pass it back to `evaluate` to reproduce log-probs.
    """

    actions: torch.Tensor  # int64 [B, 5], columns ACTION_FIELDS
    log_probs: torch.Tensor  # float32 [B]
    values: torch.Tensor  # float32 [B]
    confidences: torch.Tensor  # float32 [B]
    urgencies: torch.Tensor  # float32 [B]
    decisions: list[Decision]
    hidden: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.decisions)


@dataclass(frozen=True, slots=True, eq=False)
class EvalResult:
    """What `evaluate` returns: differentiable tensors on the policy's device."""

    log_probs: torch.Tensor  # [B]
    values: torch.Tensor  # [B]
    entropy: torch.Tensor  # [B], entropy of the whole factored action distribution


@runtime_checkable
class PolicyBundle(Protocol):
    """The one interface between decisions and learning.

    Thread-safety: `act`, `evaluate` and `load_state_dict` may be called from
    different threads; each bundle serialises them, so a decision is made wholly
    by one weight version.
    """

    name: str
    device: torch.device
    is_learnable: bool
    is_recurrent: bool

    @property
    def version(self) -> int: ...

    @version.setter
    def version(self, value: int) -> None: ...

    @property
    def network(self) -> nn.Module | None:
        """The inner network (possibly torch.compile'd); None for rule-based policies."""
        ...

    def act(
        self,
        observations: Sequence[Observation],
        deterministic: bool = False,
        hidden: torch.Tensor | None = None,
    ) -> ActResult: ...

    def evaluate(
        self,
        observations: Sequence[Observation],
        actions: torch.Tensor,
        hidden: torch.Tensor | None = None,
    ) -> EvalResult: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: Mapping[str, torch.Tensor], version: int | None = None) -> None: ...

    def parameters(self) -> Iterator[nn.Parameter]: ...

    def forget(self, run_ids: Sequence[str]) -> None:
        """Drop any per-run memory (recurrent state, embargoes) for these runs."""
        ...


def build_decisions(
    observations: Sequence[Observation],
    actions: torch.Tensor,
    *,
    confidences: torch.Tensor,
    urgencies: torch.Tensor,
    log_probs: torch.Tensor,
    values: torch.Tensor,
    policy: str,
    version: int,
) -> list[Decision]:
    """Wire-level Decisions from CPU action tensors (one `.tolist()` each, no per-item tensor ops)."""
    return decisions_from_lists(
        observations,
        actions.tolist(),
        confidences=confidences.tolist(),
        urgencies=urgencies.tolist(),
        log_probs=log_probs.tolist(),
        values=values.tolist(),
        policy=policy,
        version=version,
    )


def decisions_from_lists(
    observations: Sequence[Observation],
    actions: Sequence[Sequence[int]],
    *,
    confidences: Sequence[float],
    urgencies: Sequence[float],
    log_probs: Sequence[float],
    values: Sequence[float],
    policy: str,
    version: int,
) -> list[Decision]:
    """build_decisions from Python rows and floats (what the neural policies' sampler yields)."""
    columns = zip(confidences, urgencies, log_probs, values, strict=True)
    decisions = []
    for obs, row, (conf, urg, logp, value) in zip(observations, actions, columns, strict=True):
        action = Action(*row)
        op = OPS[action.op]
        germinate = op is Op.GERMINATE
        decisions.append(
            Decision(
                run_id=obs.run_id,
                layer_id=int(obs.layer_ids[action.node]),
                op=op,
                action=action,
                blueprint=BLUEPRINTS[action.blueprint] if germinate else None,
                blend=BLENDS[action.blend] if germinate else None,
                tempo=TEMPOS[action.tempo] if germinate else None,
                confidence=min(max(conf, 0.0), 1.0),
                urgency=min(max(urg, 0.0), 1.0),
                log_prob=logp,
                value=value,
                policy=policy,
                policy_version=version,
            )
        )
    return decisions
