"""Reference policies for the simulator (numpy only): baselines to compare learned policies with.

  RandomPolicy    uniform over the legal actions of each observation (WAIT counted once).
  WaitPolicy      never acts: the host trains alone.
  ScriptedPolicy  hand-written rules that use telemetry the heuristic ignores (dead units,
                  seed gradient ratio) and better levers; it shows the heuristic is beatable
                  from observations alone.
  FixedPlanPolicy a fixed plan per run (given, or drawn when the run is first seen): germinate
                  planned (layer, blueprint) pairs at one epoch, advance on a timetable,
                  fossilize whatever they did -- manual germinations, no telemetry consulted.
                  `lever_plan_policy` makes its one-lever variants (LEVER_VARIANTS), the runs
                  that fit the simulator's lever parameters (esperd.sim.calibrate).

Each has `act(observations) -> int64 [B, ACTION_WIDTH]` action rows, which `SimEnv.step` accepts.
The rule-based ones germinate with the neutral optional levers (the host's default isolation,
LR multiplier 1, steepness 1) and a dwell no shorter than their own ADVANCE timing, so a host
that honours the dwell behaves as one that waits for their ADVANCE.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from esperd.analyzer.observation import (
    ACTION_WIDTH,
    BLEND_INDEX,
    BLENDS,
    BLUEPRINT_INDEX,
    BLUEPRINTS,
    DWELL_INDEX,
    DWELLS,
    ISOLATION_INDEX,
    LEVER_COLUMN,
    LEVERS,
    LR_INDEX,
    NODE_FEATURE_INDEX,
    OP_INDEX,
    STAGE_INDEX,
    STEEPNESS_INDEX,
    TEMPO_INDEX,
    TEMPOS,
    Observation,
    counted_levers,
)
from esperd_contracts import BlendAlgorithm, Blueprint, IsolationMode, Op, SeedStage, Tempo

_WAIT = OP_INDEX[Op.WAIT]
_GERMINATE = OP_INDEX[Op.GERMINATE]
_N = NODE_FEATURE_INDEX
_EPOCHS_IN_STAGE_SCALE = 12.0  # observation.NODE_FEATURES: epochs_in_stage is / 12


def row(node: int, op: int, **levers: int) -> list[int]:
    """An action row: node, op, the given levers' indices (by observation.LEVERS name), else 0."""
    out = [node, op] + [0] * (ACTION_WIDTH - 2)
    for name, index in levers.items():
        out[LEVER_COLUMN[name]] = index
    return out


def germinate_row(node: int, blueprint: int, blend: int, tempo: int, dwell_at_least: int) -> list[int]:
    """A GERMINATE row with the neutral optional levers and the shortest dwell of at least
    `dwell_at_least` epochs (the longest there is when none is that long)."""
    dwell = next((i for i, d in enumerate(DWELLS) if d >= dwell_at_least), len(DWELLS) - 1)
    levers = {
        "blueprint": blueprint,
        "blend": blend,
        "tempo": tempo,
        "dwell": dwell,
        "isolation": ISOLATION_INDEX[None],
        "lr_multiplier": LR_INDEX[1.0],
        "steepness": STEEPNESS_INDEX[1.0] if blend == BLEND_INDEX[BlendAlgorithm.SIGMOID] else 0,
    }
    return row(node, _GERMINATE, **levers)


class RandomPolicy:
    """Uniform over each observation's legal actions: WAIT, or any legal (node, op) pair; levers uniform."""

    name = "random"

    def __init__(self, seed: int | None = None, *, levers: bool = True) -> None:
        """`levers` False: draw only blueprint, blend and tempo and leave the optional levers to the
        host (rows of 5 columns), as esperd's random controller did before issue 16."""
        self.rng = np.random.default_rng(seed)
        self.levers = levers

    def act(self, observations: Sequence[Observation], deterministic: bool = False) -> np.ndarray:
        rows = np.zeros((len(observations), ACTION_WIDTH if self.levers else 5), dtype=np.int64)
        for i, obs in enumerate(observations):
            rows[i] = self._one(obs)
        return rows

    def _one(self, obs: Observation) -> list[int]:
        mask = obs.op_mask.copy()
        mask[:, _WAIT] = False
        nodes, ops = np.nonzero(mask)
        choice = int(self.rng.integers(nodes.size + 1))
        if choice == nodes.size:  # the one WAIT action
            return row(0, _WAIT)[: ACTION_WIDTH if self.levers else 5]
        node, op = int(nodes[choice]), int(ops[choice])
        if not self.levers:
            return self._without_optional_levers(obs, node, op)
        if op != _GERMINATE and op != OP_INDEX[Op.SET_ALPHA_TARGET]:
            return row(node, op)
        drawn = {name: int(self.rng.integers(len(choices))) for name, choices in LEVERS[1:]}
        if op == _GERMINATE:
            drawn["blueprint"] = int(self.rng.choice(np.flatnonzero(obs.blueprint_mask[node])))
        counted = counted_levers(Op.GERMINATE if op == _GERMINATE else Op.SET_ALPHA_TARGET, drawn["blend"])
        return row(node, op, **{name: drawn[name] for name in counted})

    def _without_optional_levers(self, obs: Observation, node: int, op: int) -> list[int]:
        if op != _GERMINATE:
            return [node, op, 0, 0, 0]
        blueprints = np.flatnonzero(obs.blueprint_mask[node])
        blend = self.rng.integers(len(BLENDS))
        return [node, op, int(self.rng.choice(blueprints)), int(blend), int(self.rng.integers(len(TEMPOS)))]

    def forget(self, run_ids: Sequence[str]) -> None:
        del run_ids


class WaitPolicy:
    """Never acts."""

    name = "wait"

    def act(self, observations: Sequence[Observation], deterministic: bool = False) -> np.ndarray:
        rows = np.zeros((len(observations), ACTION_WIDTH), dtype=np.int64)
        rows[:, 1] = _WAIT
        return rows

    def forget(self, run_ids: Sequence[str]) -> None:
        del run_ids


_S = STAGE_INDEX
_CNN_BLUEPRINT = BLUEPRINT_INDEX[Blueprint.DEPTHWISE]
_TF_BLUEPRINT = BLUEPRINT_INDEX[Blueprint.LORA]


class ScriptedPolicy:
    """Rules from observations only, better than the heuristic in the simulator.

    Germinates as soon as a layer shows the signature of lost capacity (many dead units,
    unhealthy) rather than waiting for training to stabilize, several seeds at once; uses
    small, well-fitting blueprints (depthwise for conv, LoRA for transformer layers) with a
    sigmoid blend at standard tempo; prunes a training seed whose gradient ratio says it is
    not learning; fossilizes on positive counterfactual, else prunes; stops starting seeds
    when too few epochs remain for them to pay off.
    """

    name = "scripted"

    def __init__(
        self,
        *,
        max_active: int = 3,
        dead_threshold: float = 0.15,
        health_threshold: float = 0.65,
        train_epochs: int = 2,
        min_seed_ratio: float = 0.2,
        episode_epochs: int = 40,
        last_germination: int = 12,  # epochs before the end after which no seed starts
    ) -> None:
        self.max_active = max_active
        self.dead_threshold = dead_threshold
        self.health_threshold = health_threshold
        self.train_epochs = train_epochs
        self.min_seed_ratio = min_seed_ratio
        self.episode_epochs = episode_epochs
        self.last_germination = last_germination

    def act(self, observations: Sequence[Observation], deterministic: bool = False) -> np.ndarray:
        return np.array([self._one(obs) for obs in observations], dtype=np.int64).reshape(-1, ACTION_WIDTH)

    def forget(self, run_ids: Sequence[str]) -> None:
        del run_ids

    def _one(self, obs: Observation) -> list[int]:
        f, stages = obs.node_features, obs.stages
        eis = np.rint(f[:, _N["epochs_in_stage"]] * _EPOCHS_IN_STAGE_SCALE)
        legal = obs.op_mask
        for node in np.flatnonzero(stages == _S[SeedStage.PROBATIONARY]):
            good = f[node, _N["counterfactual"]] > 0.0 and f[node, _N["total_improvement"]] > 0.0
            op = Op.FOSSILIZE if good else Op.PRUNE
            if legal[node, OP_INDEX[op]]:
                return row(int(node), OP_INDEX[op])
        for node in np.flatnonzero(stages == _S[SeedStage.TRAINING]):
            if eis[node] < self.train_epochs:
                continue
            op = Op.ADVANCE if f[node, _N["seed_gradient_ratio"]] >= self.min_seed_ratio else Op.PRUNE
            if legal[node, OP_INDEX[op]]:
                return row(int(node), OP_INDEX[op])
        active = int(
            np.isin(
                stages,
                [
                    _S[s]
                    for s in (
                        SeedStage.GERMINATED,
                        SeedStage.TRAINING,
                        SeedStage.BLENDING,
                        SeedStage.PROBATIONARY,
                    )
                ],
            ).sum()
        )
        if active >= self.max_active or obs.epoch > self.episode_epochs - self.last_germination:
            return row(0, _WAIT)
        lost = (
            (f[:, _N["dead_neuron_ratio"]] > self.dead_threshold)
            & (f[:, _N["health"]] < self.health_threshold)
            & legal[:, _GERMINATE]
        )
        if not lost.any():
            return row(0, _WAIT)
        node = int(np.flatnonzero(lost)[np.argmax(f[lost, _N["dead_neuron_ratio"]])])
        blueprint = _CNN_BLUEPRINT if f[node, _N["family_cnn"]] >= 0.5 else _TF_BLUEPRINT
        if not obs.blueprint_mask[node, blueprint]:
            return row(0, _WAIT)
        # The longest dwell: this policy decides itself (ADVANCE or PRUNE) after train_epochs.
        sigmoid, standard = BLEND_INDEX[BlendAlgorithm.SIGMOID], TEMPO_INDEX[Tempo.STANDARD]
        return germinate_row(node, blueprint, sigmoid, standard, max(DWELLS))


#: One-lever variants of the manual plan (issue 16's lever sweep): name -> (observation.LEVERS
#: name, choice index); every other lever at its default. A dwell variant also moves the plan's
#: ADVANCE to the dwell (else the ADVANCE after 2 epochs would cut a longer dwell short).
LEVER_VARIANTS: dict[str, tuple[str, int]] = {
    "shared": ("isolation", ISOLATION_INDEX[IsolationMode.SHARED]),
    "isolated": ("isolation", ISOLATION_INDEX[IsolationMode.ISOLATED]),
    "lr0p5": ("lr_multiplier", LR_INDEX[0.5]),
    "lr2": ("lr_multiplier", LR_INDEX[2.0]),
    "steep0p5": ("steepness", STEEPNESS_INDEX[0.5]),
    "steep2": ("steepness", STEEPNESS_INDEX[2.0]),
    "dwell1": ("dwell", DWELL_INDEX[1]),
    "dwell5": ("dwell", DWELL_INDEX[5]),
}
LEVER_PREFIX = "lever-"  # the controller name of a variant: lever-<variant>


def lever_plan_policy(
    variant: str,
    plans: Mapping[str, Sequence[tuple[int, Blueprint]]] | None = None,
    *,
    epoch: int = 3,
    train_epochs: int = 2,
    seed: int | None = None,
) -> FixedPlanPolicy:
    """The manual plan with one lever set to `variant`'s value ("manual" or "default": none)."""
    if variant in ("manual", "default"):
        return FixedPlanPolicy(plans, epoch=epoch, train_epochs=train_epochs, seed=seed)
    if variant not in LEVER_VARIANTS:
        raise ValueError(f"unknown lever variant {variant!r}; known: {sorted(LEVER_VARIANTS)}")
    name, index = LEVER_VARIANTS[variant]
    if name == "dwell":
        train_epochs = DWELLS[index]
    return FixedPlanPolicy(
        plans,
        epoch=epoch,
        train_epochs=train_epochs,
        seed=seed,
        lever=(name, index),
        name=LEVER_PREFIX + variant,
    )


class FixedPlanPolicy:
    """Germinate each run's planned (layer id, blueprint) pairs at `epoch`, ADVANCE a seed after
    `train_epochs` in TRAINING, FOSSILIZE it after one epoch on probation: no telemetry is read.

    `plans` maps run ids to their pairs; a run without one gets `seeds_per_run` pairs drawn at
    random (distinct layers that can germinate, a blueprint that fits each) when first seen.
    """

    name = "manual"

    def __init__(
        self,
        plans: Mapping[str, Sequence[tuple[int, Blueprint]]] | None = None,
        *,
        epoch: int = 3,
        train_epochs: int = 2,
        seeds_per_run: int = 2,
        seed: int | None = None,
        blend: BlendAlgorithm = BlendAlgorithm.SIGMOID,
        tempo: Tempo = Tempo.STANDARD,
        lever: tuple[str, int] | None = None,
        name: str = "manual",
    ) -> None:
        """`lever`: (observation.LEVERS name, choice index) every GERMINATE sets instead of the
        neutral choice (one lever varied, the rest at their defaults); `name` names the policy."""
        self.plans: dict[str, list[tuple[int, Blueprint]]] = {k: list(v) for k, v in (plans or {}).items()}
        self.lever = lever
        self.name = name
        self.epoch = epoch
        self.train_epochs = train_epochs
        self.seeds_per_run = seeds_per_run
        self.rng = np.random.default_rng(seed)
        self.levers = [BLEND_INDEX[blend], TEMPO_INDEX[tempo]]
        self._germinated: set[tuple[str, int]] = set()

    def act(self, observations: Sequence[Observation], deterministic: bool = False) -> np.ndarray:
        return np.array([self._one(obs) for obs in observations], dtype=np.int64).reshape(-1, ACTION_WIDTH)

    def forget(self, run_ids: Sequence[str]) -> None:
        for run_id in run_ids:
            self.plans.pop(run_id, None)
        self._germinated = {key for key in self._germinated if key[0] not in set(run_ids)}

    def _plan(self, obs: Observation) -> list[tuple[int, Blueprint]]:
        plan = self.plans.get(obs.run_id)
        if plan is None:
            slots = np.flatnonzero(obs.op_mask[:, _GERMINATE])
            chosen = self.rng.permutation(slots)[: self.seeds_per_run]
            plan = []
            for node in chosen.tolist():
                fitting = np.flatnonzero(obs.blueprint_mask[node])
                plan.append((int(obs.layer_ids[node]), BLUEPRINTS[int(self.rng.choice(fitting))]))
            self.plans[obs.run_id] = plan
        return plan

    def _one(self, obs: Observation) -> list[int]:
        node_of = {int(layer): i for i, layer in enumerate(obs.layer_ids.tolist())}
        eis = np.rint(obs.node_features[:, _N["epochs_in_stage"]] * _EPOCHS_IN_STAGE_SCALE)
        for layer_id, blueprint in self._plan(obs):
            node = node_of.get(layer_id)
            if node is None:
                continue
            stage, legal = int(obs.stages[node]), obs.op_mask[node]
            key = (obs.run_id, layer_id)
            if stage == _S[SeedStage.DORMANT] and key not in self._germinated and obs.epoch >= self.epoch:
                if legal[_GERMINATE] and obs.blueprint_mask[node, BLUEPRINT_INDEX[blueprint]]:
                    self._germinated.add(key)
                    bp = BLUEPRINT_INDEX[blueprint]
                    out = germinate_row(node, bp, *self.levers, dwell_at_least=self.train_epochs)
                    if self.lever is not None:
                        out[LEVER_COLUMN[self.lever[0]]] = self.lever[1]
                    return out
            elif (
                stage == _S[SeedStage.TRAINING]
                and eis[node] >= self.train_epochs
                and legal[OP_INDEX[Op.ADVANCE]]
            ):
                return row(node, OP_INDEX[Op.ADVANCE])
            elif stage == _S[SeedStage.PROBATIONARY] and eis[node] >= 1 and legal[OP_INDEX[Op.FOSSILIZE]]:
                return row(node, OP_INDEX[Op.FOSSILIZE])
        return row(0, _WAIT)
