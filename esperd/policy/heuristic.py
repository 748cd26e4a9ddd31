"""The rule-based policy: the seed documents' lifecycle rules, deterministic and mask-obeying.

Per run, each step, it lists candidate actions and issues the best one that clears
both the confidence and the urgency threshold (else WAIT):

  lifecycle (ranked first: finish what is in flight before starting more)
    TRAINING     -> ADVANCE after `train_dwell_epochs` in stage;
    BLENDING     -> ADVANCE once the seed's tempo has elapsed (or alpha reached 1);
    PROBATIONARY -> after `probation_epochs`: FOSSILIZE if counterfactual > min AND
                    total improvement > min, else PRUNE.
  germination (only from epoch `min_epoch`, once the host has stabilized -- |val acc
  change| <= `stabilize_delta` or a validation plateau -- and below `max_active_seeds`,
  counting germinations issued but not yet applied by the host, for up to an epoch)
    a DORMANT slot on a layer that is problematic, unhealthy and declining; or, on a
    plateau of `plateau_patience` epochs, the least healthy layer below `plateau_health_max`.
    Never on a slot under embargo (`embargo_epochs` after it was pruned). The blueprint
    fits the layer's family and has the lowest pruning penalty (each prune adds
    `blueprint_penalty`, decaying by `blueprint_penalty_decay` per epoch), ties going
    to declaration order -- so after a prune the next germination rotates to another
    blueprint.

Small per-run memory (what it germinated where, embargoes, penalties) is kept keyed
by run id in a bounded LRU; `forget(run_ids)` drops it. Not learnable: log_prob and
value are 0, and `evaluate` raises NotImplementedError.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from contracts import Blueprint, BlueprintFamily, Op, SeedStage, Tempo
from esperd.analyzer.observation import (
    BLEND_INDEX,
    BLUEPRINT_INDEX,
    BLUEPRINTS,
    GLOBAL_FEATURE_INDEX,
    NODE_FEATURE_INDEX,
    OP_INDEX,
    STAGE_INDEX,
    TEMPO_INDEX,
    Observation,
)
from esperd.policy.base import ActResult, EvalResult, build_decisions
from esperd.policy.config import HeuristicConfig, PolicyConfig
from esperd.policy.registry import register_policy

_N = NODE_FEATURE_INDEX
_G = GLOBAL_FEATURE_INDEX
# Stage index -> counts as an active seed (a lookup table: np.isin costs ~50 µs on 20 nodes).
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


@dataclass(slots=True)
class _Seed:
    blueprint: Blueprint
    tempo: Tempo
    germinated_epoch: int


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

    def pruned(self, layer_id: int, epoch: int, config: HeuristicConfig) -> None:
        """A slot was pruned (by us, or seen PRUNED): embargo it, penalise its blueprint once."""
        self.embargo_until[layer_id] = max(self.embargo_until.get(layer_id, 0), epoch + config.embargo_epochs)
        seed = self.seeds.pop(layer_id, None)
        if seed is not None:
            old = self.penalty(seed.blueprint, epoch, config.blueprint_penalty_decay)
            self.penalties[seed.blueprint] = (old + config.blueprint_penalty, epoch)


@dataclass(frozen=True, slots=True)
class _Candidate:
    node: int
    op: Op
    confidence: float
    urgency: float
    blueprint: Blueprint | None = None

    def key(self) -> tuple[int, float, int]:
        return (_OP_RANK[self.op], self.confidence * self.urgency, -self.node)


_WAIT = _Candidate(node=0, op=Op.WAIT, confidence=1.0, urgency=0.0)


@register_policy("heuristic")
class HeuristicPolicy:
    """Deterministic rules. `act` is safe to call from any thread."""

    name = "heuristic"
    is_learnable = False
    is_recurrent = False
    network = None

    def __init__(self, config: PolicyConfig | None = None, device: torch.device | str = "cpu") -> None:
        self.config = config if config is not None else PolicyConfig()
        self.rules: HeuristicConfig = self.config.heuristic
        self.device = torch.device(device)
        self._version = 1  # the rule set's version; bump when the rules change meaning
        self._memory: OrderedDict[str, _RunMemory] = OrderedDict()
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
        actions = torch.tensor([self._action_row(c) for c in choices], dtype=torch.int64).reshape(-1, 5)
        confidences = torch.tensor([c.confidence for c in choices], dtype=torch.float32)
        urgencies = torch.tensor([c.urgency for c in choices], dtype=torch.float32)
        zeros = torch.zeros(len(choices))
        return ActResult(
            actions=actions,
            log_probs=zeros,
            values=zeros.clone(),
            confidences=confidences,
            urgencies=urgencies,
            decisions=build_decisions(
                observations,
                actions,
                confidences=confidences,
                urgencies=urgencies,
                log_probs=zeros,
                values=zeros,
                policy=self.name,
                version=self._version,
            ),
        )

    def _action_row(self, choice: _Candidate) -> list[int]:
        if choice.op is not Op.GERMINATE:
            return [choice.node, OP_INDEX[choice.op], 0, 0, 0]
        assert choice.blueprint is not None
        levers = [
            BLUEPRINT_INDEX[choice.blueprint],
            BLEND_INDEX[self.rules.blend],
            TEMPO_INDEX[self.rules.tempo],
        ]
        return [choice.node, OP_INDEX[choice.op], *levers]

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
        """Learn from stages: PRUNED slots get an embargo, finished seeds are forgotten."""
        # One pass over plain lists: cheaper than a numpy mask per stage at these sizes.
        for node, (layer_id, stage) in enumerate(
            zip(obs.layer_ids.tolist(), obs.stages.tolist(), strict=True)
        ):
            if stage == _PRUNED:
                memory.pruned(layer_id, obs.epoch, self.rules)
            elif stage == _FOSSILIZED:
                memory.seeds.pop(layer_id, None)
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
            memory.seeds[layer_id] = _Seed(choice.blueprint, self.rules.tempo, obs.epoch)
        elif choice.op is Op.PRUNE:
            memory.pruned(layer_id, obs.epoch, self.rules)
        elif choice.op is Op.FOSSILIZE:
            memory.seeds.pop(layer_id, None)

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
                counterfactual = float(features[node, _N["counterfactual"]])
                improvement = float(features[node, _N["total_improvement"]])
                if (
                    counterfactual > rules.fossilize_min_counterfactual
                    and improvement > rules.fossilize_min_improvement
                ):
                    yield _Candidate(
                        node, Op.FOSSILIZE, min(1.0, 0.8 + 5 * min(counterfactual, improvement)), 0.6
                    )
                else:
                    harm = max(0.0, -min(counterfactual, improvement))
                    yield _Candidate(node, Op.PRUNE, min(1.0, 0.8 + 5 * harm), 0.7)

    def _may_germinate(self, obs: Observation, memory: _RunMemory) -> bool:
        """Run-level gate: late enough, host stabilized, and room for another seed."""
        rules = self.rules
        g = obs.global_features
        plateau = self._plateau_epochs(obs)
        stabilized = (
            plateau >= rules.plateau_patience or abs(g[_G["val_accuracy_delta"]]) <= rules.stabilize_delta
        )
        # Germinations we issued that the host has not applied yet count as active too.
        dormant = obs.layer_ids[obs.stages == STAGE_INDEX[SeedStage.DORMANT]].tolist()
        pending = sum(1 for layer_id in dormant if layer_id in memory.seeds)
        active = int(np.count_nonzero(_ACTIVE_STAGE[obs.stages])) + pending
        return obs.epoch >= rules.min_epoch and stabilized and active < rules.max_active_seeds

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
        wanted = declining | (on_plateau & (health < rules.plateau_health_max))
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
            else:  # plateau: the longer it lasts, the surer; the sicker the layer, the sooner
                confidence = 0.7 + 0.3 * min(1.0, (plateau - rules.plateau_patience) / rules.plateau_patience)
                urgency = 0.5 + 0.5 * min(1.0, max(0.0, 1.0 - h))
            yield _Candidate(int(node), Op.GERMINATE, confidence, urgency, blueprint)

    def _choose_blueprint(self, obs: Observation, node: int, memory: _RunMemory) -> Blueprint | None:
        """Least-penalised legal blueprint of the layer's family; declaration order breaks ties."""
        family = (
            BlueprintFamily.CNN
            if obs.node_features[node, _N["family_cnn"]] >= 0.5
            else BlueprintFamily.TRANSFORMER
        )
        legal = [bp for bp, ok in zip(BLUEPRINTS, obs.blueprint_mask[node], strict=True) if ok]
        fitting = [bp for bp in legal if bp.family is family] or legal
        if not fitting:
            return None
        decay = self.rules.blueprint_penalty_decay
        return min(fitting, key=lambda bp: (memory.penalty(bp, obs.epoch, decay), BLUEPRINT_INDEX[bp]))

    # ------------------------------------------------------------ learning (none)

    def evaluate(
        self,
        observations: Sequence[Observation],
        actions: torch.Tensor,
        hidden: torch.Tensor | None = None,
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

    def reset_run(self, run_id: str) -> None:
        self.forget([run_id])

    @property
    def tracked_runs(self) -> int:
        return len(self._memory)

    def __repr__(self) -> str:
        return f"HeuristicPolicy(version={self._version})"
