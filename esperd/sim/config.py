"""Simulator settings: episode length, host shapes, dynamics knobs and the reward."""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

from esperd.learn.rewards import RewardConfig
from esperd.sim.catalog import ARCHITECTURES

Prob = Annotated[float, Meta(ge=0.0, le=1.0)]
Epochs = Annotated[int, Meta(ge=0, le=10_000)]


class SimConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One simulated host per env; every episode draws a fresh host from these ranges."""

    epochs: Annotated[int, Meta(ge=2, le=10_000)] = 40  # episode length; one decision per epoch
    min_layers: Annotated[int, Meta(ge=4, le=256)] = 6
    max_layers: Annotated[int, Meta(ge=4, le=256)] = 12
    architectures: tuple[str, ...] = ARCHITECTURES  # drawn uniformly per episode
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
    # Host learning: accuracy approaches its ceiling at `rate` per epoch (drawn per episode).
    rate_low: Prob = 0.15
    rate_high: Prob = 0.25
    ceiling_low: Prob = 0.78
    ceiling_high: Prob = 0.92
    # Lifecycle timing the host enforces on its own.
    prune_cooldown: Epochs = 3  # PRUNED -> DORMANT after this many epochs
    probation_timeout: Epochs = 6  # PROBATIONARY this long without a verdict -> pruned (0 = never)
    # Telemetry noise.
    accuracy_noise: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.003
    counterfactual_noise: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.004
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
