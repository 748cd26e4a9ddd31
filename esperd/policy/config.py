"""Policy configuration: msgspec Structs, decodable from the daemon's TOML `[policy]` table.

Ranges are checked when decoded (`msgspec.convert`/TOML) and again on direct
construction (`__post_init__`), so a bad value fails early either way.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal

from msgspec import Meta

from esperd.section import Section
from esperd_contracts import BlendAlgorithm, Tempo

Epochs = Annotated[int, Meta(ge=0, le=10_000)]
#: The optional levers a learned policy may set (esperd.analyzer.observation.OPTIONAL_LEVERS).
Lever = Literal[
    "dwell", "isolation", "lr_multiplier", "steepness", "alpha_target", "alpha_speed", "alpha_curve"
]
ALL_OPTIONAL_LEVERS: tuple[Lever, ...] = (
    "dwell",
    "isolation",
    "lr_multiplier",
    "steepness",
    "alpha_target",
    "alpha_speed",
    "alpha_curve",
)
#: The observation reports epochs in stage scaled by 1/12 and clipped, so 12 is the most it can tell.
StageEpochs = Annotated[int, Meta(ge=0, le=12)]
Unit = Annotated[float, Meta(ge=0.0, le=1.0)]


def _check_range(field: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise ValueError(f"policy config: {field}={value!r} is outside [{lo}, {hi}]")


class HeuristicConfig(Section, frozen=True):
    """Thresholds of the rule-based policy. Epoch counts are host epochs."""

    # When germination is allowed at all.
    min_epoch: Epochs = 3  # never germinate before this epoch
    stabilize_delta: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.01  # |val acc change| below this = stabilized
    plateau_patience: Annotated[int, Meta(ge=1, le=10)] = 3  # epochs without val improvement = plateau
    max_active_seeds: Annotated[int, Meta(ge=1, le=4096)] = 1  # seeds in flight per run
    # Capacity-bound: a host whose training accuracy is within `underfit_gap` of its validation
    # accuracy (capacity, not data, limits it) and below `underfit_max_train_accuracy` grows as
    # soon as `min_epoch` allows, without waiting for a plateau: early seeds have the most epochs
    # to pay back (benchmarks/results/germination_sweep.md). A negative gap turns this off.
    underfit_gap: Annotated[float, Meta(ge=-1.0, le=1.0)] = 0.03
    underfit_max_train_accuracy: Unit = 0.98
    # Which layer: problematic, unhealthy and declining (or, on a plateau, the least healthy).
    unhealthy_threshold: Unit = 0.5  # health below this is unhealthy
    decline_threshold: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.0  # trend below -this is declining
    plateau_health_max: Unit = 0.9  # on a plateau, only layers below this health
    # Lifecycle timing.
    train_dwell_epochs: StageEpochs = 3  # TRAINING -> BLENDING after this many epochs in stage
    probation_epochs: StageEpochs = 1  # epochs on probation before fossilize / prune
    # Fossilize only a seed whose counterfactual is more than noise: at least `fossilize_z` standard
    # errors above 0 (the analyzer's counterfactual_z), above fossilize_min_counterfactual, and with
    # total improvement > fossilize_min_improvement. A seed as many errors below 0 is pruned; one in
    # between stays on probation for up to `probation_max_epochs`, then is pruned: it has not shown
    # it earns its parameters.
    fossilize_z: Annotated[float, Meta(ge=0.0, le=10.0)] = 2.0
    probation_max_epochs: StageEpochs = 4
    fossilize_min_counterfactual: float = 0.0
    fossilize_min_improvement: float = 0.0
    # Memory of past outcomes.
    embargo_epochs: Epochs = 5  # no germination on a slot this long after a prune
    blueprint_penalty: Annotated[float, Meta(ge=0.0, le=100.0)] = 1.0  # added to a pruned blueprint
    blueprint_penalty_decay: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.8  # per epoch
    # Across runs: a blueprint's fossilization record on a kind of layer reorders the prior
    # preference; the prior counts as this many seeds.
    blueprint_prior_strength: Annotated[float, Meta(gt=0.0, le=1000.0)] = 2.0
    max_tracked_runs: Annotated[int, Meta(ge=1, le=1_000_000)] = 10_000
    # Levers chosen at GERMINATE. The dwell is train_dwell_epochs (a host that honours it blends on
    # its own then; ADVANCE after the dwell covers one that does not). Isolation "family": the
    # seed documents' rule, isolated on CNN-family layers, shared (co-adaptation) on transformer
    # ones. Steepness is sent with a sigmoid blend only.
    blend: BlendAlgorithm = BlendAlgorithm.SIGMOID
    tempo: Tempo = Tempo.STANDARD
    isolation: Literal["family", "isolated", "shared"] = "family"
    lr_multiplier: Annotated[float, Meta(gt=0.0, le=100.0)] = 1.0
    steepness: Annotated[float, Meta(gt=0.0, le=100.0)] = 1.0
    # Act only when both are reached.
    confidence_threshold: Unit = 0.7
    urgency_threshold: Unit = 0.5

    def __post_init__(self) -> None:
        _check_range("heuristic.confidence_threshold", self.confidence_threshold, 0.0, 1.0)
        _check_range("heuristic.urgency_threshold", self.urgency_threshold, 0.0, 1.0)
        _check_range("heuristic.plateau_patience", self.plateau_patience, 1, 10)
        _check_range("heuristic.blueprint_penalty_decay", self.blueprint_penalty_decay, 0.0, 1.0)
        _check_range("heuristic.max_active_seeds", self.max_active_seeds, 1, 4096)
        _check_range("heuristic.train_dwell_epochs", self.train_dwell_epochs, 0, 12)
        _check_range("heuristic.probation_epochs", self.probation_epochs, 0, 12)
        _check_range("heuristic.probation_max_epochs", self.probation_max_epochs, self.probation_epochs, 12)


class PolicyConfig(Section, frozen=True):
    """Which policy serves, how its network is shaped, where its weights come from."""

    name: str = "heuristic"  # registered policy name: heuristic | gnn | lstm | random
    hidden_size: Annotated[int, Meta(ge=64, le=256)] = 128
    gnn_layers: Annotated[int, Meta(ge=1, le=8)] = 3
    dropout: Annotated[float, Meta(ge=0.0, lt=1.0)] = 0.1
    residual: bool = True
    lstm_hidden: Annotated[int, Meta(ge=16, le=1024)] = 128
    lstm_max_runs: Annotated[int, Meta(ge=1, le=1_000_000)] = 4096  # recurrent state kept for this many runs
    compile: bool = False  # torch.compile the inner network (never the bundle)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"
    init_seed: int | None = 0  # seeds weight init (None: torch's global RNG)
    deterministic: bool = False  # serve argmax actions instead of samples
    # The optional levers a policy sets (a learned one by its heads, the heuristic by its rules, the
    # random policy draws them); the others it leaves to the host (not sent: the contract's
    # default), a learned policy's heads of those held at one choice (no log-probability term).
    # Blueprint, blend and tempo are always set. () : every optional lever at its default.
    levers: tuple[Lever, ...] = ALL_OPTIONAL_LEVERS
    checkpoint: str | None = None  # safetensors file to load at start
    fallback: str = "heuristic"  # served when the checkpoint cannot be loaded
    # How a policy picks among candidates it scores (the heuristic's blueprint and tempo for a
    # GERMINATE; the rails' choice of which runs get a scarce seed pool's last seeds):
    # "pareto", seed document 002's multi-objective choice (esperd.pareto: performance, risk,
    # adaptability, weighted 0.5 / 0.3 / 0.2 on the non-dominated front), or "argmax", the best
    # performance alone (then the least risk).
    selection: Literal["pareto", "argmax"] = "pareto"
    heuristic: HeuristicConfig = HeuristicConfig()

    def __post_init__(self) -> None:
        _check_range("hidden_size", self.hidden_size, 64, 256)
        _check_range("gnn_layers", self.gnn_layers, 1, 8)
        _check_range("dropout", self.dropout, 0.0, 0.999)
        _check_range("lstm_hidden", self.lstm_hidden, 16, 1024)
        _check_range("lstm_max_runs", self.lstm_max_runs, 1, 1_000_000)


def stable_hash(data: Any) -> str:
    """Short hash of JSON-able data, independent of dict order."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
