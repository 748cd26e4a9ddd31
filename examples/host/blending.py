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
new target, over `alpha_speed`'s epochs (instant: at the next step), or without a speed over
the steps left in the blend (at once when none are left); along `alpha_curve` (linear; cosine
(1 - cos(pi p)) / 2; or the sigmoid shape at the seed's steepness), the blend's own shape
without one. A move
longer than the blend's remaining steps extends the blend: it completes when both are done.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from esperd_contracts import AlphaCurve, AlphaSpeed, BlendAlgorithm


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def shape(algorithm: BlendAlgorithm, progress: float, steepness: float = 1.0) -> float:
    """The schedule's shape s(p) for progress p in [0, 1]; s(0) = 0 and s(1) = 1."""
    p = min(max(progress, 0.0), 1.0)
    if algorithm is BlendAlgorithm.SIGMOID:
        low, high = _sigmoid(-6.0 * steepness), _sigmoid(6.0 * steepness)
        return (_sigmoid(12.0 * steepness * (p - 0.5)) - low) / (high - low)
    return p  # LINEAR, and GATED's schedule (the gate is applied in the slot's forward)


def curve_shape(curve: AlphaCurve, progress: float, steepness: float = 1.0) -> float:
    """A SET_ALPHA_TARGET move's shape at progress p in [0, 1]; 0 at 0 and 1 at 1."""
    p = min(max(progress, 0.0), 1.0)
    if curve is AlphaCurve.COSINE:
        return (1.0 - math.cos(math.pi * p)) / 2.0
    if curve is AlphaCurve.SIGMOID:
        return shape(BlendAlgorithm.SIGMOID, p, steepness)
    return p


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
    # The current segment: it ends at end_step (the blend's end unless a SET_ALPHA_TARGET gave a
    # speed), along `curve` (None: the blend algorithm's own shape).
    end_step: int = -1
    curve: AlphaCurve | None = None

    def __post_init__(self) -> None:
        self.total_steps = max(int(self.total_steps), 1)
        if self.end_step < 0:
            self.end_step = self.total_steps

    @property
    def alpha(self) -> float:
        """Alpha in force for the next forward pass."""
        return self.alpha_at(self.step)

    @property
    def complete(self) -> bool:
        return self.step >= self.total_steps and self.step >= self.end_step

    def alpha_at(self, step: int) -> float:
        span = self.end_step - self.start_step
        progress = 1.0 if span <= 0 else (step - self.start_step) / span
        if self.curve is None:
            s = shape(self.algorithm, progress, self.steepness)
        else:
            s = curve_shape(self.curve, progress, self.steepness)
        return self.start_alpha + (self.target - self.start_alpha) * s

    def advance(self, steps: int = 1) -> float:
        """Count optimizer steps (never past the end); returns the new alpha."""
        self.step = min(self.step + steps, max(self.total_steps, self.end_step))
        return self.alpha

    def set_target(
        self,
        target: float,
        speed: AlphaSpeed | None = None,
        curve: AlphaCurve | None = None,
        steps_per_epoch: int = 1,
    ) -> None:
        """Ramp from the current alpha to `target`: over `speed`'s epochs (at once for instant),
        or without one over the rest of the blend; along `curve` (the blend's own shape without
        one)."""
        self.start_alpha = self.alpha
        self.start_step = self.step
        self.target = min(max(float(target), 0.0), 1.0)
        if speed is None:
            self.end_step = self.total_steps
        else:
            self.end_step = self.step + speed.epochs * max(steps_per_epoch, 1)
        self.curve = curve

    def velocity(self, steps_per_epoch: int) -> float:
        """d(alpha)/d(epoch) at the current step (the levers document's blending_velocity)."""
        if self.complete:
            return 0.0
        return (self.alpha_at(self.step + 1) - self.alpha) * steps_per_epoch
