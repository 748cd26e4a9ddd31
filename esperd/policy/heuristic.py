"""The rule-based policy: the seed documents' lifecycle rules, deterministic and mask-obeying.

Per run, each step, it lists candidate actions and issues the best one that clears
both the confidence and the urgency threshold (else WAIT):

  lifecycle (ranked first: finish what is in flight before starting more)
    TRAINING     -> ADVANCE after `train_dwell_epochs` in stage;
    BLENDING     -> ADVANCE once the seed's tempo has elapsed (or alpha reached 1);
    PROBATIONARY -> after `probation_epochs`: FOSSILIZE if the counterfactual is more than
                    noise (`fossilize_z` standard errors above 0, the analyzer's
                    counterfactual_z) and the run improved; PRUNE if it is as clearly harmful,
                    or still undecided after `probation_max_epochs`.
  germination (only from epoch `min_epoch`, once the host has stabilized -- |val acc
  change| <= `stabilize_delta` or a validation plateau -- or is capacity-bound (train accuracy
  within `underfit_gap` of val accuracy, below `underfit_max_train_accuracy`), below `max_active_seeds`,
  counting germinations issued but not yet applied by the host, for up to an epoch, and
  only while the run has epochs enough left to finish a lifecycle, when the host says)
    a DORMANT slot on a layer that is problematic, unhealthy and declining; or, on a
    plateau of `plateau_patience` epochs or capacity-bound, the layer below `plateau_health_max`
    with the largest gradient norm (where the loss is most sensitive; health breaks near-ties).
    Never on a slot under embargo (`embargo_epochs` after it was pruned). The blueprint
    is legal for the layer (a blueprint the host rejected there is masked), has the lowest
    pruning penalty in this run (each prune adds `blueprint_penalty`, decaying by
    `blueprint_penalty_decay` per epoch: after a prune the next germination rotates), then
    the best fossilization record on this kind of layer across runs, then the kind's prior
    order (BLUEPRINT_PREFERENCE: an MLP seed for a dense layer, a light conv for a conv, more
    heads for an attention layer).
  levers, by rule: the configured blend; the configured tempo, or with selection "pareto" the
    tempo 002's multi-objective choice prefers once blend shocks are on record (a seed's shock:
    how far the run's validation accuracy fell while it blended in); dwell = `train_dwell_epochs` (a host that
    honours it starts blending by itself then, one that does not gets the ADVANCE above);
    isolation by the layer's family (isolated for CNN layers, co-adapting for transformer
    ones) unless configured; the configured LR multiplier and, with a sigmoid blend, steepness.
    It never issues SET_ALPHA_TARGET (a blend runs its tempo, then ADVANCE). An optional lever
    not in `[policy] levers` is left to the host: not sent, its action-row column at the choice a
    learned policy's head is held at (`levers = []`: the heuristic with the default levers).

Small per-run memory (what it germinated where, embargoes, penalties) is kept keyed
by run id in a bounded LRU; `forget(run_ids)` drops it. The blueprint record spans runs
(at most one entry per layer kind and blueprint) and lives as long as the policy. Not learnable: log_prob and
value are 0, and `evaluate` raises NotImplementedError.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import msgspec
import numpy as np
import torch
from torch import nn

from esperd import pareto
from esperd.analyzer.observation import (
    BLEND_INDEX,
    BLUEPRINT_INDEX,
    BLUEPRINTS,
    COUNTERFACTUAL_Z_SCALE,
    DWELLS,
    EPOCHS_REMAINING_SCALE,
    GLOBAL_FEATURE_INDEX,
    ISOLATION_INDEX,
    LAYER_KINDS,
    LR_MULTIPLIERS,
    NODE_FEATURE_INDEX,
    OP_INDEX,
    STAGE_INDEX,
    STEEPNESSES,
    TEMPO_INDEX,
    TEMPOS,
    Observation,
    epochs_left,
)
from esperd.policy.base import (
    ACTION_WIDTH,
    BLEND,
    BLUEPRINT,
    DWELL,
    ISOLATION,
    LR_MULTIPLIER,
    STEEPNESS,
    TEMPO,
    ActResult,
    Decision,
    EvalResult,
    build_decisions,
    legal_action_row,
    pad_action,
)
from esperd.policy.batch import lever_held_choices
from esperd.policy.config import HeuristicConfig, PolicyConfig
from esperd.policy.registry import register_policy
from esperd_contracts import BlendAlgorithm, Blueprint, BlueprintFamily, IsolationMode, Op, SeedStage, Tempo

_N = NODE_FEATURE_INDEX
_G = GLOBAL_FEATURE_INDEX
# Stage index -> counts as an active seed (a lookup table: np.isin is far slower on a handful of
# nodes; benchmarks/RESULTS.md, "Measurements quoted in the code").
_ACTIVE_STAGE = np.zeros(max(STAGE_INDEX.values()) + 1, dtype=bool)
_ACTIVE_STAGE[
    [
        STAGE_INDEX[s]
        for s in (SeedStage.GERMINATED, SeedStage.TRAINING, SeedStage.BLENDING, SeedStage.PROBATIONARY)
    ]
] = True
_PRUNED, _FOSSILIZED, _DORMANT = (
    STAGE_INDEX[s] for s in (SeedStage.PRUNED, SeedStage.FOSSILIZED, SeedStage.DORMANT)
)
_TRAINING, _BLENDING, _PROBATIONARY = (
    STAGE_INDEX[s] for s in (SeedStage.TRAINING, SeedStage.BLENDING, SeedStage.PROBATIONARY)
)
_SEED_IN_FLIGHT = frozenset((_TRAINING, _BLENDING, _PROBATIONARY))  # the stages with lifecycle candidates
#: Candidates are ranked by op first: resolve seeds in flight before germinating new ones.
_OP_RANK = {Op.PRUNE: 3, Op.FOSSILIZE: 3, Op.ADVANCE: 2, Op.GERMINATE: 1}
# Feature scalings, inverted here (see observation.NODE_FEATURES / GLOBAL_FEATURES).
_EPOCHS_IN_STAGE_SCALE = 12.0
_PLATEAU_SCALE = 10.0
_TREND_SCALE = 0.1  # a slope of -0.1 per signal counts as fully declining (seed: trend < -0.1 is problematic)
_KIND_COLUMNS = slice(NODE_FEATURE_INDEX["kind_conv"], NODE_FEATURE_INDEX["kind_conv"] + len(LAYER_KINDS))

B = Blueprint
_CONV_PREFERENCE = (
    B.CONV_LIGHT, B.BOTTLENECK, B.DEPTHWISE, B.CONV_HEAVY,
    B.SQUEEZE_EXCITE, B.CONV_LORA, B.DILATED, B.CONV_NORM,
)  # fmt: skip
_LINEAR_PREFERENCE = (
    B.MLP, B.MLP_SMALL, B.GATED_MLP, B.LORA_LARGE, B.LORA, B.TF_NORM, B.ATTENTION, B.FLEX_ATTENTION
)  # fmt: skip
#: The prior order of blueprints per layer kind, best fit first: a dense layer is grown with a dense
#: (MLP) seed before an attention seed, a convolution with a light convolution. Outcomes across
#: runs (fossilized or pruned) move a blueprint up or down from here; see `_BlueprintRecord`.
BLUEPRINT_PREFERENCE: dict[str, tuple[Blueprint, ...]] = {
    "conv": _CONV_PREFERENCE,
    "linear": _LINEAR_PREFERENCE,
    "mlp": (
        B.MLP, B.GATED_MLP, B.MLP_SMALL, B.LORA_LARGE, B.LORA, B.TF_NORM, B.ATTENTION, B.FLEX_ATTENTION
    ),
    "attention": (
        B.ATTENTION, B.LORA_LARGE, B.LORA, B.FLEX_ATTENTION, B.MLP_SMALL, B.MLP, B.GATED_MLP, B.TF_NORM
    ),
    "embedding": (
        B.LORA, B.LORA_LARGE, B.MLP_SMALL, B.MLP, B.GATED_MLP, B.TF_NORM, B.ATTENTION, B.FLEX_ATTENTION
    ),
}  # fmt: skip
del B


@dataclass(slots=True)
class _Seed:
    blueprint: Blueprint
    tempo: Tempo
    germinated_epoch: int
    kind: str = "other"  # the layer's kind, for the outcome record
    # The blend shock: the run's validation accuracy before the blend, and the lowest during it.
    before_blend: float | None = None
    lowest_in_blend: float = math.inf
    shock_recorded: bool = False

    def watch_blend(self, stage: int, val_accuracy: float) -> float | None:
        """Follow the run's accuracy through this seed's blend. Returns the blend shock once, when
        the seed reaches probation: how far the accuracy fell during the blend below where it
        stood before (>= 0). None otherwise, and for a run at accuracy 0 before the blend (a host
        that reports none, val_accuracy being optional): no fall is possible there, and a 0 on
        record would count as evidence that blends are safe."""
        if stage == _TRAINING:
            self.before_blend = val_accuracy  # the latest before the blend starts
        elif stage == _BLENDING:
            self.lowest_in_blend = min(self.lowest_in_blend, val_accuracy)
        elif stage == _PROBATIONARY and not self.shock_recorded:
            self.shock_recorded = True  # seen through its blend, or not at all: once either way
            if self.before_blend and math.isfinite(self.lowest_in_blend):
                return max(self.before_blend - self.lowest_in_blend, 0.0)
        return None


#: A blend shock this large (5 accuracy points) is as risky as it gets.
_SHOCK_SCALE = 0.05


class _ShockRecord:
    """Blend shocks across runs, seed document 002's risk: how much validation accuracy runs lost
    while one of our seeds blended in, per (layer kind, blueprint) and per (layer kind, tempo).
    An estimate shrinks towards the kind's mean over `strength` pseudo-seeds, so a blueprint or
    tempo never tried there is neither safer nor riskier than the rest; a tempo's shock is
    recorded per unit of its per-epoch alpha step (shock x epochs), so an untried tempo's prior
    scales with how fast it blends."""

    def __init__(self, strength: float) -> None:
        self.strength = strength
        self.by_blueprint: dict[tuple[str, _Option], list[float]] = {}  # -> [seeds, total shock]
        self.by_tempo: dict[tuple[str, _Option], list[float]] = {}  # -> [seeds, total shock x epochs]

    def record(self, kind: str, blueprint: Blueprint, tempo: Tempo, shock: float) -> None:
        _add(self.by_blueprint, (kind, blueprint), shock)
        _add(self.by_tempo, (kind, tempo), shock * tempo.epochs)

    def blueprint_risk(self, kind: str, blueprint: Blueprint) -> float:
        return _shock_risk(self._estimate(self.by_blueprint, kind, blueprint))

    def tempo_risk(self, kind: str, tempo: Tempo) -> float:
        return _shock_risk(self._estimate(self.by_tempo, kind, tempo) / tempo.epochs)

    def _estimate(self, table: dict[tuple[str, _Option], list[float]], kind: str, option: _Option) -> float:
        seeds = total = 0.0
        for (k, _), (n, value) in table.items():
            if k == kind:
                seeds, total = seeds + n, total + value
        prior = total / seeds if seeds else 0.0
        n, value = table.get((kind, option), (0.0, 0.0))
        return (self.strength * prior + value) / (self.strength + n)


_Option = Blueprint | Tempo


def _add(table: dict[tuple[str, _Option], list[float]], key: tuple[str, _Option], value: float) -> None:
    entry = table.setdefault(key, [0.0, 0.0])
    entry[0] += 1.0
    entry[1] += value


def _shock_risk(shock: float) -> float:
    return min(1.0, shock / _SHOCK_SCALE)


class _BlueprintRecord:
    """What worked, across runs: per (layer kind, blueprint), how many of our seeds were fossilized
    and how many pruned. A blueprint's score is its posterior fossilization rate, starting from a
    prior that follows BLUEPRINT_PREFERENCE (`strength` pseudo-seeds), so a few outcomes reorder it."""

    def __init__(self, strength: float) -> None:
        self.strength = strength
        self.outcomes: dict[tuple[str, Blueprint], list[int]] = {}  # -> [fossilized, pruned]

    def record(self, kind: str, blueprint: Blueprint, fossilized: bool) -> None:
        counts = self.outcomes.setdefault((kind, blueprint), [0, 0])
        counts[0 if fossilized else 1] += 1

    def score(self, kind: str, blueprint: Blueprint, preference: tuple[Blueprint, ...]) -> float:
        rank = preference.index(blueprint) if blueprint in preference else len(preference)
        prior = 0.6 - 0.3 * rank / max(len(preference), 1)  # 0.6 for the first choice, 0.3 for the last
        won, lost = self.outcomes.get((kind, blueprint), (0, 0))
        return (prior * self.strength + won) / (self.strength + won + lost)

    def objectives(
        self,
        kind: str,
        blueprint: Blueprint,
        preference: tuple[Blueprint, ...],
        penalty: float,
        shock_risk: float = 0.0,
    ) -> pareto.Objectives:
        """002's three objectives for growing `blueprint` on a layer of `kind`:
        performance  its posterior fossilization rate on this kind (`score`);
        risk         the chance it is pruned again or hurts the run: its prune rate on this kind
                     across runs (a prior of none), combined with this run's decaying prune
                     penalty and its blend shocks on this kind (`_ShockRecord`);
        adaptability its fossilization rate on every kind of layer (a prior of one half):
                     how well it has done wherever it was tried."""
        won, lost = self.outcomes.get((kind, blueprint), (0, 0))
        kind_risk = lost / (self.strength + won + lost)
        run_risk = 1.0 - math.exp(-penalty)
        won_all = lost_all = 0
        for (_, bp), (w, l_) in self.outcomes.items():
            if bp is blueprint:
                won_all, lost_all = won_all + w, lost_all + l_
        adaptability = (0.5 * self.strength + won_all) / (self.strength + won_all + lost_all)
        return pareto.Objectives(
            performance=self.score(kind, blueprint, preference),
            risk=1.0 - (1.0 - kind_risk) * (1.0 - run_risk) * (1.0 - shock_risk),
            adaptability=adaptability,
        )


@dataclass(slots=True)
class _RunMemory:
    """What the heuristic remembers about one run."""

    seeds: dict[int, _Seed] = field(default_factory=dict)  # layer id -> seed we germinated
    embargo_until: dict[int, int] = field(default_factory=dict)  # layer id -> first epoch allowed again
    penalties: dict[Blueprint, tuple[float, int]] = field(default_factory=dict)  # bp -> (value, at epoch)

    def penalty(self, blueprint: Blueprint, epoch: int, decay: float) -> float:
        value, at = self.penalties.get(blueprint, (0.0, epoch))
        return value * decay ** max(epoch - at, 0)

    def expire(self, epoch: int, decay: float) -> None:
        self.embargo_until = {k: v for k, v in self.embargo_until.items() if v > epoch}
        self.penalties = {
            bp: (v, at) for bp, (v, at) in self.penalties.items() if self.penalty(bp, epoch, decay) > 1e-3
        }

    def pruned(self, layer_id: int, epoch: int, config: HeuristicConfig) -> _Seed | None:
        """A slot was pruned (by us, or seen PRUNED): embargo it, penalise its blueprint once.
        Returns our seed that was pruned, if it was one of ours."""
        self.embargo_until[layer_id] = max(self.embargo_until.get(layer_id, 0), epoch + config.embargo_epochs)
        seed = self.seeds.pop(layer_id, None)
        if seed is not None:
            old = self.penalty(seed.blueprint, epoch, config.blueprint_penalty_decay)
            self.penalties[seed.blueprint] = (old + config.blueprint_penalty, epoch)
        return seed


@dataclass(frozen=True, slots=True)
class _Candidate:
    node: int
    op: Op
    confidence: float
    urgency: float
    blueprint: Blueprint | None = None
    tempo: Tempo | None = None  # with blueprint, for a GERMINATE

    def key(self) -> tuple[int, float, int]:
        return (_OP_RANK[self.op], self.confidence * self.urgency, -self.node)


_WAIT = _Candidate(node=0, op=Op.WAIT, confidence=1.0, urgency=0.0)


def _nearest(choices: Sequence[float], value: float) -> int:
    """Index of the choice closest to `value` (the first on a tie)."""
    return min(range(len(choices)), key=lambda i: abs(choices[i] - value))


def _layer_kind(obs: Observation, node: int) -> str:
    """The node's LAYER_KINDS entry from its one-hot features ("other" when none is set)."""
    row = obs.node_features[node, _KIND_COLUMNS]
    best = int(np.argmax(row))
    return LAYER_KINDS[best] if row[best] >= 0.5 else "other"


@register_policy("heuristic")
class HeuristicPolicy:
    """Deterministic rules. `act` is safe to call from any thread."""

    name = "heuristic"
    is_learnable = False
    is_recurrent = False
    network = None
    runs_inline = True  # tens of µs per observation: cheaper than a hop to the policy thread

    def __init__(self, config: PolicyConfig | None = None, device: torch.device | str = "cpu") -> None:
        self.config = config if config is not None else PolicyConfig()
        self.rules: HeuristicConfig = self.config.heuristic
        self.levers = frozenset(self.config.levers)
        self._held = lever_held_choices(self.levers)  # action-row column -> choice, levers left out
        self.device = torch.device(device)
        self._version = 1  # the rule set's version; bump when the rules change meaning
        self._memory: OrderedDict[str, _RunMemory] = OrderedDict()
        self._record = _BlueprintRecord(self.rules.blueprint_prior_strength)
        self._shocks = _ShockRecord(self.rules.blueprint_prior_strength)
        self._lock = threading.Lock()

    @property
    def version(self) -> int:
        return self._version

    @version.setter
    def version(self, value: int) -> None:
        self._version = int(value)

    # ------------------------------------------------------------ serving

    def act(
        self,
        observations: Sequence[Observation],
        deterministic: bool = False,
        hidden: torch.Tensor | None = None,
    ) -> ActResult:
        """One rule-based decision per observation (`deterministic`, `hidden` are ignored)."""
        with self._lock:
            choices = [self._decide(obs, self._run_memory(obs.run_id)) for obs in observations]
        rows = [self._action_row(obs, c) for obs, c in zip(observations, choices, strict=True)]
        actions = torch.tensor(rows, dtype=torch.int64).reshape(-1, ACTION_WIDTH)
        confidences = torch.tensor([c.confidence for c in choices], dtype=torch.float32)
        urgencies = torch.tensor([c.urgency for c in choices], dtype=torch.float32)
        zeros = torch.zeros(len(choices))
        return ActResult(
            actions=actions,
            log_probs=zeros,
            values=zeros.clone(),
            confidences=confidences,
            urgencies=urgencies,
            decisions=[
                self._exact_levers(d)
                for d in build_decisions(
                    observations,
                    actions,
                    confidences=confidences,
                    urgencies=urgencies,
                    log_probs=zeros,
                    values=zeros,
                    policy=self.name,
                    version=self._version,
                    levers=self.levers,
                )
            ],
        )

    def _action_row(self, obs: Observation, choice: _Candidate) -> list[int]:
        """The choice as an action row: its levers by rule, each at the nearest choice the action
        space has (the Decision carries the rule's exact values, see `_exact_levers`)."""
        row = pad_action([choice.node, OP_INDEX[choice.op]])
        if choice.op is not Op.GERMINATE:
            return row
        assert choice.blueprint is not None
        rules = self.rules
        row[BLUEPRINT] = BLUEPRINT_INDEX[choice.blueprint]
        row[BLEND] = BLEND_INDEX[rules.blend]
        row[TEMPO] = TEMPO_INDEX[choice.tempo or rules.tempo]
        row[DWELL] = _nearest(DWELLS, rules.train_dwell_epochs)
        row[ISOLATION] = ISOLATION_INDEX[self._isolation(obs, choice.node)]
        row[LR_MULTIPLIER] = _nearest(LR_MULTIPLIERS, rules.lr_multiplier)
        row[STEEPNESS] = _nearest(STEEPNESSES, rules.steepness)
        for column, held in self._held.items():
            row[column] = held
        return legal_action_row(row)

    def _isolation(self, obs: Observation, node: int) -> IsolationMode:
        """The isolation rule: the configured mode, or by the layer's family (the seed documents')."""
        if self.rules.isolation != "family":
            return IsolationMode(self.rules.isolation)
        cnn = obs.node_features[node, _N["family_cnn"]] >= 0.5
        return IsolationMode.ISOLATED if cnn else IsolationMode.SHARED

    def _exact_levers(self, decision: Decision) -> Decision:
        """A GERMINATE with the rules' own dwell, LR multiplier and steepness where it sets them (the
        action row holds the nearest choices)."""
        if decision.op is not Op.GERMINATE:
            return decision
        rules, levers = self.rules, self.levers
        sigmoid = decision.blend is BlendAlgorithm.SIGMOID
        return msgspec.structs.replace(
            decision,
            dwell_epochs=rules.train_dwell_epochs if "dwell" in levers else None,
            lr_multiplier=rules.lr_multiplier if "lr_multiplier" in levers else None,
            steepness=rules.steepness if sigmoid and "steepness" in levers else None,
        )

    def _run_memory(self, run_id: str) -> _RunMemory:
        memory = self._memory.get(run_id)
        if memory is None:
            memory = self._memory[run_id] = _RunMemory()
            while len(self._memory) > self.rules.max_tracked_runs:
                self._memory.popitem(last=False)
        self._memory.move_to_end(run_id)
        return memory

    def _decide(self, obs: Observation, memory: _RunMemory) -> _Candidate:
        rules = self.rules
        memory.expire(obs.epoch, rules.blueprint_penalty_decay)
        self._observe_outcomes(obs, memory)
        candidates = [*self._lifecycle_candidates(obs, memory), *self._germination_candidates(obs, memory)]
        eligible = [
            c
            for c in candidates
            if obs.op_mask[c.node, OP_INDEX[c.op]]
            and c.confidence >= rules.confidence_threshold
            and c.urgency >= rules.urgency_threshold
        ]
        if not eligible:
            return _WAIT
        best = max(eligible, key=_Candidate.key)
        self._commit(best, obs, memory)
        return best

    # ------------------------------------------------------------ memory

    def _observe_outcomes(self, obs: Observation, memory: _RunMemory) -> None:
        """Learn from stages: PRUNED slots get an embargo, finished seeds are forgotten, and a
        blend's shock is recorded once its seed reaches probation."""
        # One pass over plain lists: cheaper than a numpy mask per stage at these sizes.
        for node, (layer_id, stage) in enumerate(
            zip(obs.layer_ids.tolist(), obs.stages.tolist(), strict=True)
        ):
            if stage in _SEED_IN_FLIGHT:
                ours = memory.seeds.get(layer_id)
                if ours is not None:
                    shock = ours.watch_blend(stage, float(obs.global_features[_G["val_accuracy"]]))
                    if shock is not None:
                        self._shocks.record(ours.kind, ours.blueprint, ours.tempo, shock)
            elif stage == _PRUNED:
                self._settle(memory.pruned(layer_id, obs.epoch, self.rules), fossilized=False)
            elif stage == _FOSSILIZED:
                self._settle(memory.seeds.pop(layer_id, None), fossilized=True)
            elif stage == _DORMANT:
                seed = memory.seeds.get(layer_id)
                if seed is None:
                    continue
                # The host rejected it (the analyzer masks a rejected blueprint), or it is still
                # DORMANT over an epoch after we germinated: the command was rejected or lost.
                rejected = not obs.blueprint_mask[node, BLUEPRINT_INDEX[seed.blueprint]]
                if rejected or obs.epoch - seed.germinated_epoch > 1:
                    del memory.seeds[layer_id]

    def _commit(self, choice: _Candidate, obs: Observation, memory: _RunMemory) -> None:
        layer_id = int(obs.layer_ids[choice.node])
        if choice.op is Op.GERMINATE:
            assert choice.blueprint is not None
            kind = _layer_kind(obs, choice.node)
            tempo = choice.tempo or self.rules.tempo
            memory.seeds[layer_id] = _Seed(choice.blueprint, tempo, obs.epoch, kind)
        elif choice.op is Op.PRUNE:
            self._settle(memory.pruned(layer_id, obs.epoch, self.rules), fossilized=False)
        elif choice.op is Op.FOSSILIZE:
            self._settle(memory.seeds.pop(layer_id, None), fossilized=True)

    def _settle(self, seed: _Seed | None, *, fossilized: bool) -> None:
        """One of our seeds ended: remember for its layer kind whether its blueprint worked."""
        if seed is not None:
            self._record.record(seed.kind, seed.blueprint, fossilized)

    # ------------------------------------------------------------ rules

    def _lifecycle_candidates(self, obs: Observation, memory: _RunMemory) -> Iterator[_Candidate]:
        rules = self.rules
        features = obs.node_features
        for node, stage in enumerate(obs.stages.tolist()):
            if stage not in _SEED_IN_FLIGHT:
                continue
            epochs_in_stage = round(float(features[node, _N["epochs_in_stage"]]) * _EPOCHS_IN_STAGE_SCALE)
            if stage == _TRAINING:
                overdue = epochs_in_stage - rules.train_dwell_epochs
                if overdue >= 0:
                    yield _Candidate(node, Op.ADVANCE, 0.9, min(1.0, 0.6 + 0.1 * overdue))
            elif stage == _BLENDING:
                seed = memory.seeds.get(int(obs.layer_ids[node]))
                tempo = seed.tempo if seed is not None else rules.tempo
                overdue = epochs_in_stage - tempo.epochs
                if overdue >= 0 or features[node, _N["alpha"]] >= 0.999:
                    yield _Candidate(node, Op.ADVANCE, 0.95, min(1.0, 0.6 + 0.1 * max(overdue, 0)))
            elif epochs_in_stage >= rules.probation_epochs:  # PROBATIONARY
                verdict = self._verdict(features[node], epochs_in_stage)
                if verdict is not None:
                    yield _Candidate(node, *verdict)

    def _verdict(self, features: np.ndarray, epochs_in_stage: int) -> tuple[Op, float, float] | None:
        """(op, confidence, urgency) for a seed on probation, or None to keep measuring.

        Fossilize when its contribution is more than noise (z >= fossilize_z) and the run improved;
        prune when it is clearly harmful (z <= -fossilize_z), when it helped but the run did not
        improve, or when `probation_max_epochs` have not settled it either way.
        """
        rules = self.rules
        counterfactual = float(features[_N["counterfactual"]])
        improvement = float(features[_N["total_improvement"]])
        z = float(features[_N["counterfactual_z"]]) * COUNTERFACTUAL_Z_SCALE
        certainty = min(1.0, abs(z) / max(2.0 * rules.fossilize_z, 1e-6))
        if z >= rules.fossilize_z and counterfactual > rules.fossilize_min_counterfactual:
            if improvement > rules.fossilize_min_improvement:
                return Op.FOSSILIZE, 0.8 + 0.2 * certainty, 0.6
            return Op.PRUNE, 0.8, 0.7
        if z <= -rules.fossilize_z:
            return Op.PRUNE, 0.8 + 0.2 * certainty, 0.7
        if epochs_in_stage >= rules.probation_max_epochs:
            return Op.PRUNE, 0.8, 0.6  # unproven: it has not shown it earns its parameters
        return None

    def _may_germinate(self, obs: Observation, memory: _RunMemory) -> bool:
        """Run-level gate: late enough, host stabilized, and room for another seed."""
        rules = self.rules
        g = obs.global_features
        plateau = self._plateau_epochs(obs)
        stabilized = (
            plateau >= rules.plateau_patience
            or abs(g[_G["val_accuracy_delta"]]) <= rules.stabilize_delta
            or self._underfitting(obs)
        )
        # Germinations we issued that the host has not applied yet count as active too.
        dormant = obs.layer_ids[obs.stages == STAGE_INDEX[SeedStage.DORMANT]].tolist()
        pending = sum(1 for layer_id in dormant if layer_id in memory.seeds)
        active = int(np.count_nonzero(_ACTIVE_STAGE[obs.stages])) + pending
        return (
            obs.epoch >= rules.min_epoch
            and stabilized
            and active < rules.max_active_seeds
            and self._time_to_finish(obs)
        )

    def _underfitting(self, obs: Observation) -> bool:
        """Capacity-bound: the host reports a training accuracy, it is not near perfect, and it is
        within `underfit_gap` of the validation accuracy (more capacity, not more data, would help)."""
        g, rules = obs.global_features, self.rules
        train, val = float(g[_G["train_accuracy"]]), float(g[_G["val_accuracy"]])
        return 0.0 < train < rules.underfit_max_train_accuracy and train - val <= rules.underfit_gap

    def lifecycle_epochs(self, tempo: Tempo | None = None) -> int:
        """Epochs a seed germinated now needs to be judged: germination, dwell, blend (at `tempo`,
        the configured one by default), probation."""
        rules = self.rules
        blend = (tempo or rules.tempo).epochs
        return 1 + rules.train_dwell_epochs + blend + rules.probation_epochs

    def _time_to_finish(self, obs: Observation) -> bool:
        """Whether a seed germinated now can finish its lifecycle before the run ends (True if the
        host does not say how long it trains)."""
        left = epochs_left(obs)
        return left is None or left >= self.lifecycle_epochs()

    @staticmethod
    def _plateau_epochs(obs: Observation) -> int:
        return round(float(obs.global_features[_G["plateau_epochs"]]) * _PLATEAU_SCALE)

    def _germination_candidates(self, obs: Observation, memory: _RunMemory) -> Iterator[_Candidate]:
        if not self._may_germinate(obs, memory):
            return
        rules = self.rules
        f = obs.node_features
        health, trend = f[:, _N["health"]], f[:, _N["health_trend"]]
        problematic = f[:, _N["is_problematic"]] >= 0.5
        plateau = self._plateau_epochs(obs)
        on_plateau = plateau >= rules.plateau_patience
        dormant = (obs.stages == STAGE_INDEX[SeedStage.DORMANT]) & obs.op_mask[:, OP_INDEX[Op.GERMINATE]]
        declining = problematic & (health < rules.unhealthy_threshold) & (trend < -rules.decline_threshold)
        grow = on_plateau or self._underfitting(obs)
        # Where the loss is most sensitive (largest gradient norm among the candidates) more capacity
        # pays most; health alone picked the wrong layer on two of three real hosts (tuning seeds of
        # benchmarks/real_hosts.py), so it only breaks near-ties.
        gradient = f[:, _N["gradient_norm"]] * (dormant & ~declining)
        sensitivity = gradient / max(float(gradient.max()), 1e-9)
        wanted = declining | (grow & (health < rules.plateau_health_max))
        for node in np.flatnonzero(dormant & wanted):
            layer_id = int(obs.layer_ids[node])
            if memory.embargo_until.get(layer_id, obs.epoch) > obs.epoch:
                continue  # pruned here recently
            blueprint = self._choose_blueprint(obs, int(node), memory)
            if blueprint is None:
                continue
            h, t = float(health[node]), float(trend[node])
            if declining[node]:
                severity = (
                    np.clip((rules.unhealthy_threshold - h) / max(rules.unhealthy_threshold, 1e-6), 0.0, 1.0)
                    + np.clip(-t / _TREND_SCALE, 0.0, 1.0)
                    + 1.0
                ) / 3.0
                confidence, urgency = 0.6 + 0.4 * float(severity), min(1.0, max(0.0, 1.0 - h))
            else:  # plateau or capacity-bound: the longer the plateau, the surer
                stuck = max(plateau - rules.plateau_patience, 0) / rules.plateau_patience
                confidence = 0.7 + 0.3 * min(1.0, stuck)
                urgency = 0.5 + 0.45 * float(sensitivity[node]) + 0.05 * min(1.0, max(0.0, 1.0 - h))
            tempo = self._choose_tempo(obs, int(node))
            yield _Candidate(int(node), Op.GERMINATE, confidence, urgency, blueprint, tempo)

    def _choose_blueprint(self, obs: Observation, node: int, memory: _RunMemory) -> Blueprint | None:
        """The legal blueprint of the layer's family that fits its kind best: least penalised in this
        run (a prune here rotates to another), then best fossilization record on this kind of layer
        across runs, then the kind's prior order (BLUEPRINT_PREFERENCE)."""
        cnn = obs.node_features[node, _N["family_cnn"]] >= 0.5
        family = BlueprintFamily.CNN if cnn else BlueprintFamily.TRANSFORMER
        legal = [bp for bp, ok in zip(BLUEPRINTS, obs.blueprint_mask[node], strict=True) if ok]
        fitting = [bp for bp in legal if bp.family is family] or legal
        if not fitting:
            return None
        kind = _layer_kind(obs, node)
        preference = BLUEPRINT_PREFERENCE.get(kind) or (_CONV_PREFERENCE if cnn else _LINEAR_PREFERENCE)
        decay = self.rules.blueprint_penalty_decay
        record = self._record
        if self.config.selection == "pareto":
            scored = [
                record.objectives(
                    kind,
                    bp,
                    preference,
                    memory.penalty(bp, obs.epoch, decay),
                    self._shocks.blueprint_risk(kind, bp),
                )
                for bp in fitting
            ]
            return fitting[pareto.select(scored)]

        def key(bp: Blueprint) -> tuple[float, float, int, int]:
            rank = preference.index(bp) if bp in preference else len(preference)
            score = record.score(kind, bp, preference)
            return (memory.penalty(bp, obs.epoch, decay), -score, rank, BLUEPRINT_INDEX[bp])

        return min(fitting, key=key)

    def _choose_tempo(self, obs: Observation, node: int) -> Tempo:
        """The blend's tempo. With selection "argmax", the configured one. With "pareto", 002's
        choice among the tempos whose lifecycle fits the epochs left:
        performance  the configured tempo is the operator's pick (0.6; the others 0.45);
        risk         the blend shocks seen on this kind of layer at that tempo (`_ShockRecord`);
        adaptability the share of the run left once the seed is judged (of 50 epochs when the
                     host does not say how long it trains).
        Without shocks on record the configured tempo wins; large shocks slow the blend down."""
        configured = self.rules.tempo
        if self.config.selection != "pareto":
            return configured
        left = epochs_left(obs)
        horizon = float(left) if left is not None else EPOCHS_REMAINING_SCALE
        kind = _layer_kind(obs, node)
        fitting = [t for t in TEMPOS if t is configured or self.lifecycle_epochs(t) <= horizon]
        scored = [
            pareto.Objectives(
                performance=0.6 if tempo is configured else 0.45,
                risk=self._shocks.tempo_risk(kind, tempo),
                adaptability=max(horizon - self.lifecycle_epochs(tempo), 0.0) / max(horizon, 1.0),
            )
            for tempo in fitting
        ]
        return fitting[pareto.select(scored)]

    # ------------------------------------------------------------ learning (none)

    def evaluate(
        self,
        observations: Sequence[Observation],
        actions: torch.Tensor,
        hidden: torch.Tensor | None = None,
        sequences: Sequence[Sequence[int]] | None = None,
    ) -> EvalResult:
        """Not learnable: a learner must check `is_learnable` first."""
        raise NotImplementedError("the heuristic policy is not learnable; it has no log-probs to evaluate")

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor], version: int | None = None) -> None:
        if state:
            raise ValueError(f"the heuristic policy has no weights; got keys {sorted(state)[:5]}")
        if version is not None:
            self._version = int(version)

    def parameters(self) -> Iterator[nn.Parameter]:
        return iter(())

    def forget(self, run_ids: Sequence[str]) -> None:
        """Drop the memory (seeds, embargoes, penalties) of these runs."""
        with self._lock:
            for run_id in run_ids:
                self._memory.pop(run_id, None)

    def blueprint_record(self) -> dict[tuple[str, Blueprint], tuple[int, int]]:
        """(layer kind, blueprint) -> (fossilized, pruned) of the seeds this policy germinated."""
        with self._lock:
            return {key: (won, lost) for key, (won, lost) in self._record.outcomes.items()}

    def reset_run(self, run_id: str) -> None:
        self.forget([run_id])

    @property
    def tracked_runs(self) -> int:
        return len(self._memory)

    def __repr__(self) -> str:
        return f"HeuristicPolicy(version={self._version})"
