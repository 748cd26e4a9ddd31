"""The PolicyBundle protocol and the decision types every policy returns.

A bundle wraps one policy (rules or an nn.Module) behind one interface used by
both the serving path (`act`) and the learner (`evaluate`). Decisions are
factored: per run one node (layer), one op, and the levers that op carries
(observation.LEVERS: GERMINATE's, SET_ALPHA_TARGET's).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import msgspec
import torch
from torch import nn

from esperd.analyzer.observation import (
    ACTION_FIELDS as ACTION_FIELDS,  # re-exported: the action layout is the policy's too
    ACTION_WIDTH as ACTION_WIDTH,
    OPS,
    OPTIONAL_LEVERS,
    LeverFields,
    Observation,
    counted_levers,
    lever_values as observation_lever_values,
)
from esperd_contracts import AlphaCurve, AlphaSpeed, BlendAlgorithm, Blueprint, IsolationMode, Op, Tempo

(
    NODE,
    OP,
    BLUEPRINT,
    BLEND,
    TEMPO,
    DWELL,
    ISOLATION,
    LR_MULTIPLIER,
    STEEPNESS,
    ALPHA_TARGET,
    ALPHA_SPEED,
    ALPHA_CURVE,
) = range(ACTION_WIDTH)
ACTION_COLUMN = {name: i for i, name in enumerate(ACTION_FIELDS)}
#: Every optional lever on (the default of PolicyConfig.levers).
ALL_LEVERS: frozenset[str] = frozenset(OPTIONAL_LEVERS)


def pad_action(row: Sequence[int]) -> list[int]:
    """An action row with its missing trailing levers set to 0 ([node, op, blueprint] and the like
    from rule-based code), checked to fit ACTION_WIDTH."""
    if len(row) > ACTION_WIDTH:
        raise ValueError(f"an action row has at most {ACTION_WIDTH} columns, got {len(row)}")
    return [int(x) for x in row] + [0] * (ACTION_WIDTH - len(row))


def legal_action_row(row: Sequence[int]) -> list[int]:
    """The row with every lever its op does not sample set to 0 (see counted_levers)."""
    out = pad_action(row)
    keep = {ACTION_COLUMN[name] for name in counted_levers(OPS[out[OP]], out[BLEND])}
    return [v if i <= OP or i in keep else 0 for i, v in enumerate(out)]


class Action(msgspec.Struct, frozen=True, array_like=True):
    """One run's factored action as indices (observation.LEVERS). A lever its op does not sample
    is 0 and ignored (see counted_levers)."""

    node: int  # index into the observation's node arrays
    op: int  # index into observation.OPS
    blueprint: int = 0  # index into observation.BLUEPRINTS
    blend: int = 0  # index into observation.BLENDS
    tempo: int = 0  # index into observation.TEMPOS
    dwell: int = 0  # index into observation.DWELLS
    isolation: int = 0  # index into observation.ISOLATIONS
    lr_multiplier: int = 0  # index into observation.LR_MULTIPLIERS
    steepness: int = 0  # index into observation.STEEPNESSES
    alpha_target: int = 0  # index into observation.ALPHA_TARGETS
    alpha_speed: int = 0  # index into observation.ALPHA_SPEEDS
    alpha_curve: int = 0  # index into observation.ALPHA_CURVES

    def as_list(self) -> list[int]:
        return list(msgspec.structs.astuple(self))


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    """One run's decision in wire terms. op WAIT means: publish nothing. A lever is None when its op
    does not carry it, or when the policy leaves it to the host (PolicyConfig.levers)."""

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
    dwell_epochs: int | None = None
    isolation: IsolationMode | None = None
    lr_multiplier: float | None = None
    steepness: float | None = None
    alpha_target: float | None = None
    alpha_speed: AlphaSpeed | None = None
    alpha_curve: AlphaCurve | None = None


@dataclass(frozen=True, slots=True, eq=False)
class ActResult:
    """What `act` returns for a batch of B runs. Tensors live on the CPU and carry no graph.

    `hidden` is the recurrent state the decision was made *from* ([B, 2, H], h and c),
    for recurrent policies only; pass it back to `evaluate` to reproduce log-probs.
    """

    actions: torch.Tensor  # int64 [B, ACTION_WIDTH], columns ACTION_FIELDS
    log_probs: torch.Tensor  # float32 [B]
    values: torch.Tensor  # float32 [B]
    confidences: torch.Tensor  # float32 [B]
    urgencies: torch.Tensor  # float32 [B]
    decisions: list[Decision]
    hidden: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.decisions)

    def rows(self, indices: Sequence[int]) -> ActResult:
        """The decisions at `indices`, in that order."""
        index = torch.as_tensor(list(indices), dtype=torch.int64)
        return ActResult(
            actions=self.actions[index],
            log_probs=self.log_probs[index],
            values=self.values[index],
            confidences=self.confidences[index],
            urgencies=self.urgencies[index],
            decisions=[self.decisions[i] for i in indices],
            hidden=None if self.hidden is None else self.hidden[index],
        )


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

    `runs_inline`: `act` is cheap enough to run on the event loop (rule-based policies), so the
    decision loop skips the hop to its policy thread, which costs more than their whole batch.
    """

    name: str
    device: torch.device
    is_learnable: bool
    is_recurrent: bool
    runs_inline: bool

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
        sequences: Sequence[Sequence[int]] | None = None,
    ) -> EvalResult:
        """`sequences`: consecutive steps of one run each (indices into `observations`), which a
        recurrent policy unrolls through time from the `hidden` of their first step."""
        ...

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
    levers: frozenset[str] = ALL_LEVERS,
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
        levers=levers,
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
    levers: frozenset[str] = ALL_LEVERS,
) -> list[Decision]:
    """build_decisions from Python rows and floats (what the neural policies' sampler yields).

    `levers`: the optional levers the policy sets; the others are left to the host (None), but
    for SET_ALPHA_TARGET's target, which a host needs: without the lever it is 1.0, a full blend.
    """
    columns = zip(confidences, urgencies, log_probs, values, strict=True)
    decisions = []
    for obs, row, (conf, urg, logp, value) in zip(observations, actions, columns, strict=True):
        action = Action(*row)
        op = OPS[action.op]
        decisions.append(
            Decision(
                run_id=obs.run_id,
                layer_id=int(obs.layer_ids[action.node]),
                op=op,
                action=action,
                confidence=min(max(conf, 0.0), 1.0),
                urgency=min(max(urg, 0.0), 1.0),
                log_prob=logp,
                value=value,
                policy=policy,
                policy_version=version,
                **lever_values(op, action, levers),
            )
        )
    return decisions


def lever_values(op: Op, action: Action, levers: frozenset[str] = ALL_LEVERS) -> LeverFields:
    """The Decision (and wire) fields an action's op carries (observation.lever_values)."""
    return observation_lever_values(op, action.as_list(), levers)
