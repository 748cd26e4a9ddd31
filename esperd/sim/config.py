"""Simulator settings: episode length, host shapes, dynamics knobs and the reward."""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta

from esperd.learn.config import RewardConfig
from esperd.section import Section
from esperd_contracts import Blueprint

Prob = Annotated[float, Meta(ge=0.0, le=1.0)]
Epochs = Annotated[int, Meta(ge=0, le=10_000)]


#: Layer kinds the simulator builds (wire `layer_type`s); esperd.sim.catalog indexes its tables by them.
KINDS: tuple[str, ...] = ("conv", "pool", "attention", "mlp", "embedding", "linear")
#: Host architectures the simulator can build (esperd.sim.catalog.build_architecture).
ARCHITECTURES: tuple[str, ...] = ("cnn", "transformer", "hybrid", "mlp")


class SimConfig(Section, frozen=True):
    """One simulated host per env; every episode draws a fresh host from these ranges."""

    epochs: Annotated[int, Meta(ge=2, le=10_000)] = 40  # episode length; one decision per epoch
    min_layers: Annotated[int, Meta(ge=4, le=256)] = 6
    max_layers: Annotated[int, Meta(ge=4, le=256)] = 12
    architectures: tuple[str, ...] = ("cnn", "transformer", "hybrid")  # drawn uniformly per episode
    # Capacity deficits: layers (conv / attention / mlp) that degrade from an onset epoch on and
    # cap accuracy until a fitting seed repairs them.
    min_deficits: Annotated[int, Meta(ge=0, le=64)] = 1
    max_deficits: Annotated[int, Meta(ge=0, le=64)] = 3
    deficit_low: Prob = 0.05  # accuracy a fully degraded deficit layer costs, drawn in [low, high]
    deficit_high: Prob = 0.12
    onset_fraction: Prob = 0.35  # onsets drawn in [0, onset_fraction * epochs]
    degrade_epochs: Annotated[int, Meta(ge=1, le=1_000)] = 6  # onset to full degradation
    quality_noise: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.15  # per layer and blueprint, hidden
    # Transient dips: any layer may sicken for a few epochs and recover on its own (distractors).
    transient_rate: Prob = 0.02  # chance per layer per epoch
    # Host learning: accuracy approaches its ceiling at `rate` per epoch (drawn per episode),
    # starting from an accuracy drawn in [initial_low, initial_high].
    rate_low: Prob = 0.15
    rate_high: Prob = 0.25
    ceiling_low: Prob = 0.78
    ceiling_high: Prob = 0.92
    initial_low: Prob = 0.10
    initial_high: Prob = 0.25
    # --- Tables a calibration (`esperd sim calibrate`) fits to real hosts; empty = the catalog's.
    # Chance that a layer of each kind has a capacity deficit, drawn per layer; when set, it
    # replaces min/max_deficits (which place deficits on conv, attention and mlp layers only).
    deficit_prob: dict[str, Prob] = {}
    # Mean repair quality of a blueprint on a kind of layer: {kind: {blueprint: quality}}.
    affinity: dict[str, dict[str, Annotated[float, Meta(ge=-1.0, le=1.0)]]] = {}
    # Seed parameters as a fraction of the layer's, per blueprint.
    param_ratio: dict[str, Annotated[float, Meta(ge=0.0, le=100.0)]] = {}
    # Layer sizes per kind, [low, high] parameters; seeds on smaller layers are sized against
    # min_seed_reference parameters.
    kind_params: dict[str, tuple[int, int]] = {}
    min_seed_reference: Annotated[int, Meta(ge=0, le=1_000_000_000)] = 16_000
    # A seed where no deficit is costs interference + interference_per_ratio * its size ratio.
    interference: Annotated[float, Meta(ge=-1.0, le=1.0)] = 0.006
    interference_per_ratio: Annotated[float, Meta(ge=-1.0, le=1.0)] = 0.02
    # Once blended in, a host relies on its seed: switching the seed off then costs this much
    # accuracy on average (drawn per layer in [0, 2x]; at alpha 1, mature) beyond what the seed
    # adds over never having had it. Real hosts co-adapt, so the counterfactual they report
    # measures reliance, not only contribution.
    dependence: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.0
    # Blend instability: the catalog's chances scaled by spike_scale; an instability's accuracy
    # drop drawn in [spike_drop_low, spike_drop_high] before the seed-size factor.
    spike_scale: Annotated[float, Meta(ge=0.0, le=100.0)] = 1.0
    spike_drop_low: Prob = 0.02
    spike_drop_high: Prob = 0.04
    # --- What the optional levers do (issue 16). Each is neutral at the host's default (no dwell,
    # the family's isolation, LR multiplier 1, steepness 1), so a calibration from runs that used
    # the defaults stays valid; see esperd/sim/dynamics.py for the model.
    # Co-adaptation (isolation "shared"), relative to an isolated seed: its repair of a deficit is
    # (1 + coadapt_repair) times larger, its interference elsewhere (1 + coadapt_interference)
    # times, its blend instability (1 + coadapt_risk) times.
    coadapt_repair: Annotated[float, Meta(ge=-1.0, le=10.0)] = 0.15
    coadapt_interference: Annotated[float, Meta(ge=-1.0, le=10.0)] = 1.0
    coadapt_risk: Annotated[float, Meta(ge=-1.0, le=10.0)] = 0.3
    # The seed's LR multiplier m: it matures as if m epochs passed per epoch, and its blend
    # instability is m ** lr_risk_exponent times as likely.
    lr_risk_exponent: Annotated[float, Meta(ge=0.0, le=10.0)] = 1.0
    # A sigmoid blend of steepness k is (peak slope(k) / peak slope(1)) ** steepness_shock times as
    # likely to destabilize (a steeper S moves alpha faster in its middle).
    steepness_shock: Annotated[float, Meta(ge=0.0, le=10.0)] = 0.5
    # Lifecycle timing the host enforces on its own.
    prune_cooldown: Epochs = 3  # PRUNED -> DORMANT after this many epochs
    probation_timeout: Epochs = 6  # PROBATIONARY this long without a verdict -> pruned (0 = never)
    # Telemetry noise.
    accuracy_noise: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.003
    counterfactual_noise: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.004
    val_samples: Annotated[int, Meta(ge=0, le=10_000_000)] = 0  # reported validation size (0: not sent)
    # Whether state packets carry the episode's length (total_epochs), as a real host's should.
    # Off, a policy cannot tell how many epochs are left (short test episodes use that: with it
    # on, no seed germinated after their first epochs could finish).
    report_budget: bool = True
    health_noise: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.03
    reward: RewardConfig = RewardConfig()
    run_prefix: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,40}$")] = "sim"
    epoch_seconds: Annotated[float, Meta(gt=0.0, le=1e6)] = 1.0  # simulated clock per epoch (staleness)

    def __post_init__(self) -> None:
        if self.min_layers > self.max_layers:
            raise ValueError("sim: min_layers must not exceed max_layers")
        if self.min_deficits > self.max_deficits:
            raise ValueError("sim: min_deficits must not exceed max_deficits")
        if self.deficit_low > self.deficit_high or self.rate_low > self.rate_high:
            raise ValueError("sim: each *_low must not exceed its *_high")
        if self.ceiling_low > self.ceiling_high:
            raise ValueError("sim: ceiling_low must not exceed ceiling_high")
        unknown = set(self.architectures) - set(ARCHITECTURES)
        if unknown or not self.architectures:
            raise ValueError(f"sim: architectures must be a non-empty subset of {ARCHITECTURES}")
        if self.initial_low > self.initial_high or self.spike_drop_low > self.spike_drop_high:
            raise ValueError("sim: each *_low must not exceed its *_high")
        kinds = set(self.deficit_prob) | set(self.affinity) | set(self.kind_params)
        if kinds - set(KINDS):
            raise ValueError(f"sim: unknown layer kinds {sorted(kinds - set(KINDS))}; known: {KINDS}")
        names = {bp.value for bp in Blueprint}
        blueprints = set(self.param_ratio) | {bp for row in self.affinity.values() for bp in row}
        if blueprints - names:
            raise ValueError(f"sim: unknown blueprints {sorted(blueprints - names)}")
        if any(lo > hi or lo < 0 for lo, hi in self.kind_params.values()):
            raise ValueError("sim: kind_params must be [low, high] with 0 <= low <= high")
