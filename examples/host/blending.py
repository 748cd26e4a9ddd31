"""Alpha schedules for BLENDING: how a seed's weight in `host + alpha * seed` ramps up.

The ramp is per optimizer step: a blend of tempo T lasts T * steps_per_epoch steps,
so alpha moves smoothly inside an epoch instead of jumping at epoch boundaries.
With progress p = min(step / total_steps, 1) and shape s(p) in [0, 1]:

    alpha(step) = start + (target - start) * s(p)

    linear   s(p) = p
    sigmoid  s(p) = (sig(12k(p - 1/2)) - sig(-6k)) / (sig(6k) - sig(-6k))
             the seed documents' S-curve with steepness k, rescaled so that s(0) = 0 and
             s(1) = 1 exactly (the raw curve starts at sig(-6k) > 0 and never reaches 1)
    gated    s(p) = p, and the slot multiplies it by a learned per-sample gate in (0, 1)

SET_ALPHA_TARGET re-anchors the schedule: from the alpha in force at that step to the
new target, over the steps left in the blend (at once when none are left).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from contracts import BlendAlgorithm


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def shape(algorithm: BlendAlgorithm, progress: float, steepness: float = 1.0) -> float:
    """The schedule's shape s(p) for progress p in [0, 1]; s(0) = 0 and s(1) = 1."""
    p = min(max(progress, 0.0), 1.0)
    if algorithm is BlendAlgorithm.SIGMOID:
        low, high = _sigmoid(-6.0 * steepness), _sigmoid(6.0 * steepness)
        return (_sigmoid(12.0 * steepness * (p - 0.5)) - low) / (high - low)
    return p  # LINEAR, and GATED's schedule (the gate is applied in the slot's forward)


@dataclass(slots=True)
class BlendSchedule:
    """Alpha as a function of the steps taken since BLENDING began."""

    algorithm: BlendAlgorithm
    total_steps: int
    steepness: float = 1.0
    target: float = 1.0
    start_alpha: float = 0.0
    start_step: int = 0  # where the current segment began (moves on SET_ALPHA_TARGET)
    step: int = 0

    def __post_init__(self) -> None:
        self.total_steps = max(int(self.total_steps), 1)

    @property
    def alpha(self) -> float:
        """Alpha in force for the next forward pass."""
        return self.alpha_at(self.step)

    @property
    def complete(self) -> bool:
        return self.step >= self.total_steps

    def alpha_at(self, step: int) -> float:
        span = self.total_steps - self.start_step
        progress = 1.0 if span <= 0 else (step - self.start_step) / span
        s = shape(self.algorithm, progress, self.steepness)
        return self.start_alpha + (self.target - self.start_alpha) * s

    def advance(self, steps: int = 1) -> float:
        """Count optimizer steps (never past the end); returns the new alpha."""
        self.step = min(self.step + steps, self.total_steps)
        return self.alpha

    def set_target(self, target: float) -> None:
        """Ramp from the current alpha to `target` over the rest of the blend."""
        self.start_alpha = self.alpha
        self.start_step = self.step
        self.target = min(max(float(target), 0.0), 1.0)

    def velocity(self, steps_per_epoch: int) -> float:
        """d(alpha)/d(epoch) at the current step (the levers document's blending_velocity)."""
        if self.complete:
            return 0.0
        return (self.alpha_at(self.step + 1) - self.alpha) * steps_per_epoch
